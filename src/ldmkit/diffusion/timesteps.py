"""Which timesteps a sampler visits: the spacing options (:data:`SPACINGS`, and the sigma
samplers' :data:`SIGMA_SPACINGS`), the ``(t, t_prev)`` step plan (:func:`timestep_pairs`) and
img2img's share of it (:func:`truncate_for_strength`).

Plain arithmetic on integers: it imports nothing of ldmkit, so the noise schedule, the
samplers' bases and the conformance tests all build on it (``ldmkit.diffusion`` and
``ldmkit.diffusion.sampling`` re-export every name).
"""

from __future__ import annotations

import numpy as np

__all__ = ["SIGMA_SPACINGS", "SPACINGS", "check_spacing", "timestep_pairs", "truncate_for_strength"]

# name -> one-line description (docs and error messages)
SPACINGS = {
    "linspace": "linspace(T-1, 0, S) rounded (the sigma samplers: fractional, k-diffusion's "
    "get_sigmas); the last step goes to alpha_bar = 1",
    "paper": "the paper's DDIM/PLMS: range(0, T, T // S) + 1; the last step goes to alpha_bar_0",
    "quad": "the paper's ddim_discretize='quad': linspace(0, sqrt(0.8 T), S)^2 + 1; ends at alpha_bar_0",
    "leading": "diffusers' leading: arange(S) * (T // S) (steps_offset 0); ends at alpha_bar = 1",
    "trailing": "diffusers' trailing: round(arange(T, 0, -T / S)) - 1; ends at alpha_bar = 1",
}
# grids of noise levels between the schedule's ends, not of its timesteps: the sigma samplers'
SIGMA_SPACINGS = {
    "karras": "Karras et al. 2022, eq. 5 (rho = 7) from sigma_max to sigma_min, then 0",
    "exponential": "log-linear from sigma_max to sigma_min, then 0",
}


def check_spacing(spacing: str) -> str:
    if spacing not in SPACINGS:
        raise ValueError(
            f"unknown timestep spacing {spacing!r}; expected one of {sorted(SPACINGS)}"
        )
    return spacing


def timestep_pairs(
    num_timesteps: int, steps: int, spacing: str = "linspace"
) -> list[tuple[int, int]]:
    """``(t, t_prev)`` for each of the ``steps`` steps, from high noise to low.

    ``t_prev = -1`` means alpha_bar = 1 (clean). ``paper`` and ``quad`` follow the paper's
    ``make_ddim_timesteps`` literally: their last step goes to ``t = 0`` (alpha_bar_0, not 1);
    ``paper`` gives ``len(range(0, T, T // S))`` steps, which is more than S when S does not
    divide T (30 steps of T = 1000 give 31), and ``quad`` can repeat a small timestep, as the
    paper's code does. Where the paper's list reaches ``T`` (T // S divides T - 1: 3, 9, 333 or
    over 500 steps of 1000), past the schedule's last timestep (the paper's sampler stops there
    with an IndexError), it starts at ``T - 1``; over T / 2 steps, where ``T - 1`` follows, one
    step fewer (999 steps of 1000 for 999 or 1000 asked).
    """
    check_spacing(spacing)
    T, S = int(num_timesteps), int(steps)
    if not 1 <= S <= T:
        raise ValueError(f"steps must be in [1, {T}], got {S}")
    end = -1
    if spacing == "linspace":
        ts = np.round(np.linspace(T - 1, 0, S)).astype(np.int64)
    elif spacing == "paper":
        ts = (np.asarray(list(range(0, T, T // S))) + 1)[::-1]
        if ts[0] == T and len(ts) > 1 and ts[1] == T - 1:  # T is past the schedule (made T - 1 below)
            ts = ts[1:]  # T - 1 is the next step already: no step from T - 1 to T - 1
        end = 0
    elif spacing == "quad":
        ts = ((np.linspace(0, np.sqrt(T * 0.8), S)) ** 2).astype(np.int64)[::-1] + 1
        end = 0
    elif spacing == "leading":
        ts = (np.arange(0, S) * (T // S)).round().astype(np.int64)[::-1]
    else:  # trailing
        ts = np.round(np.arange(T, 0, -T / S)).astype(np.int64) - 1
    ts = [min(int(t), T - 1) for t in ts]
    return list(zip(ts, ts[1:] + [end], strict=True))


def truncate_for_strength(steps: list, strength: float) -> list:
    """img2img / SDEdit (Meng et al. 2022): keep the last ``int(len(steps) * strength)`` steps
    (diffusers' convention); the start latent is noised to the first kept step's level."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    keep = min(int(len(steps) * strength), len(steps))
    return steps[len(steps) - keep :] if keep else []
