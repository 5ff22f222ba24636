"""The forward process against its formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ldmkit.diffusion import NoiseSchedule, make_betas


def test_linear_is_the_papers_sqrt_linspace_squared():
    betas = make_betas("linear", 1000, linear_start=0.00085, linear_end=0.012)
    expected = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    np.testing.assert_allclose(betas.numpy(), expected, rtol=1e-12)
    assert betas[0].item() == pytest.approx(0.00085) and betas[-1].item() == pytest.approx(0.012)


def test_sqrt_linear_and_aliases():
    np.testing.assert_allclose(make_betas("sqrt_linear", 10, linear_start=0.1, linear_end=0.2).numpy(),
                               np.linspace(0.1, 0.2, 10))
    torch.testing.assert_close(make_betas("scaled_linear", 50), make_betas("linear", 50))
    torch.testing.assert_close(make_betas("squaredcos_cap_v2", 50), make_betas("cosine", 50))


def test_cosine_matches_nichol_dhariwal():
    T, s = 100, 0.008
    f = [math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2 for t in range(T + 1)]
    expected = [min(1 - f[t + 1] / f[t], 0.999) for t in range(T)]
    np.testing.assert_allclose(make_betas("cosine", T, cosine_s=s).numpy(), expected, rtol=1e-10)


def test_unknown_schedule_lists_options():
    with pytest.raises(ValueError, match=r"unknown beta schedule 'quadratic'; expected one of \[.*'cosine'"):
        make_betas("quadratic")


def test_alphas_cumprod_and_q_sample_statistics():
    schedule = NoiseSchedule(timesteps=1000)
    expected = np.cumprod(1 - make_betas("linear", 1000).numpy())
    np.testing.assert_allclose(schedule.alphas_cumprod.numpy(), expected, rtol=1e-12)
    z0 = torch.full((20000, 1), 2.0)
    t = torch.full((20000,), 500)
    zt = schedule.q_sample(z0, t, torch.randn(20000, 1, generator=torch.Generator().manual_seed(0)))
    a = expected[500]
    assert zt.mean().item() == pytest.approx(2.0 * math.sqrt(a), abs=0.02)
    assert zt.std().item() == pytest.approx(math.sqrt(1 - a), abs=0.02)


def test_parameterizations_convert_exactly():
    schedule = NoiseSchedule()
    gen = torch.Generator().manual_seed(0)
    z0, eps = torch.randn(6, 4, 3, 3, generator=gen), torch.randn(6, 4, 3, 3, generator=gen)
    t = torch.tensor([0, 10, 250, 500, 750, 999])
    zt = schedule.q_sample(z0, t, eps)
    v = schedule.v_target(z0, t, eps)
    torch.testing.assert_close(schedule.predict_x0(zt, t, eps), z0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(schedule.predict_eps(zt, t, z0), eps, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(schedule.eps_from_v(zt, t, v), eps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(schedule.x0_from_v(zt, t, v), z0, atol=1e-5, rtol=1e-5)
    for prediction, output in (("eps", eps), ("x0", z0), ("v", v)):
        torch.testing.assert_close(schedule.to_eps(prediction, zt, t, output), eps, atol=1e-4, rtol=1e-4)


def test_spaced_timesteps():
    schedule = NoiseSchedule()
    steps = schedule.spaced_timesteps(5).tolist()
    assert steps == [999, 749, 500, 250, 0]
    assert schedule.spaced_timesteps(1000).tolist() == list(range(999, -1, -1))
    with pytest.raises(ValueError, match="steps must be in"):
        schedule.spaced_timesteps(1001)


def test_alpha_bar_before_the_first_step_is_one():
    schedule = NoiseSchedule()
    like = torch.zeros(2, 1)
    assert schedule.alpha_bar(torch.tensor([-1, 0]), like).flatten().tolist() == pytest.approx(
        [1.0, float(schedule.alphas_cumprod[0])]
    )


@pytest.mark.parametrize(("start", "end"), [(0.1, 2.0), (1.0, 0.02), (0.0, 0.02)])
def test_betas_outside_the_open_unit_interval_are_refused(start, end):
    """From Python too (the config schema names the key for composed configs): betas > 1 gave NaN samples."""
    with pytest.raises(ValueError, match=r"linear_start and linear_end must be in \(0, 1\)"):
        NoiseSchedule(kind="linear", timesteps=10, linear_start=start, linear_end=end)


def test_a_schedule_builds_on_the_meta_device():
    """Sizes are counted on the meta device (test_all_configs): the underflow check must not read values there."""
    with torch.device("meta"):
        assert NoiseSchedule(timesteps=10).alphas_cumprod.is_meta
