"""Timestep spacings against the formulas of the codes they come from."""

from __future__ import annotations

import pytest

from ldmkit.diffusion import SPACINGS, NoiseSchedule, timestep_pairs


def timesteps(steps: int, spacing: str, T: int = 1000) -> list[int]:
    return [t for t, _ in timestep_pairs(T, steps, spacing)]


def test_paper_is_make_ddim_timesteps_uniform():
    """The paper's ``range(0, T, T // S) + 1``: 1, 21, ..., 981 for 50 steps of 1000."""
    assert timesteps(50, "paper") == list(range(981, 0, -20))
    # 30 does not divide 1000: T // S = 33 gives 31 steps, 1 .. 991, as in the paper's code
    assert timesteps(30, "paper") == list(range(991, 0, -33))
    assert timesteps(1, "paper") == [1]


def test_quad_is_make_ddim_timesteps_quad():
    """``int(linspace(0, sqrt(0.8 T), S)^2) + 1``: 801 down to 1, dense near t = 0."""
    ts = timesteps(10, "quad")
    # (k sqrt(800) / 9)^2 = 800 k^2 / 81 for k = 9 .. 0, truncated, plus one
    assert ts == [801, 633, 484, 356, 247, 159, 89, 40, 10, 1]
    assert timesteps(50, "quad")[:2] == [801, 768] and timesteps(50, "quad")[-3:] == [2, 1, 1]


def test_trailing_and_leading_are_diffusers():
    assert timesteps(50, "trailing") == list(range(999, 0, -20))  # 999, 979, ..., 19
    assert timesteps(50, "leading") == list(range(980, -1, -20))  # 980, 960, ..., 0
    assert timesteps(3, "trailing") == [999, 666, 332]  # round(1000 - k 1000 / 3) - 1


def test_linspace_is_rounded_linspace():
    assert timesteps(5, "linspace") == [999, 749, 500, 250, 0]
    assert timesteps(1000, "linspace") == list(range(999, -1, -1))


@pytest.mark.parametrize("spacing", sorted(SPACINGS))
def test_each_step_goes_to_the_next_and_the_end_is_stated(spacing):
    pairs = timestep_pairs(1000, 20, spacing)
    assert [t_prev for _, t_prev in pairs[:-1]] == [t for t, _ in pairs[1:]]
    # the paper's spacings end at alpha_bar_0 (t = 0), the others clean (t = -1: alpha_bar = 1)
    assert pairs[-1][1] == (0 if spacing in ("paper", "quad") else -1)
    assert all(0 <= t < 1000 for t, _ in pairs)
    assert all(a >= b for (a, _), (b, _) in zip(pairs, pairs[1:], strict=False))


def test_schedule_spaced_timesteps_takes_a_spacing():
    assert NoiseSchedule().spaced_timesteps(50, "paper").tolist() == list(range(981, 0, -20))


def test_bad_spacing_and_steps_are_named():
    with pytest.raises(ValueError, match=r"unknown timestep spacing 'uniform'; expected one of \["):
        timestep_pairs(1000, 10, "uniform")
    with pytest.raises(ValueError, match=r"steps must be in \[1, 1000\], got 0"):
        timestep_pairs(1000, 0, "paper")


def test_samplers_take_spacing_as_an_option():
    from ldmkit_samplers import DDIMSampler, PLMSSampler

    assert PLMSSampler().spacing == "paper" and DDIMSampler().spacing == "linspace"
    assert DDIMSampler(spacing="trailing").timesteps(NoiseSchedule(), 50)[0] == (999, 979)
    with pytest.raises(ValueError, match="unknown timestep spacing"):
        DDIMSampler(spacing="karras")
