"""The UNet's blocks: timestep-conditioned ResBlock, resampling, legacy spatial attention.

These follow the time-conditional UNet of the LDM paper (Rombach et al. 2022, App. E.1),
which is the ADM UNet of Dhariwal & Nichol 2021 with SpatialTransformers. Attribute
names and ``nn.Sequential`` indices match ``ldm.modules.diffusionmodules.openaimodel``
of the reference code (``in_layers.{0,2}``, ``emb_layers.1``, ``out_layers.{0,3}``,
``skip_connection``, ``op``, ``conv``, ``qkv``, ``proj_out``), so its state_dict loads.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ldmkit.nn import SpatialTransformer, maybe_checkpoint, normalization, zero_module
from ldmkit.nn.attention import attention

__all__ = ["AttentionBlock", "Downsample", "ResBlock", "TimestepEmbedSequential", "Upsample"]


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling (to ``size`` when given: the skip an odd side meets),
    then (``use_conv``) a 3x3 convolution."""

    def __init__(self, channels: int, *, use_conv: bool, out_channels: int | None = None) -> None:
        super().__init__()
        out_channels = out_channels or channels
        if not use_conv and out_channels != channels:
            raise ValueError("Upsample without a convolution cannot change the channel count")
        self.channels = channels
        if use_conv:
            self.conv = nn.Conv2d(channels, out_channels, 3, padding=1)
        else:
            self.conv = None

    def forward(self, x: Tensor, size: Sequence[int] | None = None) -> Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:  # diffusers' upsample_size: 2x of an odd side is one too many
            x = F.interpolate(x, size=tuple(size), mode="nearest")
        return x if self.conv is None else self.conv(x)


class Downsample(nn.Module):
    """2x downsampling: a stride-2 3x3 convolution (``use_conv``) or 2x2 average pooling."""

    def __init__(self, channels: int, *, use_conv: bool, out_channels: int | None = None) -> None:
        super().__init__()
        out_channels = out_channels or channels
        if use_conv:
            self.op: nn.Module = nn.Conv2d(channels, out_channels, 3, stride=2, padding=1)
        elif out_channels != channels:
            raise ValueError("Downsample without a convolution cannot change the channel count")
        else:
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class ResBlock(nn.Module):
    """Residual block conditioned on the timestep embedding (Ho et al. 2020; ADM).

    ``h = conv(SiLU(GN(x)))``; the embedding is added (``h + W e``) or, with
    ``use_scale_shift_norm``, applied FiLM-style to the second norm
    (``GN(h) * (1 + s) + b``); ``out = skip(x) + conv0(dropout(SiLU(...)))`` with a
    zero-initialised last convolution. ``up``/``down`` resample inside the block
    (``resblock_updown`` of the UNet): after the first norm+SiLU, before the first conv,
    and on the skip path, without a convolution (BigGAN-style).
    """

    def __init__(
        self,
        channels: int,
        *,
        emb_channels: int,
        dropout: float = 0.0,
        out_channels: int | None = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        use_checkpoint: bool = False,
        up: bool = False,
        down: bool = False,
    ) -> None:
        super().__init__()
        out_channels = out_channels or channels
        self.channels, self.out_channels = channels, out_channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint

        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.updown = up or down
        if up:
            self.h_upd: nn.Module = Upsample(channels, use_conv=False)
            self.x_upd: nn.Module = Upsample(channels, use_conv=False)
        elif down:
            self.h_upd = Downsample(channels, use_conv=False)
            self.x_upd = Downsample(channels, use_conv=False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels),
        )
        self.out_layers = nn.Sequential(
            normalization(out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        if out_channels == channels:
            self.skip_connection: nn.Module = nn.Identity()
        elif use_conv:
            self.skip_connection = nn.Conv2d(channels, out_channels, 3, padding=1)
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor, size: Sequence[int] | None = None) -> Tensor:
        return maybe_checkpoint(self.use_checkpoint, self._forward, x, emb, size)

    def _forward(self, x: Tensor, emb: Tensor, size: Sequence[int] | None = None) -> Tensor:
        norm_in, _, conv_in = self.in_layers
        h = F.silu(norm_in(x))
        if isinstance(self.h_upd, Upsample):
            h, x = self.h_upd(h, size), self.x_upd(x, size)
        elif self.updown:
            h, x = self.h_upd(h), self.x_upd(x)
        h = conv_in(h)

        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        norm_out, _, dropout, conv_out = self.out_layers
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = torch.addcmul(shift, norm_out(h), 1 + scale)
        else:
            h = norm_out(h + emb_out)
        h = conv_out(dropout(F.silu(h)))
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Single-layer self-attention over pixels (ADM), used when ``use_spatial_transformer``
    is off (the paper's unconditional, inpainting and super-resolution models).

    ``qkv`` and ``proj_out`` are 1x1 Conv1d as in the reference code. The legacy channel
    order splits heads before q/k/v (``(heads, 3, ch)``); ``use_new_attention_order``
    splits q/k/v first (``(3, heads, ch)``).
    """

    def __init__(
        self,
        channels: int,
        *,
        heads: int,
        use_new_attention_order: bool = False,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"attention channels {channels} are not divisible by {heads} heads")
        self.heads = heads
        self.qkv_pattern = (
            "b (three h c) t -> three b h t c"
            if use_new_attention_order
            else "b (h three c) t -> three b h t c"
        )
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        return maybe_checkpoint(self.use_checkpoint, self._forward, x)

    def _forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        flat = x.flatten(2)
        q, k, v = rearrange(self.qkv(self.norm(flat)), self.qkv_pattern, three=3, h=self.heads)
        h = rearrange(attention(q, k, v), "b h t c -> b (h c) t")
        out = flat + self.proj_out(h)
        return rearrange(out, "b c (h w) -> b c h w", h=height, w=width)


class TimestepEmbedSequential(nn.Sequential):
    """A sequence of UNet layers; ResBlocks get the embedding, transformers the context."""

    def forward(  # type: ignore[override]
        self, x: Tensor, emb: Tensor, context: Tensor | None = None, size: Sequence[int] | None = None
    ) -> Tensor:
        """``size``: the output size of an upsampling layer (the next skip's), else 2x."""
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb, size)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x
