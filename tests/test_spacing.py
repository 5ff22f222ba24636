"""Timestep spacings against the formulas of the codes they come from."""

from __future__ import annotations

import numpy as np
import pytest

from ldmkit.diffusion import SPACINGS, DiscreteSampler, NoiseSchedule, SigmaSampler, timestep_pairs


def timesteps(steps: int, spacing: str, T: int = 1000) -> list[int]:
    return [t for t, _ in timestep_pairs(T, steps, spacing)]


def test_paper_is_make_ddim_timesteps_uniform():
    """The paper's ``range(0, T, T // S) + 1``: 1, 21, ..., 981 for 50 steps of 1000."""
    assert timesteps(50, "paper") == list(range(981, 0, -20))
    # 30 does not divide 1000: T // S = 33 gives 31 steps, 1 .. 991, as in the paper's code
    assert timesteps(30, "paper") == list(range(991, 0, -33))
    assert timesteps(1, "paper") == [1]


@pytest.mark.parametrize("steps", [3, 9, 333, 500, 501, 999, 1000])
def test_paper_steps_neither_past_the_schedule_nor_in_place(steps):
    """``range(0, T, T // S) + 1`` reaches T = 1000 when T // S divides 999 (past the schedule:
    the paper's DDIMSampler stops with an IndexError); ldmkit starts at 999 there, and at 999 or
    1000 steps (T // S = 1: 1000, 999, ...) that made a first step from 999 to 999."""
    paper = (np.arange(0, 1000, 1000 // steps) + 1)[::-1].tolist()  # make_ddim_timesteps("uniform")
    past = paper[0] == 1000
    expected = ([999] if past and paper[1] != 999 else []) + paper[past:]
    pairs = timestep_pairs(1000, steps, "paper")
    assert [t for t, _ in pairs] == expected
    assert all(t > t_prev for t, t_prev in pairs) and pairs[-1] == (1, 0)
    if steps > 500:
        assert expected == list(range(999, 0, -1))


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
    with pytest.raises(ValueError, match="DDIMSampler: unknown timestep spacing 'uniform'"):
        DDIMSampler(spacing="uniform")


# -- the sigma samplers' noise levels: k-diffusion's grids ----------------------------------
def _first_party(base: type) -> tuple[str, ...]:
    import ldmkit_samplers

    return tuple(
        n for n in ldmkit_samplers.__all__ if issubclass(getattr(ldmkit_samplers, n), base)
    )


SIGMA_SAMPLERS = _first_party(SigmaSampler)
DISCRETE_SAMPLERS = _first_party(DiscreteSampler)


def sampler(name: str, **kwargs):
    import ldmkit_samplers

    return getattr(ldmkit_samplers, name)(**kwargs)


def table_sigmas(schedule: NoiseSchedule) -> np.ndarray:
    a = schedule.alphas_cumprod.numpy()
    return np.sqrt((1 - a) / a)


def kdiffusion_get_sigmas(schedule: NoiseSchedule, n: int) -> np.ndarray:
    """k-diffusion's ``DiscreteSchedule.get_sigmas(n)``, written again: log-sigma interpolated
    linearly at the fractional timesteps ``linspace(T - 1, 0, n)``, then 0."""
    log_sigmas = np.log(table_sigmas(schedule))
    t = np.linspace(len(log_sigmas) - 1, 0, n)
    return np.append(np.exp(np.interp(t, np.arange(len(log_sigmas)), log_sigmas)), 0.0)


@pytest.mark.parametrize("name", SIGMA_SAMPLERS)
@pytest.mark.parametrize("steps", [7, 20, 50, 1])
def test_sigma_samplers_linspace_is_kdiffusions_get_sigmas(name, steps):
    """999 / (S - 1) is not whole for 7, 20 or 50 steps: rounding the timesteps would move
    every inner level off k-diffusion's grid (at 20 steps by up to 0.5 of a timestep)."""
    schedule = NoiseSchedule()
    got = sampler(name, steps=steps, spacing="linspace").sigmas(schedule)
    np.testing.assert_allclose(got, kdiffusion_get_sigmas(schedule, steps), rtol=1e-12, atol=0)


# Printed by plugins/ldmkit-samplers/tests/fixtures/make_kdiffusion_reference.py: k-diffusion
# 0.1.1.post1's CompVisDenoiser.get_sigmas(7), get_sigmas_karras(7, sigma_min, sigma_max) and
# get_sigmas_exponential(7, ...) for the paper's linear schedule, float64.
KDIFFUSION_7_STEPS = {
    "linspace": [14.614641229333637, 5.948899190973973, 2.9183071154268285, 1.6155802601603273,
                 0.9323579668348474, 0.4935517203201724, 0.029167158151720367, 0.0],
    "karras": [14.614641229333643, 7.094410691754973, 3.168603072959619, 1.274100208978096,
               0.44691820937343935, 0.13030758649055035, 0.02916715815172038, 0.0],
    "exponential": [14.614641229333637, 5.185681247582629, 1.8400239581355944, 0.6528916847890062,
                    0.23166413142714898, 0.08220087809395096, 0.029167158151720367, 0.0],
}  # fmt: skip


@pytest.mark.parametrize("spacing", sorted(KDIFFUSION_7_STEPS))
def test_sigma_grids_equal_kdiffusions_own(spacing):
    got = sampler("EulerSampler", steps=7, spacing=spacing).sigmas(NoiseSchedule())
    # 1e-7: k-diffusion's t_to_sigma casts t to float32
    np.testing.assert_allclose(got, KDIFFUSION_7_STEPS[spacing], rtol=1e-7, atol=0)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("steps", [2, 10, 25])
def test_karras_and_exponential_are_their_closed_forms(kind, steps):
    """Karras et al. 2022, eq. 5 with rho = 7, and log-linear, between the schedule's ends
    (sigma_max = sigma_{T-1}, sigma_min = sigma_0, as k-diffusion's CompVisDenoiser), then 0."""
    schedule = NoiseSchedule(kind=kind)
    sigmas = table_sigmas(schedule)
    s_min, s_max, rho = sigmas[0], sigmas[-1], 7.0
    i = np.arange(steps)
    karras = (
        s_max ** (1 / rho) + i / (steps - 1) * (s_min ** (1 / rho) - s_max ** (1 / rho))
    ) ** rho
    exponential = np.exp(np.log(s_max) + i / (steps - 1) * (np.log(s_min) - np.log(s_max)))
    for name in SIGMA_SAMPLERS:
        for spacing, expected in (("karras", karras), ("exponential", exponential)):
            got = sampler(name, steps=steps, spacing=spacing).sigmas(schedule)
            np.testing.assert_allclose(got, np.append(expected, 0.0), rtol=1e-12, atol=0)


def test_one_step_grids_go_from_sigma_max_to_zero():
    schedule = NoiseSchedule()
    s_max = table_sigmas(schedule)[-1]
    for spacing in ("linspace", "karras", "exponential"):
        got = sampler("HeunSampler", steps=1, spacing=spacing).sigmas(schedule)
        np.testing.assert_allclose(got, [s_max, 0.0], rtol=1e-12)


@pytest.mark.parametrize("name", DISCRETE_SAMPLERS)
@pytest.mark.parametrize("spacing", ["karras", "exponential"])
def test_discrete_samplers_refuse_sigma_grids_in_one_line(name, spacing):
    with pytest.raises(ValueError) as info:
        sampler(name, spacing=spacing)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{name} takes no spacing {spacing!r}"), message
    assert message.endswith("expected one of ['leading', 'linspace', 'paper', 'quad', 'trailing']")


def test_discrete_samplers_keep_their_integer_linspace():
    from ldmkit_samplers import DDIMSampler

    integer = [999, 832, 666, 500, 333, 166, 0]  # halves round to even
    assert timesteps(7, "linspace") == integer
    assert [t for t, _ in DDIMSampler(steps=7).timesteps(NoiseSchedule())] == integer
