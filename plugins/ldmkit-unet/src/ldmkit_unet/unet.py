"""The time-conditional UNet eps_theta(z_t, t, tau(y)) of Latent Diffusion Models.

Rombach et al. 2022, Sec. 3.3 and App. E.1: the ADM UNet (Dhariwal & Nichol 2021) whose
attention layers at the chosen downsample factors are SpatialTransformers, so features
attend to the condition tau(y) by cross-attention. Concat conditions enter as extra input
channels; class / vector conditions are added to the timestep embedding.

The module tree and parameter names are those of the reference code's
``ldm.modules.diffusionmodules.openaimodel.UNetModel`` (``time_embed``, ``label_emb``,
``input_blocks.N.M``, ``middle_block``, ``output_blocks``, ``out``), and for the same
hyperparameters the function is the same, so the paper's checkpoints load with
``load_state_dict`` unchanged. Two documented differences of interface: the class label
arrives as ``cond["vector"]`` (a one-hot row, zeros for the null class) instead of an
index, and ``use_checkpoint`` really is optional (the reference always checkpoints its
attention layers, which costs a second forward in training).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldmkit.interfaces import Denoiser
from ldmkit.interfaces.denoiser import PREDICTIONS
from ldmkit.nn import SpatialTransformer, normalization, timestep_embedding, zero_module
from ldmkit_unet.blocks import (
    AttentionBlock,
    Downsample,
    ResBlock,
    TimestepEmbedSequential,
    Upsample,
)

__all__ = ["UNetModel"]


def _unset(value: int | None) -> bool:
    # the reference configs spell "not set" as -1
    return value is None or value == -1


class UNetModel(Denoiser):
    """The paper's denoising UNet (a ``Denoiser`` registered as ``unet``).

    :param in_channels: latent channels plus concat-condition channels.
    :param out_channels: channels of the prediction (the latent channels).
    :param model_channels: base width; level ``i`` has ``channel_mult[i] * model_channels``.
    :param num_res_blocks: ResBlocks per level on the way down (one more on the way up).
    :param attention_resolutions: downsample factors (1, 2, 4, ...) with attention.
    :param channel_mult: width multiplier per level; ``len`` levels, ``len - 1`` resamplings.
    :param dropout: dropout in ResBlocks and transformer blocks.
    :param conv_resample: learned 3x3 convolutions for resampling (else pool / nearest).
    :param num_heads: attention heads (when ``num_head_channels`` is unset).
    :param num_head_channels: channels per head; overrides ``num_heads`` when set.
    :param use_scale_shift_norm: FiLM-style timestep conditioning in ResBlocks.
    :param resblock_updown: resample with ResBlocks instead of Downsample/Upsample.
    :param use_spatial_transformer: SpatialTransformer (self+cross-attention, GEGLU) at the
        attention resolutions; False uses ADM's single self-attention ``AttentionBlock``.
    :param transformer_depth: transformer blocks per SpatialTransformer.
    :param use_new_attention_order: q/k/v channel order of ``AttentionBlock``.
    :param context_dim: width of ``cond["crossattn"]``; None: no cross-attention (the
        second attention of each transformer block attends to the features themselves).
    :param num_classes: class conditioning: an int ``K`` keeps the reference's
        ``label_emb = nn.Embedding(K, 4*model_channels)``, fed a one-hot ``cond["vector"]``
        (B x K; zeros mean "no class"); ``"sequential"`` embeds an arbitrary vector of
        ``adm_in_channels`` with an MLP (sgm's ADM-style ``label_emb.0``).
    :param adm_in_channels: vector width for ``num_classes="sequential"``.
    :param vector_dim: width of ``cond["vector"]`` (composition fills it from the
        conditioner). Alone it means ``num_classes=vector_dim``; with ``num_classes`` set
        it must agree.
    :param use_checkpoint: gradient checkpointing of every ResBlock and transformer block.
    :param prediction: what the network predicts: ``eps``, ``x0`` or ``v``.
    """

    def __init__(
        self,
        *,
        in_channels: int = 4,
        out_channels: int = 4,
        model_channels: int = 32,
        num_res_blocks: int = 1,
        attention_resolutions: Sequence[int] = (2,),
        channel_mult: Sequence[int] = (1, 2),
        dropout: float = 0.0,
        conv_resample: bool = True,
        num_heads: int | None = -1,
        num_head_channels: int | None = 16,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_spatial_transformer: bool = True,
        transformer_depth: int = 1,
        use_new_attention_order: bool = False,
        context_dim: int | None = None,
        num_classes: int | str | None = None,
        adm_in_channels: int | None = None,
        vector_dim: int | None = None,
        use_checkpoint: bool = False,
        prediction: str = "eps",
    ) -> None:
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(
                f"unknown prediction {prediction!r}; expected one of {', '.join(PREDICTIONS)}"
            )
        if model_channels < 1:
            raise ValueError(f"model_channels must be >= 1, got {model_channels}")
        if not channel_mult or any(m < 1 for m in channel_mult):
            raise ValueError(
                f"channel_mult={list(channel_mult)}: give one multiplier >= 1 per level "
                "(level i has channel_mult[i] * model_channels channels)"
            )
        if _unset(num_heads) and _unset(num_head_channels):
            raise ValueError("set either num_heads or num_head_channels of the UNet")
        if context_dim is not None and not use_spatial_transformer:
            raise ValueError(
                f"context_dim={context_dim} needs use_spatial_transformer=True "
                "(only the SpatialTransformer has cross-attention)"
            )
        num_classes, vector_dim = self._resolve_vector(num_classes, adm_in_channels, vector_dim)

        self.prediction = prediction
        self.in_channels, self.out_channels = in_channels, out_channels
        self.context_dim, self.vector_dim = context_dim, vector_dim
        self.model_channels = model_channels
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        attention_resolutions = set(attention_resolutions)

        def heads_and_dim(channels: int) -> tuple[int, int]:
            if _unset(num_head_channels):
                heads = num_heads
                if channels % heads:
                    raise ValueError(f"{channels} UNet channels are not divisible by num_heads={heads}")
                return heads, channels // heads
            if channels % num_head_channels:
                raise ValueError(
                    f"{channels} UNet channels are not divisible by num_head_channels={num_head_channels}"
                )
            return channels // num_head_channels, num_head_channels

        def attention_layer(channels: int) -> nn.Module:
            heads, dim_head = heads_and_dim(channels)
            if use_spatial_transformer:
                return SpatialTransformer(
                    channels,
                    heads=heads,
                    dim_head=dim_head,
                    depth=transformer_depth,
                    context_dim=context_dim,
                    dropout=dropout,
                    use_checkpoint=use_checkpoint,
                )
            return AttentionBlock(
                channels,
                heads=heads,
                use_new_attention_order=use_new_attention_order,
                use_checkpoint=use_checkpoint,
            )

        time_embed_dim = model_channels * 4

        def res_block(channels: int, out: int | None = None, **updown: bool) -> ResBlock:
            return ResBlock(
                channels,
                emb_channels=time_embed_dim,
                dropout=dropout,
                out_channels=out,
                use_scale_shift_norm=use_scale_shift_norm,
                use_checkpoint=use_checkpoint,
                **updown,
            )

        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim),
            nn.SiLU(),
            nn.Linear(time_embed_dim, time_embed_dim),
        )
        if num_classes == "sequential":
            self.label_emb: nn.Module = nn.Sequential(
                nn.Sequential(
                    nn.Linear(vector_dim, time_embed_dim),
                    nn.SiLU(),
                    nn.Linear(time_embed_dim, time_embed_dim),
                )
            )
        elif num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)

        # the encoder: a stem conv, then per level num_res_blocks ResBlocks (+ attention)
        # and, except at the last level, a 2x downsampling; every output is a skip
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))]
        )
        skip_channels = [model_channels]
        channels, factor = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res_block(channels, mult * model_channels)]
                channels = mult * model_channels
                if factor in attention_resolutions:
                    layers.append(attention_layer(channels))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(channels)
            if level != len(channel_mult) - 1:
                down = (
                    res_block(channels, down=True)
                    if resblock_updown
                    else Downsample(channels, use_conv=conv_resample)
                )
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_channels.append(channels)
                factor *= 2

        self.middle_block = TimestepEmbedSequential(
            res_block(channels), attention_layer(channels), res_block(channels)
        )

        # the decoder mirrors it with one more ResBlock per level, each eating a skip
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res_block(channels + skip_channels.pop(), model_channels * mult)]
                channels = model_channels * mult
                if factor in attention_resolutions:
                    layers.append(attention_layer(channels))
                if level and i == num_res_blocks:
                    layers.append(
                        res_block(channels, up=True)
                        if resblock_updown
                        else Upsample(channels, use_conv=conv_resample)
                    )
                    factor //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(channels),
            nn.SiLU(),
            zero_module(nn.Conv2d(model_channels, out_channels, 3, padding=1)),
        )

    @staticmethod
    def _resolve_vector(
        num_classes: int | str | None, adm_in_channels: int | None, vector_dim: int | None
    ) -> tuple[int | str | None, int | None]:
        """(num_classes, vector_dim) after reconciling the three ways of saying them."""
        if num_classes is None:
            return (vector_dim, vector_dim) if vector_dim is not None else (None, None)
        if num_classes == "sequential":
            width = adm_in_channels if adm_in_channels is not None else vector_dim
            if width is None:
                raise ValueError("num_classes='sequential' needs adm_in_channels (or vector_dim)")
            if vector_dim is not None and vector_dim != width:
                raise ValueError(
                    f"UNet adm_in_channels={width} disagrees with vector_dim={vector_dim} "
                    "(the conditioner's vector width)"
                )
            return num_classes, width
        if isinstance(num_classes, str):
            raise ValueError(
                f"unknown num_classes {num_classes!r}; expected an int, 'sequential' or null"
            )
        if vector_dim is not None and vector_dim != num_classes:
            raise ValueError(
                f"UNet num_classes={num_classes} disagrees with vector_dim={vector_dim} "
                "(the class condition is a one-hot vector of num_classes entries)"
            )
        return num_classes, num_classes

    def forward(self, z_t: Tensor, t: Tensor, cond: Mapping[str, Tensor] | None = None) -> Tensor:
        """Predict ``self.prediction`` for ``z_t`` (B x c x h x w) at timesteps ``t`` (B,).

        ``cond`` may hold ``crossattn`` (B x M x context_dim), ``concat`` (B x C' x h x w)
        and ``vector`` (B x vector_dim), as declared at construction.
        """
        cond = {} if cond is None else cond
        x = self.concat_condition(z_t, cond)
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"UNet expects {self.in_channels} input channels (latent + concat condition) "
                f"but got {x.shape[1]} (z_t {tuple(z_t.shape)}, concat "
                f"{None if cond.get('concat') is None else tuple(cond['concat'].shape)})"
            )
        batch = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(batch)
        context = self._context(cond, batch)

        dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(dtype))
        if self.num_classes is not None:
            emb = emb + self._vector_embedding(cond, batch).to(dtype)
        elif cond.get("vector") is not None:
            raise ValueError(
                "cond['vector'] was given but this UNet takes no vector condition "
                "(num_classes and vector_dim are null)"
            )

        h, skips = x, []
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            # an upsampling block ends at the next skip's size: odd sides (a latent of 20 / 4 = 5) too
            h = block(h, emb, context, skips[-1].shape[-2:] if skips else None)
        return self.out(h)

    def _context(self, cond: Mapping[str, Tensor], batch: int) -> Tensor | None:
        context = cond.get("crossattn")
        if self.context_dim is None:
            if context is not None:
                raise ValueError(
                    "cond['crossattn'] was given but this UNet has no cross-attention "
                    "(context_dim is null)"
                )
            return None
        if context is None:
            raise ValueError(
                f"this UNet cross-attends to cond['crossattn'] (context_dim={self.context_dim}) "
                "but the condition has no 'crossattn'"
            )
        if context.ndim != 3 or context.shape[0] != batch or context.shape[2] != self.context_dim:
            raise ValueError(
                f"cond['crossattn'] must be B x M x {self.context_dim} with B={batch}, "
                f"got {tuple(context.shape)}"
            )
        return context

    def _vector_embedding(self, cond: Mapping[str, Tensor], batch: int) -> Tensor:
        vector = cond.get("vector")
        if vector is None:
            raise ValueError(
                f"this UNet is class/vector conditional (vector_dim={self.vector_dim}) "
                "but the condition has no 'vector'"
            )
        if vector.shape != (batch, self.vector_dim):
            raise ValueError(
                f"cond['vector'] must be B x {self.vector_dim} with B={batch}, "
                f"got {tuple(vector.shape)}"
            )
        if isinstance(self.label_emb, nn.Embedding):
            # one-hot @ table == table[label]; an all-zero row is the null class
            return F.linear(vector.to(self.label_emb.weight.dtype), self.label_emb.weight.t())
        return self.label_emb(vector)
