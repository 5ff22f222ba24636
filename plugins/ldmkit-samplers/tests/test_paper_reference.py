"""DDIM, PLMS and DDPM against the latent diffusion paper's own samplers, step by step.

``fixtures/paper_reference.npz`` holds trajectories of CompVis/latent-diffusion's
``DDIMSampler``, ``PLMSSampler`` and ``LatentDiffusion.p_sample_loop`` run on the exact eps of
Gaussian data; ``fixtures/make_paper_reference.py`` says how it was made. Both sides run in
float64, so the only tolerated difference is round-off (the bound is 1e-6).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ldmkit.diffusion import NoiseSchedule, timestep_pairs
from ldmkit.testing.conformance import gaussian_denoiser
from ldmkit_samplers import DDIMSampler, DDPMSampler, PLMSSampler

REFERENCE = np.load(Path(__file__).parent / "fixtures" / "paper_reference.npz")
TOLERANCE = 1e-6


def run(sampler, *, seed: int | None = None) -> tuple[np.ndarray, list[int]]:
    """The trajectory (z before the first step, then after each) and the visited timesteps."""
    schedule = NoiseSchedule()
    x_T = torch.from_numpy(REFERENCE["x_T"])
    seen: list[dict] = []
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    denoise = gaussian_denoiser(schedule, float(REFERENCE["mean"]), float(REFERENCE["std"]))
    sampler.sample(denoise, schedule, x_T, generator=generator, callback=seen.append)
    trajectory = np.stack([x_T.numpy()] + [info["z"].numpy() for info in seen])
    return trajectory, [info["t"] for info in seen]


def test_the_schedule_is_the_papers():
    np.testing.assert_allclose(
        NoiseSchedule().alphas_cumprod.numpy(), REFERENCE["alphas_cumprod"], rtol=1e-14
    )


@pytest.mark.parametrize(
    ("case", "sampler"),
    [
        ("ddim_uniform_50", DDIMSampler(steps=50, spacing="paper")),
        ("ddim_uniform_30", DDIMSampler(steps=30, spacing="paper")),
        ("ddim_quad_20", DDIMSampler(steps=20, spacing="quad")),
        ("plms_uniform_50", PLMSSampler(steps=50)),
        ("plms_uniform_10", PLMSSampler(steps=10)),
        ("plms_uniform_1", PLMSSampler(steps=1)),
        ("plms_quad_20", PLMSSampler(steps=20, spacing="quad")),
        ("ddim_eta1_uniform_20", DDIMSampler(steps=20, eta=1.0, spacing="paper")),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_every_step_equals_the_papers(case, sampler):
    seed = int(REFERENCE[f"{case}_seed"]) if f"{case}_seed" in REFERENCE else None
    trajectory, timesteps = run(sampler, seed=seed)
    assert timesteps == REFERENCE[f"{case}_timesteps"][::-1].tolist()
    expected = REFERENCE[case]
    assert trajectory.shape == expected.shape
    np.testing.assert_allclose(trajectory, expected, atol=TOLERANCE, rtol=0)


def test_ddpm_equals_the_papers_ancestral_sampler():
    """``LatentDiffusion.p_sample_loop``: all T = 1000 steps, kept every 100 by the paper."""
    trajectory, timesteps = run(DDPMSampler(steps=1000), seed=int(REFERENCE["ddpm_1000_seed"]))
    kept = [0] + [i + 1 for i, t in enumerate(timesteps) if t % 100 == 0 or t == 999]
    np.testing.assert_allclose(trajectory[kept], REFERENCE["ddpm_1000"], atol=TOLERANCE, rtol=0)


def test_paper_spacing_timesteps_are_the_papers():
    """The fixture's timesteps come from the paper's ``make_ddim_timesteps``."""
    for case, spacing in (
        ("ddim_uniform_50", "paper"),
        ("ddim_uniform_30", "paper"),
        ("ddim_quad_20", "quad"),
    ):
        steps = int(case.rsplit("_", 1)[1])
        pairs = timestep_pairs(1000, steps, spacing)
        paper = REFERENCE[f"{case}_timesteps"][::-1].tolist()
        assert [t for t, _ in pairs] == paper
        assert [t_prev for _, t_prev in pairs] == paper[1:] + [0]  # the last step to alpha_bar_0
