"""Small layers shared by the first-party networks (UNet, autoencoders).

They follow the conventions of the LDM reference code (CompVis, itself from OpenAI's
guided-diffusion) so that its checkpoints load into ldmkit modules unchanged:
GroupNorm with 32 groups computed in float32, zero-initialised output layers, and the
sinusoidal timestep embedding of Ho et al. 2020 / Vaswani et al. 2017 with cosines first.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "GroupNorm32",
    "maybe_checkpoint",
    "normalization",
    "timestep_embedding",
    "zero_module",
]

ModuleT = TypeVar("ModuleT", bound=nn.Module)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm whose statistics are float32 whatever the activation dtype.

    Half-precision statistics over large groups lose too much. On the CPU, a bf16/fp16 input
    in the standard (contiguous) layout goes to PyTorch's kernel as it is: that kernel
    accumulates the mean and variance in float32 and takes float32 affine parameters
    ("low-precision GroupNorm": the same result as the float32 round trip to one bf16 rounding
    step, 1.3-1.45x faster for the op and no two casts of the activation; forward and
    backward checked in tests/test_matrix_units.py). Elsewhere (CUDA, channels-last on the CPU,
    whose low-precision kernel is slow) the input is cast to float32 and the result back.
    float64 (a module moved to double) is normalised as it is.
    """

    # False: always the float32 round trip (the behaviour before the native CPU path)
    low_precision_on_cpu: bool = True

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype in (torch.float32, torch.float64):
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        if self.low_precision_on_cpu and x.device.type == "cpu" and x.is_contiguous():
            weight, bias = self.weight, self.bias
            if weight is not None and bias is not None and weight.dtype != bias.dtype:
                weight, bias = weight.float(), bias.float()
            return F.group_norm(x, self.num_groups, weight, bias, self.eps)
        # the affine parameters join the float32 computation (a module cast to half has them in half)
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


def normalization(channels: int, *, groups: int = 32, eps: float = 1e-5) -> GroupNorm32:
    """The standard norm layer: ``GroupNorm32(groups, channels)`` with affine params.

    :raises ValueError: when ``channels`` is not a multiple of ``groups``.
    """
    if channels % groups:
        raise ValueError(
            f"GroupNorm needs channels divisible by {groups} groups, got {channels} channels"
        )
    return GroupNorm32(groups, channels, eps=eps)


def zero_module(module: ModuleT) -> ModuleT:
    """Zero every parameter of ``module`` (residual branches start as the identity)."""
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.zero_()
    return module


def timestep_embedding(timesteps: Tensor, dim: int, *, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embeddings ``[cos(t w_i), sin(t w_i)]``, ``w_i = max_period^(-i/half)``.

    :param timesteps: shape ``B``, integer or fractional.
    :param dim: embedding width; an odd ``dim`` gets a trailing zero column.
    :returns: ``B x dim`` float32.
    """
    half = dim // 2
    exponents = torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    frequencies = torch.exp(-math.log(max_period) * exponents)
    angles = timesteps.float()[:, None] * frequencies[None]
    embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


def maybe_checkpoint(enabled: bool, function: Callable[..., Tensor], *args) -> Tensor:
    """``function(*args)``, recomputed in backward instead of stored when ``enabled``.

    Gradient checkpointing trades one extra forward per block for activation memory;
    it is skipped when no graph is being built.
    """
    if enabled and torch.is_grad_enabled():
        return checkpoint(function, *args, use_reentrant=False)
    return function(*args)
