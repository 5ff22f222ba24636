"""Encoder and decoder of the first stage: the convolutional autoencoder of Esser et al.
(taming transformers, 2021) that Rombach et al. 2022 (Sec. 3.1, App. G) use for both the
KL-reg and the VQ-reg models.

Parameter names follow the original LDM code (``encoder.down.0.block.0.norm1.weight``,
``decoder.mid.attn_1.q.weight``...), so its checkpoints map onto these modules by name.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ldmkit.nn.attention import attention


def normalize(channels: int, groups: int) -> nn.GroupNorm:
    if channels % groups:
        raise ValueError(
            f"norm_groups={groups} does not divide {channels} channels; choose ch and "
            f"norm_groups so that every ch * ch_mult[i] is a multiple of norm_groups"
        )
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice with a (1×1-projected where needed) skip connection."""

    def __init__(self, in_channels: int, out_channels: int, *, dropout: float, norm_groups: int):
        super().__init__()
        self.norm1 = normalize(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = normalize(out_channels, norm_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = (
            nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions, ``softmax(QK^T/sqrt(C))V``."""

    def __init__(self, channels: int, *, norm_groups: int):
        super().__init__()
        self.norm = normalize(channels, norm_groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        tokens = rearrange(self.norm(x), "b c h w -> b (h w) c").contiguous()
        # the 1×1 convs are linear maps over tokens: one fused matmul for q, k, v
        weight = torch.cat([self.q.weight, self.k.weight, self.v.weight]).flatten(1)
        bias = torch.cat([self.q.bias, self.k.bias, self.v.bias])
        q, k, v = (t.unsqueeze(1).contiguous() for t in F.linear(tokens, weight, bias).chunk(3, dim=-1))
        # through ldmkit's backend choice (attention.backend): `chunked` caps the memory of
        # the decoder's full-resolution attention on large latents
        h = attention(q, k, v).squeeze(1)
        h = F.linear(h, self.proj_out.weight.flatten(1), self.proj_out.bias)
        # a view with channels-last strides: the layout the convolutions run in (see Encoder)
        return x + rearrange(h, "b (h w) c -> b c h w", h=height, w=width)


class Downsample(nn.Module):
    """Stride-2 3×3 conv; the asymmetric (0, 1, 0, 1) pad keeps H/2 exact for even H."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour ×2 followed by a 3×3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: ResNet blocks, optional attention after each, a resampler."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()


ATTN_TYPES = ("vanilla", "none")


def make_attn(channels: int, *, norm_groups: int, attn_type: str = "vanilla") -> nn.Module:
    """The paper's ``make_attn``: self-attention (``vanilla``), or none (``nn.Identity``, the
    paper's ``attn_type: none``, e.g. vq-f4-noattn)."""
    if attn_type not in ATTN_TYPES:
        raise ValueError(f"unknown attn_type {attn_type!r}; expected one of {ATTN_TYPES}")
    return AttnBlock(channels, norm_groups=norm_groups) if attn_type == "vanilla" else nn.Identity()


class _Mid(nn.Module):
    def __init__(self, channels: int, *, dropout: float, norm_groups: int, attn_type: str = "vanilla"):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout=dropout, norm_groups=norm_groups)
        self.attn_1 = make_attn(channels, norm_groups=norm_groups, attn_type=attn_type)
        self.block_2 = ResnetBlock(channels, channels, dropout=dropout, norm_groups=norm_groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


def _check_architecture(
    ch_mult: Sequence[int], num_res_blocks: int, resolution: int, attn_resolutions: Sequence[int] = ()
) -> None:
    if len(ch_mult) < 1:
        raise ValueError("ch_mult must have at least one entry (f = 2^(len(ch_mult)-1))")
    if any(m < 1 for m in ch_mult):
        raise ValueError(
            f"ch_mult={list(ch_mult)}: every multiplier must be >= 1 (level i has ch * ch_mult[i] channels)"
        )
    if num_res_blocks < 1:
        raise ValueError(f"num_res_blocks must be >= 1, got {num_res_blocks}")
    if resolution % 2 ** (len(ch_mult) - 1):
        raise ValueError(
            f"resolution={resolution} is not divisible by f={2 ** (len(ch_mult) - 1)} "
            f"(len(ch_mult)={len(ch_mult)})"
        )
    sizes = [resolution // 2**level for level in range(len(ch_mult))]
    for size in attn_resolutions:  # one no level has would add attention nowhere, silently
        if size not in sizes:
            raise ValueError(
                f"attn_resolutions={list(attn_resolutions)}: {size} is not a feature-map size; for "
                f"resolution={resolution} and ch_mult={tuple(ch_mult)} they are {', '.join(map(str, sizes))}"
            )


class Encoder(nn.Module):
    """x: B×in_channels×H×W -> B×(2·)z_channels×H/f×W/f with f = 2^(len(ch_mult)-1).

    ``attn_resolutions`` lists feature-map sizes (for an input of ``resolution`` pixels,
    the paper's convention) at which every ResNet block is followed by self-attention.
    """

    def __init__(
        self,
        *,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        in_channels: int,
        z_channels: int,
        double_z: bool,
        resolution: int,
        dropout: float,
        norm_groups: int,
        attn_type: str = "vanilla",
    ):
        super().__init__()
        _check_architecture(ch_mult, num_res_blocks, resolution, attn_resolutions)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        in_mult = (1, *ch_mult)
        self.down = nn.ModuleList()
        curr_res = resolution
        block_out = ch
        for level, mult in enumerate(ch_mult):
            block_in, block_out = ch * in_mult[level], ch * mult
            down = _Level()
            for _ in range(num_res_blocks):
                down.block.append(
                    ResnetBlock(block_in, block_out, dropout=dropout, norm_groups=norm_groups)
                )
                block_in = block_out
                if curr_res in attn_resolutions:
                    down.attn.append(make_attn(block_in, norm_groups=norm_groups, attn_type=attn_type))
            if level != len(ch_mult) - 1:
                down.downsample = Downsample(block_in)
                curr_res //= 2
            self.down.append(down)
        self.mid = _Mid(block_out, dropout=dropout, norm_groups=norm_groups, attn_type=attn_type)
        self.norm_out = normalize(block_out, norm_groups)
        self.conv_out = nn.Conv2d(block_out, (2 if double_z else 1) * z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        # channels-last activations: oneDNN (CPU) and cuDNN convolutions run faster on them
        h = self.conv_in(x.contiguous(memory_format=torch.channels_last))
        for down in self.down:
            for i, block in enumerate(down.block):
                h = block(h)
                if len(down.attn) > 0:
                    h = down.attn[i](h)
            if hasattr(down, "downsample"):
                h = down.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h))).contiguous()


class Decoder(nn.Module):
    """z: B×z_channels×h×w -> B×out_ch×h·f×w·f (the mirror of :class:`Encoder`, with
    ``num_res_blocks + 1`` ResNet blocks per level)."""

    def __init__(
        self,
        *,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        out_ch: int,
        z_channels: int,
        resolution: int,
        dropout: float,
        norm_groups: int,
        attn_type: str = "vanilla",
    ):
        super().__init__()
        _check_architecture(ch_mult, num_res_blocks, resolution, attn_resolutions)
        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = _Mid(block_in, dropout=dropout, norm_groups=norm_groups, attn_type=attn_type)
        levels: list[_Level] = []
        for level in reversed(range(len(ch_mult))):
            block_out = ch * ch_mult[level]
            up = _Level()
            for _ in range(num_res_blocks + 1):
                up.block.append(
                    ResnetBlock(block_in, block_out, dropout=dropout, norm_groups=norm_groups)
                )
                block_in = block_out
                if curr_res in attn_resolutions:
                    up.attn.append(make_attn(block_in, norm_groups=norm_groups, attn_type=attn_type))
            if level != 0:
                up.upsample = Upsample(block_in)
                curr_res *= 2
            levels.insert(0, up)  # indexed by level, as in the original checkpoints
        self.up = nn.ModuleList(levels)
        self.norm_out = normalize(block_in, norm_groups)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z.contiguous(memory_format=torch.channels_last)))
        for up in reversed(self.up):
            for i, block in enumerate(up.block):
                h = block(h)
                if len(up.attn) > 0:
                    h = up.attn[i](h)
            if hasattr(up, "upsample"):
                h = up.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h))).contiguous()


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = ["ATTN_TYPES", "AttnBlock", "Decoder", "Downsample", "Encoder", "ResnetBlock", "Upsample", "count_parameters", "make_attn"]
