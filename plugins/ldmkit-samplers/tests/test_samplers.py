"""The first-party samplers against ldmkit's conformance suite and closed-form answers.

The conformance classes use a spacing that ends clean (alpha_bar = 1): the paper's spacings
end at alpha_bar_0, where a point mass is not recovered exactly; ``test_paper_reference.py``
covers them against the paper's own code.
"""

import math

import pytest
import torch

from ldmkit.diffusion import NoiseSchedule
from ldmkit.testing import SamplerConformance
from ldmkit.testing.conformance import gaussian_denoiser
from ldmkit_samplers import (
    DDIMSampler,
    DDPMSampler,
    DPM2AncestralSampler,
    DPM2Sampler,
    DPMSolverPP2MSampler,
    DPMSolverPP2MSDESampler,
    DPMSolverPP2SAncestralSampler,
    DPMSolverPP3MSDESampler,
    EulerAncestralSampler,
    EulerSampler,
    HeunSampler,
    LMSSampler,
    PLMSSampler,
)


class TestDDIM(SamplerConformance):
    stochastic = False
    ddim_eta = 0.0  # its fresh noise is DDIM's sigma_t(eta)
    expected_order = 1

    def make_sampler(self):
        return DDIMSampler(steps=self.steps)


class TestDDIMStochastic(SamplerConformance):
    stochastic = True
    ddim_eta = 1.0  # its fresh noise is DDIM's sigma_t(eta)

    def make_sampler(self):
        return DDIMSampler(steps=self.steps, eta=1.0)


class TestDDPM(SamplerConformance):
    stochastic = True
    ddim_eta = 1.0  # its fresh noise is DDIM's sigma_t(eta)

    def make_sampler(self):
        return DDPMSampler(steps=self.steps)


class TestPLMS(SamplerConformance):
    stochastic = False
    # measured 2.05 at 10-40 steps: the higher asymptotic order (4 once warmed up) needs
    # more steps than this test runs; PLMS assumes even steps in t, hence linspace
    expected_order = 2
    order_spacing = "linspace"

    def make_sampler(self):
        return PLMSSampler(steps=self.steps, spacing="linspace")


class TestEuler(SamplerConformance):
    stochastic = False
    expected_order = 1

    def make_sampler(self):
        return EulerSampler(steps=self.steps)


class TestEulerAncestral(SamplerConformance):
    stochastic = True
    ddim_eta = 1.0  # its fresh noise is DDIM's sigma_t(eta)

    def make_sampler(self):
        return EulerAncestralSampler(steps=self.steps)


class TestHeun(SamplerConformance):
    stochastic = False
    expected_order = 2

    def make_sampler(self):
        return HeunSampler(steps=self.steps)


class TestDPMSolverPP2M(SamplerConformance):
    stochastic = False
    expected_order = 2

    def make_sampler(self):
        return DPMSolverPP2MSampler(steps=self.steps)


class TestDPMSolverPP2MSDE(SamplerConformance):
    stochastic = True
    def make_sampler(self):
        return DPMSolverPP2MSDESampler(steps=self.steps)


class TestDPMSolverPP2MSDEHeunExponential(SamplerConformance):
    stochastic = True
    def make_sampler(self):
        return DPMSolverPP2MSDESampler(steps=self.steps, solver_type="heun", spacing="exponential")


class TestDPMSolverPP2MSDEAtEtaZero(SamplerConformance):
    stochastic = False
    expected_order = 2

    def make_sampler(self):
        return DPMSolverPP2MSDESampler(steps=self.steps, eta=0.0)


class TestDPMSolverPP2MSDEHeunAtEtaZero(SamplerConformance):
    stochastic = False
    expected_order = 2

    def make_sampler(self):
        return DPMSolverPP2MSDESampler(steps=self.steps, eta=0.0, solver_type="heun")


class TestDPMSolverPP2SAncestral(SamplerConformance):
    stochastic = True
    ddim_eta = 1.0  # its fresh noise is DDIM's sigma_t(eta)
    def make_sampler(self):
        return DPMSolverPP2SAncestralSampler(steps=self.steps)


class TestDPMSolverPP2SAncestralKarras(SamplerConformance):
    stochastic = True
    ddim_eta = 1.0  # its fresh noise is DDIM's sigma_t(eta)
    def make_sampler(self):
        return DPMSolverPP2SAncestralSampler(steps=self.steps, spacing="karras")


class TestDPMSolverPP2SAtEtaZero(SamplerConformance):
    stochastic = False
    expected_order = 2

    def make_sampler(self):
        return DPMSolverPP2SAncestralSampler(steps=self.steps, eta=0.0)


