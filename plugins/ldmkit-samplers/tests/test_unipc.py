"""UniPC against diffusers' UniPCMultistepScheduler, the samplers it reduces to, and the
conformance suite."""

import itertools

import pytest
import torch

from ldmkit.diffusion import NoiseSchedule
from ldmkit.diffusion.sampling import SigmaDenoiser
from ldmkit.testing import SamplerConformance
from ldmkit.testing.conformance import gaussian_denoiser
from ldmkit_samplers import DPMSolverPP2MSampler, EulerSampler, UniPCSampler


class TestUniPC(SamplerConformance):
    stochastic = False  # the order check runs on the declared convergence_order (2)

    def make_sampler(self):
        return UniPCSampler(steps=self.steps)


class TestUniPCPredictorOnly(SamplerConformance):
    stochastic = False
    expected_order = 2  # measured 2.19

    def make_sampler(self):
        return UniPCSampler(steps=self.steps, corrector=False)


class TestUniPCOrderOne(SamplerConformance):
    stochastic = False
    expected_order = 1  # UniP-1 is DDIM

    def make_sampler(self):
        return UniPCSampler(steps=self.steps, order=1, corrector=False)


def test_the_corrector_raises_the_order():
    """UniC is what makes UniPC more than DPM-Solver++: without it the order-2 chain converges
    at about 2, with it clearly faster (3.57 measured): a corrector that did nothing fails."""
    check = SamplerConformance()
    with_corrector, _ = check.convergence_order(UniPCSampler())
    without, _ = check.convergence_order(UniPCSampler(corrector=False))
    assert with_corrector > without + 0.8, (with_corrector, without)


def _chain(sampler, steps=10):
    schedule = NoiseSchedule()
    z = torch.tensor([-1.5, -0.2, 0.4, 1.8], dtype=torch.float64).reshape(4, 1, 1, 1)
    return sampler.sample(gaussian_denoiser(schedule, 0.3, 0.7), schedule, z, steps=steps), z, schedule


def _diffusers_chain(options: dict, spacing: str, steps: int = 10) -> torch.Tensor:
    """diffusers' UniPCMultistepScheduler on ldmkit's noise levels: the same start z, and the
    data prediction of ldmkit's sigma bridge as the model output (``prediction_type="sample"``),
    evaluated where the scheduler's latents are."""
    diffusers = pytest.importorskip("diffusers")
    sampler = UniPCSampler(steps=steps, spacing=spacing, **options)
    _, z, schedule = _chain(sampler, steps)
    sigmas = sampler.sigmas(schedule)
    model = SigmaDenoiser(gaussian_denoiser(schedule, 0.3, 0.7), schedule)
    scheduler = diffusers.UniPCMultistepScheduler(
        solver_order=options.get("order", 2),
        solver_type=options.get("variant", "bh2"),
        disable_corrector=[] if options.get("corrector", True) else list(range(steps)),
        lower_order_final=True,
        prediction_type="sample",
    )
    scheduler.set_timesteps(steps)
    scheduler.sigmas = torch.tensor(sigmas, dtype=torch.float64)
    scheduler.timesteps = torch.arange(steps - 1, -1, -1)
    latents = z.clone()
    for i, t in enumerate(scheduler.timesteps):
        x0 = model(latents * (1 + sigmas[i] ** 2) ** 0.5, sigmas[i])
        latents = scheduler.step(x0, t, latents, return_dict=False)[0]
    return latents


# diffusers' bh1 (B(h) = -h) is NaN on a last step to sigma = 0 (-inf * 0): those run on `quad`,
# which ends at sigma_0 > 0; ldmkit returns D(x; sigma) on such a step with either variant
CASES = [
    *[({"order": o, "corrector": c}, sp) for o, c, sp in itertools.product((1, 2, 3), (True, False), ("karras", "quad"))],
    ({"order": 2, "variant": "bh1"}, "quad"),
    ({"order": 3, "variant": "bh1", "corrector": False}, "quad"),
    ({"order": 3}, "linspace"),
]


@pytest.mark.parametrize(("options", "spacing"), CASES, ids=lambda v: str(v))
def test_chains_equal_diffusers_unipc_scheduler(options, spacing):
    ours, _, _ = _chain(UniPCSampler(steps=10, spacing=spacing, **options))
    theirs = _diffusers_chain(options, spacing)
    torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=0)  # measured <= 3e-15


def test_the_predictor_alone_is_dpm_solver_pp_and_order_one_is_euler():
    """UniP-2 with rho = 1/2 is DPM-Solver++(2M)'s update; UniP-1 is DDIM (= deterministic Euler)."""
    for spacing in ("karras", "linspace"):
        two, _, _ = _chain(UniPCSampler(steps=10, corrector=False, lower_order_final=False, spacing=spacing))
        dpmpp, _, _ = _chain(DPMSolverPP2MSampler(steps=10, spacing=spacing))
        torch.testing.assert_close(two, dpmpp, atol=1e-12, rtol=0)
        one, _, _ = _chain(UniPCSampler(steps=10, order=1, corrector=False, spacing=spacing))
        euler, _, _ = _chain(EulerSampler(steps=10, spacing=spacing))
        torch.testing.assert_close(one, euler, atol=1e-12, rtol=0)


def test_lower_order_final_needs_the_step_count_and_a_last_step_to_zero_is_denoised():
    """Without ``lower_order_final`` an order-3 chain to sigma = 0 stays finite (diffusers' is
    NaN there: its weights divide by h = inf); the options change the chain."""
    plain, _, _ = _chain(UniPCSampler(steps=10, order=3, lower_order_final=False, spacing="karras"))
    lowered, _, _ = _chain(UniPCSampler(steps=10, order=3, spacing="karras"))
    assert torch.isfinite(plain).all() and not torch.equal(plain, lowered)
    bh1, _, _ = _chain(UniPCSampler(steps=10, variant="bh1", spacing="karras"))
    assert torch.isfinite(bh1).all()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"order": 4}, "order must be 1, 2 or 3, got 4"),
        ({"order": True}, "order must be 1, 2 or 3, got True"),
        ({"variant": "bh3"}, "variant must be one of bh1, bh2, got 'bh3'"),
        ({"corrector": "yes"}, "corrector must be true or false, got 'yes'"),
        ({"lower_order_final": 1}, "lower_order_final must be true or false, got 1"),
    ],
)
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        UniPCSampler(**options)


@pytest.mark.parametrize("base", ["discrete", "sigma"])
def test_each_step_is_told_how_many_steps_the_call_takes(base):
    """``s.steps`` (what ``lower_order_final`` reads) is the call's length, also where img2img's
    strength shortens the chain, in both bases."""
    from ldmkit.diffusion import DiscreteSampler, SigmaSampler

    seen = []

    class Recorder(DiscreteSampler if base == "discrete" else SigmaSampler):
        def step(self, s):
            seen.append((s.i, s.steps, s.is_last))
            return s.z if base == "discrete" else s.x

    schedule = NoiseSchedule()
    z = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    denoise = gaussian_denoiser(schedule, 0.0, 1.0)
    Recorder(steps=10, spacing="linspace").sample(denoise, schedule, z)
    assert seen == [(i, 10, i == 9) for i in range(10)]
    seen.clear()
    Recorder(steps=10, spacing="linspace").sample(denoise, schedule, z, init=z, strength=0.6)
    assert seen == [(i, 6, i == 5) for i in range(6)]
