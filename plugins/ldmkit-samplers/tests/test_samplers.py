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
    DPMSolverPP2MSampler,
    EulerAncestralSampler,
    EulerSampler,
    HeunSampler,
    PLMSSampler,
)


class TestDDIM(SamplerConformance):
    stochastic = False
    expected_order = 1

    def make_sampler(self):
        return DDIMSampler(steps=self.steps)


class TestDDIMStochastic(SamplerConformance):
    stochastic = True

    def make_sampler(self):
        return DDIMSampler(steps=self.steps, eta=1.0)


class TestDDPM(SamplerConformance):
    stochastic = True

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


@pytest.mark.parametrize(
    "broken", [HeunWithoutCorrector(), DPMSolverWithoutHistory()], ids=lambda s: type(s).__name__
)
def test_order_check_fails_a_first_order_impostor(broken):
    with pytest.raises(AssertionError, match="converges at order 1"):
        TestHeun().check_convergence_order(broken, 2)


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

    def make_sampler(self):
        return EulerAncestralSampler(steps=self.steps, spacing="karras")


class TestHeunKarras(SamplerConformance):
    stochastic = False

    def make_sampler(self):
        return HeunSampler(steps=self.steps, spacing="karras")


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


@pytest.mark.parametrize("value", [2.0, float("nan")])
def test_a_latent_mask_outside_zero_one_is_refused(value):
    """A NaN mask passed the min/max check and made NaN latents."""
    schedule = NoiseSchedule()
    with pytest.raises(ValueError, match=r"mask values must be in \[0, 1\]"):
        DDIMSampler(steps=2).sample(
            gaussian_denoiser(schedule, 0.0, 1.0), schedule, torch.randn(1, 2, 3, 4),
            mask=torch.full((1, 1, 3, 4), value), known=torch.zeros(1, 2, 3, 4),
        )  # fmt: skip