class TestDPM2(SamplerConformance):
    stochastic = False
    expected_order = 2

    def make_sampler(self):
        return DPM2Sampler(steps=self.steps)


class TestDPM2Karras(SamplerConformance):
    stochastic = False
    def make_sampler(self):
        return DPM2Sampler(steps=self.steps, spacing="karras")


class TestDPM2Ancestral(SamplerConformance):
    stochastic = True
    ddim_eta = 1.0  # its fresh noise is DDIM's sigma_t(eta)
    def make_sampler(self):
        return DPM2AncestralSampler(steps=self.steps)


class TestDPM2AncestralKarras(SamplerConformance):
    stochastic = True
    ddim_eta = 1.0  # its fresh noise is DDIM's sigma_t(eta)
    def make_sampler(self):
        return DPM2AncestralSampler(steps=self.steps, spacing="karras")


class TestDPMSolverPP3MSDE(SamplerConformance):
    stochastic = True
    def make_sampler(self):
        return DPMSolverPP3MSDESampler(steps=self.steps)


class TestDPMSolverPP3MSDEExponential(SamplerConformance):
    stochastic = True
    def make_sampler(self):
        return DPMSolverPP3MSDESampler(steps=self.steps, spacing="exponential")


class TestDPMSolverPP3MSDEAtEtaZero(SamplerConformance):
    stochastic = False
    expected_order = 3  # measured 2.79 at 10-40 steps (error ratios 5.1, 9.4), 3.94 at 20-80

    def make_sampler(self):
        return DPMSolverPP3MSDESampler(steps=self.steps, eta=0.0)


class TestLMS(SamplerConformance):
    stochastic = False
    # order-4 steps after an Euler, an order-2 and an order-3 one: the Euler start caps the
    # global order at 2 as the steps shrink; measured 2.86 at 10-40 steps (2.57 with order=3)
    expected_order = 3

    def make_sampler(self):
        return LMSSampler(steps=self.steps)


class TestLMSKarras(SamplerConformance):
    stochastic = False
    def make_sampler(self):
        return LMSSampler(steps=self.steps, spacing="karras")


def test_ddpm_equals_ddim_eta_one():
    """DDPM's posterior mean/variance and DDIM (eta=1) are the same chain (Song et al. 2021,
    Sec. 4.1): with the same noise draws both give the same samples."""
    schedule = NoiseSchedule()
    denoise = gaussian_denoiser(schedule, 0.3, 0.7)
    noise = torch.randn(8, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    a = DDPMSampler(steps=30).sample(
        denoise, schedule, noise, generator=torch.Generator().manual_seed(5)
    )
    b = DDIMSampler(steps=30, eta=1.0).sample(
        denoise, schedule, noise, generator=torch.Generator().manual_seed(5)
    )
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_ddim_deterministic_ignores_generator():
    schedule = NoiseSchedule()
    denoise = gaussian_denoiser(schedule, 0.0, 1.0)
    noise = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    a = DDIMSampler(steps=10).sample(
        denoise, schedule, noise, generator=torch.Generator().manual_seed(1)
    )
    b = DDIMSampler(steps=10).sample(
        denoise, schedule, noise, generator=torch.Generator().manual_seed(2)
    )
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_unit_gaussian_data_matches_closed_form():
    """For N(0, 1) data the exact eps is sqrt(1-a) z_t, so with a_t = cos^2(theta_t) one
    deterministic DDIM step multiplies z by cos(theta_t - theta_prev): the whole chain
    scales the noise by the product of those cosines."""
    schedule = NoiseSchedule()
    steps = 7
    timesteps = schedule.spaced_timesteps(steps).tolist()
    theta = [float(torch.arccos(schedule.alphas_cumprod[t].sqrt())) for t in timesteps] + [0.0]
    factor = 1.0
    for now, prev in zip(theta, theta[1:], strict=False):
        factor *= math.cos(now - prev)
    noise = torch.randn(16, 1, 1, 1, generator=torch.Generator().manual_seed(3))
    out = DDIMSampler(steps=steps).sample(gaussian_denoiser(schedule, 0.0, 1.0), schedule, noise)
    torch.testing.assert_close(out, noise * factor, atol=1e-5, rtol=1e-5)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="steps"):
        DDIMSampler(steps=0)
    for eta in (
        -1,
        float("nan"),
        float("inf"),
    ):  # nan: NaN images from ddim, full noise from euler_ancestral
        with pytest.raises(ValueError, match=f"eta must be a finite number >= 0, got {eta}"):
            DDIMSampler(eta=eta)
        with pytest.raises(ValueError, match=f"eta must be a finite number >= 0, got {eta}"):
            EulerAncestralSampler(eta=eta)
        with pytest.raises(ValueError, match=f"eta must be a finite number >= 0, got {eta}"):
            DPMSolverPP2MSDESampler(eta=eta)
        with pytest.raises(ValueError, match=f"eta must be a finite number >= 0, got {eta}"):
            DPMSolverPP2SAncestralSampler(eta=eta)
        with pytest.raises(ValueError, match=f"eta must be a finite number >= 0, got {eta}"):
            DPM2AncestralSampler(eta=eta)
        with pytest.raises(ValueError, match=f"eta must be a finite number >= 0, got {eta}"):
            DPMSolverPP3MSDESampler(eta=eta)
    with pytest.raises(ValueError, match="solver_type must be 'midpoint' or 'heun', got 'euler'"):
        DPMSolverPP2MSDESampler(solver_type="euler")
    for order in (0, 2.5, True):
        with pytest.raises(ValueError, match=f"order must be an integer >= 1, got {order}"):
            LMSSampler(order=order)
    with pytest.raises(ValueError, match="HeunSampler: unknown timestep spacing 'kerras'"):
        HeunSampler(spacing="kerras")
    schedule = NoiseSchedule()
    with pytest.raises(ValueError, match="both mask and known"):
        DDIMSampler(steps=2).sample(
            gaussian_denoiser(schedule, 0, 1),
            schedule,
            torch.zeros(1, 1, 2, 2),
            mask=torch.ones(1, 1, 2, 2),
        )


