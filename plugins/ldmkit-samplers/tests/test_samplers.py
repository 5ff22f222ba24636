import math

import pytest
import torch

from ldmkit.diffusion import NoiseSchedule
from ldmkit.testing import SamplerConformance
from ldmkit.testing.conformance import gaussian_denoiser
from ldmkit_samplers import DDIMSampler, DDPMSampler


class TestDDIM(SamplerConformance):
    def make_sampler(self):
        return DDIMSampler(steps=self.steps)


class TestDDIMStochastic(SamplerConformance):
    def make_sampler(self):
        return DDIMSampler(steps=self.steps, eta=1.0)


class TestDDPM(SamplerConformance):
    def make_sampler(self):
        return DDPMSampler(steps=self.steps)


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
    with pytest.raises(ValueError, match="eta"):
        DDIMSampler(eta=-1)
    schedule = NoiseSchedule()
    with pytest.raises(ValueError, match="both mask and known"):
        DDIMSampler(steps=2).sample(
            gaussian_denoiser(schedule, 0, 1),
            schedule,
            torch.zeros(1, 1, 2, 2),
            mask=torch.ones(1, 1, 2, 2),
        )
