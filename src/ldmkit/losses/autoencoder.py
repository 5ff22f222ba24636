"""The first stage's training objective (Rombach et al. 2022, Sec. 3.1 and App. G; Esser
et al. 2021, Eq. 4-6):

    L_rec = |x - x̂|·w_pix + w_lpips·LPIPS(x, x̂)
    L_nll = L_rec / exp(s) + s                        (s: a learned log-variance)
    L_G   = L_nll + L_reg + λ·disc_factor·(-D(x̂))     (L_reg from the first stage)
    λ     = disc_weight · ||∇_last L_nll|| / (||∇_last L_G_adv|| + 1e-4)   (adaptive weight)
    L_D   = disc_factor · hinge / vanilla loss of D on real x and detached x̂

with the adversarial terms off (``disc_factor`` treated as 0) before ``disc_start``.
``∇_last`` is the gradient w.r.t. the decoder's last layer (``FirstStage.last_layer()``).

``reduction="sum"`` sums L_nll over C, H, W and averages over the batch (the scale the
KL-reg model's ``kl_weight=1e-6`` was tuned for); ``"mean"`` averages over every element
(the VQ-reg models' scale). The first stage's regularization loss arrives already
weighted; ``regularization_weight`` can scale it further.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldmkit.losses.discriminator import DISC_LOSSES, PatchDiscriminator, discriminator_loss_fn
from ldmkit.losses.perceptual import TRUNKS

REDUCTIONS = ("mean", "sum")


def adaptive_weight(nll_loss: Tensor, g_loss: Tensor, last_layer: Tensor, *, disc_weight: float) -> Tensor:
    """``disc_weight * ||∇ nll|| / (||∇ g|| + 1e-4)`` at ``last_layer``, clamped to [0, 1e4]
    and detached (Esser et al. 2021, Eq. 7)."""
    nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)
    return torch.clamp(weight, 0.0, 1e4).detach() * disc_weight


class AutoencoderLoss(nn.Module):
    """L1 + LPIPS + PatchGAN loss with a log-variance for any FirstStage.

    Two optimizers train it: one over the autoencoder's parameters (plus ``logvar`` with
    ``learn_logvar``; see :meth:`generator_parameters`), one over :attr:`discriminator`. The
    paper's code (CompVis ``LPIPSWithDiscriminator``) declares ``logvar`` but leaves it out of
    its optimizer, so it stays at ``logvar_init``: the default ``learn_logvar=False`` does the same.
    """

    def __init__(
        self,
        *,
        disc_start: int = 50001,
        pixel_weight: float = 1.0,
        perceptual_weight: float = 1.0,
        lpips_trunk: str = "pretrained",
        disc_in_channels: int = 3,
        disc_num_layers: int = 3,
        disc_ndf: int = 64,
        disc_factor: float = 1.0,
        disc_weight: float = 0.5,
        disc_loss: str = "hinge",
        logvar_init: float = 0.0,
        learn_logvar: bool = False,
        reduction: str = "mean",
        regularization_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"unknown reduction {reduction!r}; expected one of {REDUCTIONS}")
        if disc_loss not in DISC_LOSSES:
            raise ValueError(f"unknown disc_loss {disc_loss!r}; expected one of {DISC_LOSSES}")
        if lpips_trunk not in TRUNKS:  # checked even with the LPIPS term off: a typo is a typo
            raise ValueError(f"unknown LPIPS trunk {lpips_trunk!r}; expected one of {TRUNKS}")
        for name, value in (
            ("pixel_weight", pixel_weight), ("perceptual_weight", perceptual_weight),
            ("disc_weight", disc_weight), ("disc_factor", disc_factor),
            ("regularization_weight", regularization_weight), ("disc_start", disc_start),
        ):
            if not value >= 0:  # a negative weight turns a term into one to maximize (NaN: too)
                raise ValueError(f"{name} must be >= 0, got {value}")
        if not math.isfinite(logvar_init):
            raise ValueError(f"logvar_init must be a finite number, got {logvar_init}")
        self.disc_start = int(disc_start)
        self.pixel_weight = float(pixel_weight)
        self.perceptual_weight = float(perceptual_weight)
        self.disc_factor = float(disc_factor)
        self.disc_weight = float(disc_weight)
        self.disc_loss_name = disc_loss
        self.disc_loss = discriminator_loss_fn(disc_loss)
        self.reduction = reduction
        self.regularization_weight = float(regularization_weight)
        self.perceptual: nn.Module | None = None
        if self.perceptual_weight > 0:
            from ldmkit.losses.perceptual import LPIPS

            self.perceptual = LPIPS(trunk=lpips_trunk)
        self.logvar = nn.Parameter(torch.tensor(float(logvar_init)), requires_grad=learn_logvar)
        self.discriminator = PatchDiscriminator(
            in_channels=disc_in_channels, ndf=disc_ndf, num_layers=disc_num_layers
        )

    # -- bookkeeping ---------------------------------------------------------------------
    def gan_active(self, global_step: int) -> bool:
        """Whether the adversarial terms count at this step (``global_step >= disc_start``)."""
        return self.disc_factor > 0 and global_step >= self.disc_start

    def generator_parameters(self) -> list[nn.Parameter]:
        """Parameters of the loss trained with the autoencoder (the log-variance)."""
        return [self.logvar] if self.logvar.requires_grad else []

    def _reduce(self, x: Tensor) -> Tensor:
        if self.reduction == "sum":
            return x.sum() / x.shape[0]
        return x.mean()

    def _generator_adversarial(self, fake_logits: Tensor) -> Tensor:
        if self.disc_loss_name == "hinge":
            return -fake_logits.mean()
        return F.softplus(-fake_logits).mean()  # non-saturating

    # -- the two objectives ----------------------------------------------------------------
    def generator_loss(
        self,
        inputs: Tensor,
        reconstructions: Tensor,
        regularization_loss: Tensor,
        *,
        global_step: int,
        last_layer: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The autoencoder's loss and its logged parts."""
        if inputs.shape != reconstructions.shape:
            raise ValueError(
                f"reconstructions {tuple(reconstructions.shape)} do not match inputs "
                f"{tuple(inputs.shape)}"
            )
        l1 = (inputs - reconstructions).abs()
        rec = self.pixel_weight * l1
        logs: dict[str, Tensor] = {"l1": l1.mean().detach()}
        if self.perceptual is not None:
            p_loss = self.perceptual(inputs.contiguous(), reconstructions.contiguous())
            rec = rec + self.perceptual_weight * p_loss
            logs["lpips"] = p_loss.mean().detach()
        nll = self._reduce(rec / torch.exp(self.logvar) + self.logvar)
        reg = self.regularization_weight * regularization_loss
        loss = nll + reg
        logs.update(nll=nll.detach(), reg=reg.detach(), logvar=self.logvar.detach().clone())

        if self.gan_active(global_step):
            g_loss = self._generator_adversarial(self.discriminator(reconstructions.contiguous()))
            if last_layer is not None and torch.is_grad_enabled():
                d_weight = adaptive_weight(nll, g_loss, last_layer, disc_weight=self.disc_weight)
            else:  # no layer to balance at (or evaluating): use the configured weight as is
                d_weight = torch.tensor(self.disc_weight, device=inputs.device)
            loss = loss + d_weight * self.disc_factor * g_loss
            logs.update(g_loss=g_loss.detach(), d_weight=d_weight)
        logs["loss"] = loss.detach()
        return loss, logs

    def discriminator_loss(
        self, inputs: Tensor, reconstructions: Tensor, *, global_step: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The discriminator's loss on real ``inputs`` and (detached) ``reconstructions``;
        zero, with no discriminator pass, before ``disc_start``."""
        if not self.gan_active(global_step):
            zero = torch.zeros((), device=inputs.device)
            return zero, {"d_loss": zero}
        logits_real = self.discriminator(inputs.contiguous().detach())
        logits_fake = self.discriminator(reconstructions.contiguous().detach())
        d_loss = self.disc_factor * self.disc_loss(logits_real, logits_fake)
        return d_loss, {
            "d_loss": d_loss.detach(),
            "logits_real": logits_real.mean().detach(),
            "logits_fake": logits_fake.mean().detach(),
        }