# -- the order check catches wrong algorithms ---------------------------------------------


class HeunWithoutCorrector(HeunSampler):
    """A broken Heun: the corrector is dropped, which leaves Euler."""

    def step(self, s):
        return s.x + (s.sigma_next - s.sigma) * (s.x - s.denoised) / s.sigma


class DPMSolverWithoutHistory(DPMSolverPP2MSampler):
    """A broken DPM-Solver++(2M): the multistep correction is dropped (DPM-Solver++(1))."""

    def step(self, s):
        if s.sigma_next == 0:
            return s.denoised
        return (s.sigma_next / s.sigma) * s.x + (1 - s.sigma_next / s.sigma) * s.denoised


class LMSWithoutHistory(LMSSampler):
    """A broken LMS: the past slopes are dropped, which leaves Euler."""

    def __init__(self):
        super().__init__(order=1)


class DPMSolverSDEWithoutHistory(DPMSolverPP2MSDESampler):
    """A broken DPM-Solver++(2M) SDE at eta = 0: the history is never kept (first order)."""

    def __init__(self):
        super().__init__(eta=0.0, solver_type="heun")

    def step(self, s):
        s.state.clear()
        return super().step(s)


class DPMSolver2SWithoutMidpoint(DPMSolverPP2SAncestralSampler):
    """A broken DPM-Solver++(2S) at eta = 0: the midpoint evaluation is dropped (first order)."""

    def __init__(self):
        super().__init__(eta=0.0)

    def step(self, s):
        if s.sigma_next == 0:
            return s.denoised
        return (s.sigma_next / s.sigma) * s.x + (1 - s.sigma_next / s.sigma) * s.denoised


class DPM2WithoutMidpoint(DPM2Sampler):
    """A broken DPM-Solver-2: the slope at the midpoint is never evaluated (Euler)."""

    def step(self, s):
        return s.x + (s.sigma_next - s.sigma) * (s.x - s.denoised) / s.sigma


class DPMSolver3MWithoutHistory(DPMSolverPP3MSDESampler):
    """A broken DPM-Solver++(3M) at eta = 0: the history is never kept (first order)."""

    def __init__(self):
        super().__init__(eta=0.0)

    def step(self, s):
        s.state.clear()
        return super().step(s)


IMPOSTORS = {  # a broken sampler: the order its real one is checked at
    HeunWithoutCorrector(): TestHeun.expected_order,
    DPMSolverWithoutHistory(): TestDPMSolverPP2M.expected_order,
    LMSWithoutHistory(): TestLMS.expected_order,
    DPMSolverSDEWithoutHistory(): TestDPMSolverPP2MSDEHeunAtEtaZero.expected_order,
    DPMSolver2SWithoutMidpoint(): TestDPMSolverPP2SAtEtaZero.expected_order,
    DPM2WithoutMidpoint(): TestDPM2.expected_order,
    DPMSolver3MWithoutHistory(): TestDPMSolverPP3MSDEAtEtaZero.expected_order,
}


@pytest.mark.parametrize("broken", list(IMPOSTORS), ids=lambda s: type(s).__name__)
def test_order_check_fails_a_first_order_impostor(broken):
    with pytest.raises(AssertionError, match="converges at order 1"):
        TestHeun().check_convergence_order(broken, IMPOSTORS[broken])


