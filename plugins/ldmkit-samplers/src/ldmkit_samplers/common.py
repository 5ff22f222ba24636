"""Pieces every discrete-time sampler here shares."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ldmkit.interfaces import Callback, DenoiseFn

# (z_t, eps_hat, x0_hat, alpha_bar_t, alpha_bar_prev, t_prev) -> z_prev
Step = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, int], Tensor]


def fresh_noise(like: Tensor, generator: torch.Generator | None) -> Tensor:
    """N(0, I) shaped like ``like``, drawn from ``generator`` on the generator's device."""
    device = generator.device if generator is not None else like.device
    noise = torch.randn(like.shape, generator=generator, device=device, dtype=like.dtype)
    return noise.to(like.device)


def step_pairs(schedule: Any, steps: int) -> list[tuple[int, int]]:
    """``(t, t_prev)`` for each step, from T-1 down to 0; the last ``t_prev`` is -1."""
    timesteps = [int(t) for t in schedule.spaced_timesteps(steps)]
    return list(zip(timesteps, timesteps[1:] + [-1], strict=True))


def check_mask(mask: Tensor | None, known: Tensor | None, z: Tensor) -> None:
    if mask is None and known is None:
        return
    if mask is None or known is None:
        raise ValueError("inpainting needs both mask and known")
    if known.shape != z.shape:
        raise ValueError(f"known latent shape {tuple(known.shape)} != noise shape {tuple(z.shape)}")
    try:
        torch.broadcast_shapes(mask.shape, z.shape)
    except RuntimeError as err:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to {tuple(z.shape)}") from err


def paste_known(
    z: Tensor,
    t_prev: int,
    schedule: Any,
    mask: Tensor | None,
    known: Tensor | None,
    generator: torch.Generator | None,
) -> Tensor:
    """Keep the known region at the noise level of ``t_prev`` (mask 1 = generate)."""
    if mask is None:
        return z
    if t_prev < 0:
        noisy_known = known
    else:
        t = torch.full((z.shape[0],), t_prev, device=z.device, dtype=torch.long)
        noisy_known = schedule.q_sample(known, t, fresh_noise(z, generator))
    return mask * z + (1 - mask) * noisy_known


def run_chain(
    step: Step,
    denoise: DenoiseFn,
    schedule: Any,
    noise: Tensor,
    steps: int,
    *,
    generator: torch.Generator | None,
    callback: Callback | None,
    mask: Tensor | None,
    known: Tensor | None,
) -> Tensor:
    """The loop the samplers here share: from T-1 down to 0, predict eps and x0, let
    ``step`` move z to the previous timestep, keep the known region, report progress."""
    check_mask(mask, known, noise)
    z = noise
    for i, (t, t_prev) in enumerate(step_pairs(schedule, steps)):
        tt = torch.full((z.shape[0],), t, device=z.device, dtype=torch.long)
        eps = denoise(z, tt)
        x0 = schedule.predict_x0(z, tt, eps)
        a, a_prev = schedule.alpha_bar_at(t, z), schedule.alpha_bar_at(t_prev, z)
        z = step(z, eps, x0, a, a_prev, t_prev)
        z = paste_known(z, t_prev, schedule, mask, known, generator)
        if callback is not None:
            callback({"i": i, "t": t, "z": z, "x0": x0})
    return z
