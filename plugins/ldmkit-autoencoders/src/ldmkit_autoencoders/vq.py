"""VQ-regularized autoencoder (Rombach et al. 2022, Sec. 3.1 "VQ-reg"; van den Oord et
al. 2017): a codebook of ``n_embed`` vectors of size ``embed_dim`` (= ``latent_channels``)
quantizes the latent; straight-through gradients pass the decoder's gradient to the
encoder; the loss adds the codebook and the (beta-weighted) commitment terms.

As in the paper, the quantizer is absorbed into the decoder: ``encode`` returns the
*pre-quantization* latent (what the diffusion model is trained on) and ``decode``
quantizes first.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ldmkit_autoencoders.engine import AutoencodingEngine, Regularizer, with_architecture_signature


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class VectorQuantizer(Regularizer):
    """Nearest-neighbour vector quantization with straight-through gradients.

    Loss: ``codebook_weight * (||sg[z] - e||^2 + beta * ||z - sg[e]||^2)``, both terms
    averaged over elements (van den Oord et al. 2017, Eq. 3; the original LDM code's
    "legacy" variant put beta on the codebook term instead — this is the published form).

    With ``restart_dead_codes`` an exponential moving average of each code's per-batch
    hit count is kept; codes whose average falls below ``dead_code_threshold`` are moved
    onto randomly chosen encoder outputs of the current batch (as in Dhariwal et al.
    2020's Jukebox and Zeghidour et al. 2021), which keeps large codebooks in use.

    Under ``torch.distributed`` (DDP averages gradients but never re-syncs parameters) a
    training forward sums the code counts over the ranks, so the usage logs, the moving
    average and the dead set are the global batch's on every rank, and the replacement
    vectors are rank 0's picks, broadcast: every rank's codebook stays identical.
    """

    moments_factor = 1
    loss_reduction = "mean"

    def __init__(
        self,
        *,
        n_embed: int,
        embed_dim: int,
        beta: float = 0.25,
        codebook_weight: float = 1.0,
        restart_dead_codes: bool = False,
        dead_code_threshold: float = 0.01,
        usage_decay: float = 0.95,
    ) -> None:
        super().__init__()
        if n_embed < 1:
            raise ValueError(f"n_embed must be >= 1, got {n_embed}")
        if not 0.0 <= usage_decay < 1.0:
            raise ValueError(f"usage_decay must be in [0, 1), got {usage_decay}")
        for name, value in (("beta", beta), ("codebook_weight", codebook_weight),
                            ("dead_code_threshold", dead_code_threshold)):
            if not value >= 0:  # a negative weight pushes the latents away from their codes
                raise ValueError(f"{name} must be >= 0, got {value}")
        self.n_embed, self.embed_dim = int(n_embed), int(embed_dim)
        self.beta, self.codebook_weight = float(beta), float(codebook_weight)
        self.restart_dead_codes = bool(restart_dead_codes)
        self.dead_code_threshold, self.usage_decay = float(dead_code_threshold), float(usage_decay)
        self.embedding = nn.Embedding(self.n_embed, self.embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / self.n_embed, 1.0 / self.n_embed)
        if self.restart_dead_codes:
            self.register_buffer("code_usage", torch.ones(self.n_embed))
            # restarts since this process started: metrics.csv shows every log_every-th step's
            # logs only, so a step's own count misses those in between. Not in the state dict
            # (weights written before it existed load as they are): a resumed run counts anew
            self.register_buffer("codes_restarted", torch.zeros((), dtype=torch.int64), persistent=False)

    @torch.no_grad()
    def indices(self, z: Tensor) -> Tensor:
        """Index of the nearest code for every position: B×h×w (int64)."""
        flat = rearrange(z, "b c h w -> (b h w) c")
        codebook = self.embedding.weight
        # argmin ||z - e||^2 = argmin ||e||^2 - 2 z.e (||z||^2 is the same for every code),
        # one fused matrix product without materializing the differences
        scores = torch.addmm(codebook.pow(2).sum(1), flat, codebook.t(), alpha=-2.0)
        index = scores.argmin(dim=1)
        return rearrange(index, "(b h w) -> b h w", b=z.shape[0], h=z.shape[2], w=z.shape[3])

    def lookup(self, index: Tensor) -> Tensor:
        """Codes for an index map B×h×w -> B×embed_dim×h×w."""
        return rearrange(self.embedding(index), "b h w c -> b c h w")

    def quantize(self, z: Tensor) -> Tensor:
        return self.lookup(self.indices(z))

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor, dict[str, Any]]:
        index = self.indices(h)
        z_q = self.lookup(index)
        codebook_loss = F.mse_loss(z_q, h.detach())
        commitment_loss = F.mse_loss(h, z_q.detach())
        loss = self.codebook_weight * (codebook_loss + self.beta * commitment_loss)
        z_st = h + (z_q - h).detach()  # straight-through: forward z_q, backward identity

        counts = torch.bincount(index.flatten(), minlength=self.n_embed)
        if self.training and _world_size() > 1:
            dist.all_reduce(counts)  # the global batch's: the same usage and dead set on every rank
        # at least float32: a bf16 count is exact only up to 256 hits (h is bf16 under autocast)
        counts = counts.to(torch.promote_types(h.dtype, torch.float32))
        probs = counts / counts.sum()
        perplexity = torch.exp(-(probs * torch.log(probs.clamp_min(1e-10))).sum())
        logs: dict[str, Any] = {
            "codebook_loss": codebook_loss.detach(),
            "commitment_loss": commitment_loss.detach(),
            "perplexity": perplexity.detach(),
            "codebook_usage": (counts > 0).to(h.dtype).mean().detach(),
        }
        if self.training and self.restart_dead_codes:
            logs["dead_codes_restarted"] = self._restart_dead_codes(h, counts)
            logs["dead_codes_restarted_total"] = self.codes_restarted.to(counts.dtype)
        return z_st, loss, logs

    @torch.no_grad()
    def _restart_dead_codes(self, h: Tensor, counts: Tensor) -> Tensor:
        self.code_usage.mul_(self.usage_decay).add_(counts.to(self.code_usage), alpha=1 - self.usage_decay)
        dead = torch.nonzero(self.code_usage < self.dead_code_threshold).squeeze(1)
        if dead.numel() > 0:
            flat = rearrange(h.detach(), "b c h w -> (b h w) c")
            # every rank draws (its random stream advances alike, for exact resumes); rank 0's
            # picks are written everywhere
            pick = torch.randint(0, flat.shape[0], (dead.numel(),), device=flat.device)
            vectors = flat[pick].to(self.embedding.weight.dtype)
            if _world_size() > 1:
                dist.broadcast(vectors, src=0)
            self.embedding.weight.data[dead] = vectors
            self.code_usage[dead] = 1.0
            self.codes_restarted += dead.numel()
        return torch.tensor(float(dead.numel()), device=h.device, dtype=counts.dtype)

    def latent(self, h: Tensor) -> Tensor:
        return h

    def prepare_decode(self, z: Tensor) -> Tensor:
        return self.quantize(z)


class VQAutoencoder(AutoencodingEngine):
    """First stage ``vq``: ``encode`` -> pre-quantization latent; ``decode`` quantizes
    to the nearest of ``n_embed`` codes of size ``latent_channels`` (the paper's
    ``embed_dim``) before decoding."""

    architecture_defaults = {"ch_mult": (1, 2, 4)}

    def __init__(
        self,
        *,
        latent_channels: int = 3,
        n_embed: int = 8192,
        beta: float = 0.25,
        codebook_weight: float = 1.0,
        restart_dead_codes: bool = False,
        dead_code_threshold: float = 0.01,
        usage_decay: float = 0.95,
        **arch: Any,
    ) -> None:
        """``arch``: the encoder/decoder shape (:class:`~ldmkit_autoencoders.engine.Architecture`;
        ``ch_mult`` defaults to (1, 2, 4) here)."""
        super().__init__(
            regularizer=VectorQuantizer(
                n_embed=n_embed, embed_dim=latent_channels, beta=beta,
                codebook_weight=codebook_weight, restart_dead_codes=restart_dead_codes,
                dead_code_threshold=dead_code_threshold, usage_decay=usage_decay,
            ),
            latent_channels=latent_channels,
            **arch,
        )

    @property
    def quantizer(self) -> VectorQuantizer:
        return self.regularizer  # type: ignore[return-value]

    def encode_indices(self, x: Tensor) -> Tensor:
        """Code indices B×h×w of an image batch."""
        return self.quantizer.indices(self.encode(x))

    def decode_indices(self, index: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(self.quantizer.lookup(index)))


with_architecture_signature(VQAutoencoder, VQAutoencoder.architecture_defaults)