# -- cross-checks between samplers and against the papers' formulas ----------------------


def test_euler_is_deterministic_ddim():
    """On the schedule's own sigmas an Euler step in (x, sigma) is DDIM's eta = 0 step
    (Karras et al. 2022, Sec. 3; Song et al. 2021, eq. 14). Euler's ``linspace`` is
    k-diffusion's fractional grid, on integer timesteps (DDIM's) when 999 / (S - 1) is whole."""
    schedule = NoiseSchedule()
    denoise = gaussian_denoiser(schedule, 0.3, 0.7)
    noise = torch.randn(8, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for spacing, steps in (("linspace", 10), ("paper", 12), ("trailing", 12)):
        a = EulerSampler(steps=steps, spacing=spacing).sample(denoise, schedule, noise)
        b = DDIMSampler(steps=steps, spacing=spacing).sample(denoise, schedule, noise)
        torch.testing.assert_close(a, b, atol=1e-9, rtol=0)


def test_euler_ancestral_eta_zero_is_euler_and_keeps_the_noise_level():
    from ldmkit_samplers.euler_ancestral import ancestral_step

    schedule = NoiseSchedule()
    denoise = gaussian_denoiser(schedule, 0.3, 0.7)
    noise = torch.randn(8, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    a = EulerAncestralSampler(steps=10, eta=0.0).sample(denoise, schedule, noise)
    b = EulerSampler(steps=10).sample(denoise, schedule, noise)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    for sigma, sigma_next, eta in ((14.6, 3.0, 1.0), (2.0, 1.5, 0.5), (0.3, 0.0, 1.0)):
        down, up = ancestral_step(sigma, sigma_next, eta)
        assert down**2 + up**2 == pytest.approx(sigma_next**2)
        assert 0 <= down <= sigma_next


def test_lms_of_order_one_is_euler():
    schedule = NoiseSchedule()
    denoise = gaussian_denoiser(schedule, 0.3, 0.7)
    noise = torch.randn(8, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a = LMSSampler(steps=10, order=1, spacing="karras").sample(denoise, schedule, noise)
    b = EulerSampler(steps=10, spacing="karras").sample(denoise, schedule, noise)
    torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_dpmpp_2m_sde_at_eta_zero_is_dpmpp_2m():
    """With no noise the SDE solver's midpoint form is DPM-Solver++(2M), step for step."""
    schedule = NoiseSchedule()
    denoise = gaussian_denoiser(schedule, 0.3, 0.7)
    noise = torch.randn(8, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for spacing in ("linspace", "quad", "karras"):
        a = DPMSolverPP2MSDESampler(steps=12, eta=0.0, spacing=spacing).sample(
            denoise, schedule, noise, generator=torch.Generator().manual_seed(1)
        )
        b = DPMSolverPP2MSampler(steps=12, spacing=spacing).sample(denoise, schedule, noise)
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_dpm_2_ancestral_keeps_the_noise_level_where_eta_sends_sigma_down_to_zero():
    """eta = 3 makes sigma_up = sigma_next (sigma_down = 0) before the last step: that step
    ends at D(x; sigma) plus sigma_next of fresh noise (k-diffusion's sample_dpm_2_ancestral
    adds none there and leaves the chain noiseless at sigma_next)."""
    schedule = NoiseSchedule()
    noise = torch.zeros(4096, 1, 1, 1)  # x_T = 0: D is one value, so the spread is the noise's
    first: list[dict] = []
    DPM2AncestralSampler(steps=2, eta=3.0, spacing="karras").sample(
        gaussian_denoiser(schedule, 0.3, 0.7), schedule, noise, callback=first.append,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    sigma_next = DPM2AncestralSampler(steps=2, spacing="karras").sigmas(schedule)[1]
    x = first[0]["z"] * math.sqrt(1 + sigma_next**2)
    assert x.std().item() == pytest.approx(sigma_next, rel=0.05)


@pytest.mark.parametrize("cls", [DPMSolverPP2MSDESampler, DPMSolverPP3MSDESampler])
def test_sde_samplers_default_to_a_grid_they_sample_well_on(cls):
    """On ``linspace`` the multistep SDE samplers amplify their own noise (20 steps: std 1.3
    for dpmpp_3m_sde, 0.44 for dpmpp_2m_sde, of data with std 0.3); their defaults must not."""
    schedule = NoiseSchedule()
    noise = torch.randn(4096, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    out = cls().sample(
        gaussian_denoiser(schedule, 0.5, 0.3), schedule, noise,
        generator=torch.Generator().manual_seed(1),
    )  # fmt: skip
    assert abs(out.std().item() - 0.3) < 0.03 and abs(out.mean().item() - 0.5) < 0.03


def test_dpmpp_2m_equals_algorithm_2_in_vp_form():
    """DPM-Solver++(2M) as Lu et al. 2022 write Algorithm 2, in the VP variables
    ``z = alpha x0 + s eps`` with ``lambda = log(alpha / s)`` and data prediction x0(z, t):
    ``z_i = (s_i / s_{i-1}) z_{i-1} - alpha_i (exp(-h_i) - 1) D_i``,
    ``D_i = (1 + 1 / (2 r_i)) x0_{i-1} - 1 / (2 r_i) x0_{i-2}``, ``r_i = h_{i-1} / h_i``."""
    schedule = NoiseSchedule()
    mean, std = 0.3, 0.7
    z = torch.randn(6, 1, 2, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    steps = 15
    out = DPMSolverPP2MSampler(steps=steps, spacing="paper").sample(
        gaussian_denoiser(schedule, mean, std), schedule, z
    )

    ts = schedule.spaced_timesteps(steps, "paper").tolist() + [0]
    abar = [float(schedule.alphas_cumprod[t]) for t in ts]
    alpha = [a**0.5 for a in abar]
    s = [(1 - a) ** 0.5 for a in abar]
    lam = [math.log(al / si) for al, si in zip(alpha, s, strict=True)]
    eps = gaussian_denoiser(schedule, mean, std)
    x0 = []
    for i in range(1, len(ts)):
        x0.append((z - s[i - 1] * eps(z, torch.tensor([ts[i - 1]]))) / alpha[i - 1])
        h = lam[i] - lam[i - 1]
        if i == 1:
            D = x0[-1]
        else:
            r = (lam[i - 1] - lam[i - 2]) / h
            D = (1 + 1 / (2 * r)) * x0[-1] - 1 / (2 * r) * x0[-2]
        z = (s[i] / s[i - 1]) * z - alpha[i] * math.expm1(-h) * D
    torch.testing.assert_close(out, z, atol=1e-6, rtol=0)


# -- costs, masks and spacings for every sampler ------------------------------------------

EVALUATIONS = {  # denoiser calls for `steps` steps, ending clean (the docs' table)
    DDPMSampler: lambda n: n,
    DDIMSampler: lambda n: n,
    PLMSSampler: lambda n: n + 1,
    EulerSampler: lambda n: n,
    EulerAncestralSampler: lambda n: n,
    HeunSampler: lambda n: 2 * n - 1,
    DPMSolverPP2MSampler: lambda n: n,
    LMSSampler: lambda n: n,
    DPMSolverPP2MSDESampler: lambda n: n,
    DPMSolverPP2SAncestralSampler: lambda n: 2 * n - 1,
    DPM2Sampler: lambda n: 2 * n - 1,
    DPM2AncestralSampler: lambda n: 2 * n - 1,
    DPMSolverPP3MSDESampler: lambda n: n,
}


@pytest.mark.parametrize("cls", list(EVALUATIONS), ids=lambda c: c.__name__)
def test_denoiser_evaluations_per_step(cls):
    schedule = NoiseSchedule()
    denoise = gaussian_denoiser(schedule, 0.0, 1.0)
    calls = []

    def counted(z, t):
        calls.append(1)
        return denoise(z, t)

    cls(steps=10, spacing="linspace").sample(counted, schedule, torch.randn(2, 1, 2, 2))
    assert len(calls) == EVALUATIONS[cls](10)


@pytest.mark.parametrize("spacing", ["paper", "quad", "trailing"])
@pytest.mark.parametrize("cls", list(EVALUATIONS), ids=lambda c: c.__name__)
def test_inpainting_ends_at_known_with_every_spacing(cls, spacing):
    schedule = NoiseSchedule()
    known = torch.randn(2, 2, 3, 4, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(2, 1, 3, 4)
    mask[..., :2] = 1
    out = cls(steps=6, spacing=spacing).sample(
        gaussian_denoiser(schedule, 0.0, 1.0), schedule, torch.randn(2, 2, 3, 4),
        generator=torch.Generator().manual_seed(2), mask=mask, known=known,
    )  # fmt: skip
    torch.testing.assert_close(out[..., 2:], known[..., 2:], atol=1e-6, rtol=0)


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_euler_ancestral_is_ddim_with_the_same_eta(eta):
    """sigma_up is DDIM's sigma (eq. 16) over sqrt(alpha_bar_prev): the same chain, draw for draw."""
    schedule = NoiseSchedule()
    denoise = gaussian_denoiser(schedule, 0.3, 0.7)
    noise = torch.randn(8, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    a = EulerAncestralSampler(steps=10, eta=eta).sample(
        denoise, schedule, noise, generator=torch.Generator().manual_seed(5)
    )
    b = DDIMSampler(steps=10, eta=eta).sample(
        denoise, schedule, noise, generator=torch.Generator().manual_seed(5)
    )
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


# -- Karras and exponential noise levels ----------------------------------------------------


class TestEulerKarras(SamplerConformance):
    stochastic = False

    def make_sampler(self):
        return EulerSampler(steps=self.steps, spacing="karras")


class TestEulerAncestralKarras(SamplerConformance):
    stochastic = True
    ddim_eta = 1.0  # its fresh noise is DDIM's sigma_t(eta)

    def make_sampler(self):
        return EulerAncestralSampler(steps=self.steps, spacing="karras")


class TestHeunKarras(SamplerConformance):
    stochastic = False

    def make_sampler(self):
        return HeunSampler(steps=self.steps, spacing="karras")


class TestEulerChurn(SamplerConformance):
    stochastic = True

    def make_sampler(self):
        return EulerSampler(steps=self.steps, s_churn=1.0)


class TestHeunChurn(SamplerConformance):
    stochastic = True

    def make_sampler(self):
        return HeunSampler(steps=self.steps, s_churn=2.0, s_tmin=0.05, s_tmax=10.0, s_noise=1.003)


class TestDPM2ChurnKarras(SamplerConformance):
    stochastic = True

    def make_sampler(self):
        return DPM2Sampler(steps=self.steps, s_churn=40.0, spacing="karras")


@pytest.mark.parametrize("cls", [EulerSampler, HeunSampler, DPM2Sampler], ids=lambda c: c.__name__)
def test_churn_zero_is_the_plain_solver_bit_for_bit(cls):
    """``s_churn=0`` (the default) adds and draws nothing: the chain before churn existed, bit
    for bit, whatever ``s_tmin``/``s_tmax``/``s_noise`` say; the same chain as the solver's own
    step from ``s.denoised`` (a k-diffusion-style loop written here, no churn hook)."""
    from ldmkit.diffusion import SigmaStep
    from ldmkit.diffusion.sampling import SigmaDenoiser

    schedule = NoiseSchedule()
    denoise = gaussian_denoiser(schedule, 0.3, 0.7)
    noise = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    out = cls(steps=8, s_churn=0.0, s_tmin=0.1, s_tmax=3.0, s_noise=2.0).sample(
        denoise, schedule, noise, generator=generator
    )
    assert torch.equal(generator.get_state(), torch.Generator().manual_seed(1).get_state())
    sampler, model = cls(steps=8), SigmaDenoiser(denoise, schedule)
    sigmas = sampler.sigmas(schedule)
    x = noise * math.sqrt(1 + sigmas[0] ** 2)
    for i in range(8):
        x = sampler.step(SigmaStep(i, x, sigmas[i], sigmas[i + 1], model(x, sigmas[i]),
                                   i == 7, model, None))  # fmt: skip
    assert torch.equal(out, x)


def test_churn_options_are_checked():
    for name in ("s_churn", "s_tmin", "s_noise"):
        for value in (-1.0, float("nan"), float("inf")):
            with pytest.raises(ValueError, match=f"{name} must be a finite number >= 0, got {value}"):
                EulerSampler(**{name: value})
    with pytest.raises(ValueError, match="s_tmax must be a number >= 0"):
        HeunSampler(s_tmax=float("nan"))
    assert HeunSampler(s_tmax=None).s_tmax is None  # the default: no upper bound
    assert "s_churn=1.0" in repr(DPM2Sampler(s_churn=1.0)) and "s_churn" not in repr(DPM2Sampler())


class TestDPMSolverPP2MExponential(SamplerConformance):
    stochastic = False

    def make_sampler(self):
        return DPMSolverPP2MSampler(steps=self.steps, spacing="exponential")


# Printed by fixtures/make_kdiffusion_reference.py: k-diffusion 0.1.1.post1's sample_euler,
# sample_heun and sample_dpmpp_2m through its CompVisDenoiser, on get_sigmas_karras(10, ...) of
# the paper's schedule, the exact eps of N(0.3, 0.7^2) data, from x_T = z sqrt(1 + sigma_max^2).
KDIFFUSION_KARRAS_10 = {
    EulerSampler: [-0.5916192243675522, 0.17070937742959796, 0.5225533474898209, 1.343522610963675],
    HeunSampler: [-0.8319152659329132, 0.13586487882961992, 0.5825326379507888, 1.624757409233516],
    DPMSolverPP2MSampler: [-0.8236858053428942, 0.13705820447135525, 0.5804785166933166,
                           1.6151259118778922],
}  # fmt: skip


@pytest.mark.parametrize("cls", list(KDIFFUSION_KARRAS_10), ids=lambda c: c.__name__)
def test_karras_chains_equal_kdiffusions(cls):
    schedule = NoiseSchedule()
    z = torch.tensor([-1.5, -0.2, 0.4, 1.8], dtype=torch.float64).reshape(4, 1, 1, 1)
    out = cls(steps=10, spacing="karras").sample(gaussian_denoiser(schedule, 0.3, 0.7), schedule, z)
    expected = torch.tensor(KDIFFUSION_KARRAS_10[cls], dtype=torch.float64).reshape(4, 1, 1, 1)
    torch.testing.assert_close(out, expected, atol=1e-8, rtol=0)  # measured 2.5e-9


# Printed by the same script: k-diffusion 0.1.1.post1's samplers that came later, from the same
# start on the same grid; a seeded one's noise_sampler draws what ``SigmaStep.noise()`` draws from
# ``torch.Generator().manual_seed(seed)``. (make the sampler, noise seed or None, the chain)
KDIFFUSION_KARRAS_10_MORE = {
    "sample_lms": (lambda: LMSSampler(steps=10, spacing="karras"), None,
                   [-0.7080300975855057, 0.15382903898356534, 0.5516101789385212, 1.4797661721667512]),
    "sample_dpmpp_2m_sde eta=0.0": (
        lambda: DPMSolverPP2MSDESampler(steps=10, eta=0.0, spacing="karras"), None,
        [-0.8236858053428942, 0.1370582044713553, 0.5804785166933166, 1.6151259118778933]),
    "sample_dpmpp_2m_sde eta=0.0 solver_type='heun'": (
        lambda: DPMSolverPP2MSDESampler(steps=10, eta=0.0, solver_type="heun", spacing="karras"),
        None, [-0.8670263762437609, 0.13077353805637928, 0.5912965754256749, 1.6658503292873643]),
    "sample_dpmpp_2m_sde eta=1.0": (
        lambda: DPMSolverPP2MSDESampler(steps=10, eta=1.0, spacing="karras"), 0,
        [-0.08092610555572456, 1.5363012289740317, -0.4017788651569373, -0.15478990165551226]),
    "sample_dpmpp_2m_sde eta=0.5 solver_type='heun'": (
        lambda: DPMSolverPP2MSDESampler(steps=10, eta=0.5, solver_type="heun", spacing="karras"),
        1, [1.1884840253920022, -1.4431464622884227, 0.2861054961750062, 0.9123853062786909]),
    "sample_dpmpp_2s_ancestral eta=0.0": (
        lambda: DPMSolverPP2SAncestralSampler(steps=10, eta=0.0, spacing="karras"), None,
        [-0.7351277971663978, 0.14989969520845262, 0.5583739224583838, 1.5114804527082237]),
    "sample_dpmpp_2s_ancestral eta=1.0": (
        lambda: DPMSolverPP2SAncestralSampler(steps=10, eta=1.0, spacing="karras"), 2,
        [0.032269762840908614, -0.8103653239841813, 0.7847976742890955, -0.4341830677470434]),
    "sample_dpm_2": (lambda: DPM2Sampler(steps=10, spacing="karras"), None,
                     [-0.8029911633698109, 0.14005906298970922, 0.5753130136171802, 1.5909055650812791]),
    "sample_dpm_2_ancestral eta=0.0": (
        lambda: DPM2AncestralSampler(steps=10, eta=0.0, spacing="karras"), None,
        [-0.8029911633698109, 0.14005906298970922, 0.5753130136171802, 1.5909055650812791]),
    "sample_dpm_2_ancestral eta=1.0": (
        lambda: DPM2AncestralSampler(steps=10, eta=1.0, spacing="karras"), 3,
        [-0.4636048602732034, 0.4717018596037454, 1.043514686230677, 0.9898175848194358]),
    "sample_dpmpp_3m_sde eta=0.0": (
        lambda: DPMSolverPP3MSDESampler(steps=10, eta=0.0, spacing="karras"), None,
        [-0.7992871600869162, 0.14059616770589348, 0.5743884728410366, 1.58657051815637]),
    "sample_dpmpp_3m_sde eta=1.0": (
        lambda: DPMSolverPP3MSDESampler(steps=10, eta=1.0, spacing="karras"), 4,
        [-0.22256636985152506, 1.0206766615648057, -0.15761883863643641, 1.144334517546014]),
    "sample_dpmpp_3m_sde eta=0.5": (
        lambda: DPMSolverPP3MSDESampler(steps=10, eta=0.5, spacing="karras"), 5,
        [-0.4119523586732086, -0.18733908440024855, 0.6943916568032673, 0.3558554815279567]),
    # Karras' churn: k-diffusion draws torch.randn_like(x) at every step, made the same draws
    "sample_euler s_churn=1.0": (lambda: EulerSampler(steps=10, s_churn=1.0, spacing="karras"), 6,
        [-0.43925783604968227, -0.02960172639181495, 0.4949762663412805, 0.20022785775503354]),
    "sample_heun s_churn=2.0 s_tmin=0.5 s_tmax=5.0 s_noise=1.003": (
        lambda: HeunSampler(steps=10, s_churn=2.0, s_tmin=0.5, s_tmax=5.0, s_noise=1.003,
                            spacing="karras"), 7,
        [1.0702555322227179, 0.02475646113650143, 1.660925214258322, 2.100532170449627]),
    "sample_dpm_2 s_churn=40.0 s_tmin=0.1 s_noise=0.9": (
        lambda: DPM2Sampler(steps=10, s_churn=40.0, s_tmin=0.1, s_noise=0.9, spacing="karras"), 8,
        [-0.2788100312594047, 0.22692440054466223, 0.8002673491903208, 0.5379133239733439]),
}  # fmt: skip


def float64_sigma_to_t(log_sigmas, sigma, *, quantize=False):
    """``ldmkit.diffusion.sampling.sigma_to_t`` without its cast of the timesteps to float32
    (what a UNet takes), as k-diffusion's ``sigma_to_t`` keeps them."""
    assert not quantize
    log_sigma = sigma.double().log()
    low = torch.searchsorted(log_sigmas, log_sigma).clamp(1, len(log_sigmas) - 1) - 1
    w = ((log_sigma - log_sigmas[low]) / (log_sigmas[low + 1] - log_sigmas[low])).clamp(0, 1)
    return low + w


@pytest.mark.parametrize("name", list(KDIFFUSION_KARRAS_10_MORE))
def test_more_karras_chains_equal_kdiffusions(name, monkeypatch):
    """As shipped, to the float32 timesteps' round-off (the denoised estimates differ by up to
    2e-8; measured 1.2e-8 for dpmpp_2s_ancestral at eta = 0, 1.4e-9 to 3.5e-9 for the others);
    with float64 timesteps the same chains to 1.3e-15: the formulas are k-diffusion's."""
    import ldmkit.diffusion.sampling

    make, seed, values = KDIFFUSION_KARRAS_10_MORE[name]
    schedule = NoiseSchedule()
    z = torch.tensor([-1.5, -0.2, 0.4, 1.8], dtype=torch.float64).reshape(4, 1, 1, 1)
    expected = torch.tensor(values, dtype=torch.float64).reshape(4, 1, 1, 1)
    for atol in (2e-8, 1e-13):
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        out = make().sample(gaussian_denoiser(schedule, 0.3, 0.7), schedule, z, generator=generator)
        torch.testing.assert_close(out, expected, atol=atol, rtol=0)
        monkeypatch.setattr(ldmkit.diffusion.sampling, "sigma_to_t", float64_sigma_to_t)


def _registered() -> dict[str, type]:
    from ldmkit_samplers import plugin

    found: dict[str, type] = {}
    plugin.ldmkit_register_samplers(register=found.__setitem__)
    return found


@pytest.mark.parametrize("name", sorted(_registered()))
def test_config_lists_every_option_with_its_default(name):
    """conf/sampler/<name>.yaml sets each keyword of the sampler's constructor, to its default
    (``steps`` aside: a config picks a useful count; ``spacing``: the class's default one)."""
    import inspect
    from pathlib import Path

    import yaml

    import ldmkit_samplers

    cls = _registered()[name]
    conf = Path(ldmkit_samplers.__file__).parent / "conf" / "sampler" / f"{name}.yaml"
    options = yaml.safe_load(conf.read_text())
    assert options.pop("name") == name
    parameters = inspect.signature(cls).parameters
    assert set(options) == set(parameters)
    defaults = {key: p.default for key, p in parameters.items()}
    defaults.update(steps=options["steps"], spacing=cls.default_spacing)
    assert options == defaults


@pytest.mark.parametrize("value", [2.0, float("nan")])
def test_a_latent_mask_outside_zero_one_is_refused(value):
    """A NaN mask passed the min/max check and made NaN latents."""
    schedule = NoiseSchedule()
    with pytest.raises(ValueError, match=r"mask values must be in \[0, 1\]"):
        DDIMSampler(steps=2).sample(
            gaussian_denoiser(schedule, 0.0, 1.0), schedule, torch.randn(1, 2, 3, 4),
            mask=torch.full((1, 1, 3, 4), value), known=torch.zeros(1, 2, 3, 4),
        )  # fmt: skip
