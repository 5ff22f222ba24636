"""The one shape every sampler takes: per-sample noise, a base class for discrete-time
samplers and a sigma bridge for continuous-time ones, over the timestep spacing of
:mod:`ldmkit.diffusion.timesteps` (whose names this module re-exports).

* **Discrete-time samplers** (DDPM, DDIM, PLMS) subclass :class:`DiscreteSampler` and write
  only :meth:`DiscreteSampler.step`: the base runs the loop over the spaced timesteps, calls
  the denoiser once per step, keeps an inpainting mask's known region, starts img2img from a
  partly noised latent, draws all noise per sample and reports progress.
* **Continuous-time samplers** (Euler, Heun, DPM-Solver++) subclass :class:`SigmaSampler` and
  write only :meth:`SigmaSampler.step` in k-diffusion's variables (Karras et al. 2022): the
  "variance exploding" ``x = z_t / sqrt(a_t)`` at noise level ``sigma_t = sqrt((1 - a_t) / a_t)``
  and a denoiser ``D(x, sigma) -> x0`` (:class:`SigmaDenoiser`), which maps sigma back to the
  discrete schedule's (interpolated or nearest) timestep.

Conventions stated once: an inpainting ``mask`` is 1 where the sampler generates and 0 where
it keeps ``known`` (the known clean latent); ``generator`` is a ``torch.Generator``, a list of
them (one per sample: sample ``i`` draws all of its noise from ``generator[i]``, so a result
does not depend on the batch it was drawn in) or None (the global RNG).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ldmkit.diffusion.timesteps import (
    SIGMA_SPACINGS,
    SPACINGS,
    check_spacing,
    timestep_pairs,
    truncate_for_strength,
)
from ldmkit.interfaces.sampler import Callback, DenoiseFn, Sampler

GeneratorArg = torch.Generator | Sequence[torch.Generator] | None
KARRAS_RHO = 7.0  # the "karras" grid's rho (sigma_levels)


# -- noise ---------------------------------------------------------------------------------
def sample_generators(
    seed: int, n: int, device: str | torch.device = "cpu"
) -> list[torch.Generator]:
    """One generator per sample, seeded ``seed + i``: sample i's noise does not depend on
    which batch it is drawn in, and ``seed + 2`` reproduces sample 2 of ``seed``."""
    return [torch.Generator(device=device).manual_seed(int(seed) + i) for i in range(n)]


def randn_like(like: Tensor, generator: GeneratorArg = None) -> Tensor:
    """N(0, I) shaped like ``like``: from one generator, one per sample, or the global RNG.

    Drawn in float32 (then cast), so the same seed gives the same noise in every precision.
    """
    if generator is None:
        return torch.randn(like.shape, device=like.device, dtype=torch.float32).to(like.dtype)
    if isinstance(generator, torch.Generator):
        noise = torch.randn(
            like.shape, generator=generator, device=generator.device, dtype=torch.float32
        )
        return noise.to(device=like.device, dtype=like.dtype)
    generators = _one_per_sample(generator, like.shape[0])
    noise = torch.stack(
        [
            torch.randn(like.shape[1:], generator=g, device=g.device, dtype=torch.float32).to(
                like.device
            )
            for g in generators
        ]
    )
    return noise.to(like.dtype)


def _one_per_sample(generator: Sequence[torch.Generator], n: int) -> list[torch.Generator]:
    generators = list(generator)
    if len(generators) != n:
        raise ValueError(f"got {len(generators)} generators for a batch of {n}: give one per sample")
    return generators


def kept_noise(like: Tensor, generator: GeneratorArg, mask: Tensor) -> Tensor:
    """The noise that re-noises an inpainting's kept region (``randn_like``), drawn only for
    the samples whose ``mask`` keeps something: a sample that keeps nothing (an all-1 mask)
    draws what plain sampling draws, and its result equals plain sampling's, ancestral
    samplers included. With one generator or the global RNG (no per-sample streams) the
    noise is drawn unless no sample keeps anything."""
    keeps = (mask.expand_as(like) < 1).flatten(1).any(1).tolist()
    if generator is None or isinstance(generator, torch.Generator):
        return randn_like(like, generator) if any(keeps) else torch.zeros_like(like)
    generators = _one_per_sample(generator, like.shape[0])
    return torch.stack([
        randn_like(like[i : i + 1], [g])[0] if keep else torch.zeros_like(like[i])
        for i, (g, keep) in enumerate(zip(generators, keeps, strict=True))
    ])  # fmt: skip


def split_generator(generator: GeneratorArg, start: int, stop: int) -> GeneratorArg:
    """The generators of samples ``start:stop`` (a single generator is shared, as given)."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    return list(generator)[start:stop]


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
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to {tuple(z.shape)}"
        ) from err
    lo, hi = float(mask.min()), float(mask.max())
    if not (lo >= 0 and hi <= 1):  # NaN fails both
        raise ValueError(
            f"mask values must be in [0, 1] (1 = generate, 0 = keep), got [{lo}, {hi}]"
        )


def _scalar(value: float, like: Tensor) -> Tensor:
    return torch.tensor(value, device=like.device, dtype=like.dtype)


# -- discrete time -------------------------------------------------------------------------
@dataclass
class DiscreteStep:
    """What :meth:`DiscreteSampler.step` sees for one step from ``t`` to ``t_prev``."""

    i: int  #: step index, 0 = the noisiest
    t: int  #: current timestep
    t_prev: int  #: timestep after the step (-1: clean, alpha_bar = 1)
    z: Tensor  #: z_t
    eps: Tensor  #: the denoiser's eps at (z_t, t), guidance applied
    x0: Tensor  #: the x0 it implies
    alpha_bar: Tensor  #: alpha_bar_t (0-dim)
    alpha_bar_prev: Tensor  #: alpha_bar_{t_prev} (0-dim; 1 for t_prev = -1)
    is_last: bool
    schedule: Any
    denoise: DenoiseFn  #: for samplers that evaluate more than once per step (PLMS's warm-up)
    generator: GeneratorArg
    state: dict = field(default_factory=dict)  #: persists across the steps of one call
    steps: int = 0  #: how many steps this call takes (``i`` runs to ``steps - 1``; 0: not said)

    def noise(self) -> Tensor:
        """Fresh N(0, I) like z, from the call's generator(s)."""
        return randn_like(self.z, self.generator)

    def timestep(self, t: int) -> Tensor:
        return torch.full((self.z.shape[0],), t, device=self.z.device, dtype=torch.long)


class _SpacedSampler(Sampler):
    """What both bases share: ``steps``, the timestep ``spacing`` and the step plan.

    :param steps: denoiser steps (the loop's length; ``spacing="paper"`` may add or drop one, see
        :func:`timestep_pairs`).
    :param spacing: which timesteps the steps visit (:data:`SPACINGS`); default
        ``default_spacing`` of the subclass.
    """

    supports_mask = True
    supports_init = True
    default_spacing = "linspace"
    spacings: dict[str, str] = SPACINGS  #: the ``spacing`` options this kind of sampler takes

    def __init__(self, *, steps: int = 50, spacing: str | None = None) -> None:
        super().__init__(steps=steps)
        spacing = spacing or self.default_spacing
        if spacing not in self.spacings:
            name, expected = type(self).__name__, sorted(self.spacings)
            if spacing in SIGMA_SPACINGS:
                raise ValueError(
                    f"{name} takes no spacing {spacing!r} (a grid of noise levels, for the sigma "
                    f"samplers: SigmaSampler); expected one of {expected}"
                )
            raise ValueError(
                f"{name}: unknown timestep spacing {spacing!r}; expected one of {expected}"
            )
        self.spacing = spacing

    def timesteps(self, schedule: Any, steps: int | None = None) -> list[tuple[int, int]]:
        return timestep_pairs(schedule.timesteps, steps or self.steps, self.spacing)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(steps={self.steps}, spacing={self.spacing!r})"


class DiscreteSampler(_SpacedSampler):
    """Base of the discrete-time samplers: subclasses write :meth:`step` and nothing else
    (``steps`` and ``spacing`` as in :func:`timestep_pairs`)."""

    @abc.abstractmethod
    def step(self, s: DiscreteStep) -> Tensor:
        """Return z at ``s.t_prev`` from the prediction at ``s.t``."""

    def sample(
        self,
        denoise: DenoiseFn,
        schedule: Any,
        noise: Tensor,
        *,
        steps: int | None = None,
        generator: GeneratorArg = None,
        callback: Callback | None = None,
        mask: Tensor | None = None,
        known: Tensor | None = None,
        init: Tensor | None = None,
        strength: float = 1.0,
    ) -> Tensor:
        check_mask(mask, known, noise)
        pairs = self.timesteps(schedule, steps)
        if init is not None:
            pairs = truncate_for_strength(pairs, strength)
            if not pairs:
                return init
            z = schedule.q_sample(
                init, torch.full((noise.shape[0],), pairs[0][0], device=noise.device), noise
            )
        else:
            z = noise
        if mask is not None and init is None:
            # start the known region at the first step's noise level, like every later step
            z = mask * z + (1 - mask) * schedule.q_sample(
                known, torch.full((z.shape[0],), pairs[0][0], device=z.device), noise
            )
        state: dict = {}
        for i, (t, t_prev) in enumerate(pairs):
            tt = torch.full((z.shape[0],), t, device=z.device, dtype=torch.long)
            eps = denoise(z, tt)
            x0 = schedule.predict_x0(z, tt, eps)
            is_last = i == len(pairs) - 1
            s = DiscreteStep(
                i=i, t=t, t_prev=t_prev, z=z, eps=eps, x0=x0,
                alpha_bar=schedule.alpha_bar_at(t, z), alpha_bar_prev=schedule.alpha_bar_at(t_prev, z),
                is_last=is_last, schedule=schedule, denoise=denoise, generator=generator, state=state,
                steps=len(pairs),
            )  # fmt: skip
            z = self.step(s)
            if mask is not None:
                if is_last:
                    kept = known
                else:
                    tp = torch.full((z.shape[0],), t_prev, device=z.device, dtype=torch.long)
                    kept = schedule.q_sample(known, tp, kept_noise(z, generator, mask))
                z = mask * z + (1 - mask) * kept
            if callback is not None:
                callback({"i": i, "t": t, "z": z, "x0": x0})
        return z


# -- continuous time: the sigma bridge ------------------------------------------------------
def sigma_table(schedule: Any) -> Tensor:
    """``sigma_t = sqrt((1 - a_t) / a_t)`` for every discrete timestep (float64, CPU)."""
    a = schedule.alphas_cumprod.double().cpu()
    return ((1 - a) / a).sqrt()


def sigma_to_t(log_sigmas: Tensor, sigma: Tensor, *, quantize: bool = False) -> Tensor:
    """k-diffusion's ``DiscreteSchedule.sigma_to_t``: the fractional timestep whose
    interpolated log-sigma (in the ascending table ``log_sigmas``) is ``log sigma``, clamped to
    ``[0, T - 1]`` (float32), or with ``quantize`` the nearest integer one."""
    log_sigma = sigma.detach().double().cpu().clamp(min=1e-30).log()
    ls = log_sigmas
    if quantize:
        return (log_sigma[..., None] - ls).abs().argmin(-1).to(sigma.device)
    low = torch.searchsorted(ls, log_sigma).clamp(1, len(ls) - 1) - 1
    high = low + 1
    w = ((log_sigma - ls[low]) / (ls[high] - ls[low])).clamp(0, 1)
    return ((1 - w) * low + w * high).to(device=sigma.device, dtype=torch.float32)


def sigma_levels(schedule: Any, steps: int, spacing: str = "linspace") -> list[float]:
    """The ``steps + 1`` descending noise levels of a sigma sampler's chain.

    * ``linspace``: k-diffusion's ``DiscreteSchedule.get_sigmas(steps)``, the grid its wrapper
      of a CompVis model samples on: log-sigma interpolated at the fractional timesteps
      ``linspace(T - 1, 0, S)``, then 0 (equal to the rounded integer grid only when
      ``(T - 1) / (S - 1)`` is whole);
    * ``karras``: ``(sigma_max^(1/rho) + i / (S - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``
      with rho = 7 (Karras et al. 2022, eq. 5; k-diffusion's ``get_sigmas_karras``), then 0;
    * ``exponential``: ``log sigma`` linear from sigma_max to sigma_min
      (``get_sigmas_exponential``), then 0;
    * the other spacings: the sigmas of :func:`timestep_pairs`' integer timesteps, then 0 (or
      sigma_0 for ``paper`` and ``quad``).

    ``sigma_max = sigma_{T-1}`` and ``sigma_min = sigma_0`` are the schedule's ends, as
    k-diffusion's ``CompVisDenoiser`` has them.
    """
    table = sigma_table(schedule)
    T, S = len(table), int(steps)
    if spacing not in SIGMA_SPACINGS and spacing != "linspace":
        return _sigma_levels(table, timestep_pairs(T, S, spacing))
    if S < 1:
        raise ValueError(f"steps must be >= 1, got {S}")
    if spacing == "linspace":
        t = torch.linspace(T - 1, 0, S, dtype=torch.float64)
        sigmas = schedule.log_sigma(t).double().cpu().exp()
    else:
        ramp = torch.linspace(0, 1, S, dtype=torch.float64)
        lo, hi = float(table[0]), float(table[-1])
        if spacing == "karras":
            lo, hi = lo ** (1 / KARRAS_RHO), hi ** (1 / KARRAS_RHO)
            sigmas = (hi + ramp * (lo - hi)) ** KARRAS_RHO
        else:  # exponential
            sigmas = (math.log(hi) + ramp * (math.log(lo) - math.log(hi))).exp()
    return sigmas.tolist() + [0.0]


class SigmaDenoiser:
    """k-diffusion's bridge from a discrete eps-model to ``D(x, sigma) -> x0``.

    ``sigma_t = sqrt((1 - a_t) / a_t)``; for ``x = z_t / sqrt(a_t) = x0 + sigma eps``,
    ``D(x, sigma) = x - sigma * eps(x / sqrt(1 + sigma^2), t(sigma))``. ``t(sigma)`` interpolates
    the schedule's log-sigma table linearly (a fractional timestep, which the UNet's sinusoidal
    embedding takes), or with ``quantize=True`` picks the nearest discrete timestep.
    """

    def __init__(self, denoise: DenoiseFn, schedule: Any, *, quantize: bool = False) -> None:
        self.denoise, self.schedule, self.quantize = denoise, schedule, quantize
        self.sigmas = sigma_table(schedule)
        self.log_sigmas = self.sigmas.log()

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Fractional (or, quantized, integer) timesteps for ``sigma`` (any shape, > 0)."""
        return sigma_to_t(self.log_sigmas, sigma, quantize=self.quantize)

    def eps(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        t = self.sigma_to_t(sigma.reshape(-1)).to(x.device)
        if t.numel() == 1:
            t = t.expand(x.shape[0])
        c_in = (1 / (1 + sigma.reshape(-1) ** 2).sqrt()).to(device=x.device, dtype=x.dtype)
        return self.denoise(x * c_in.reshape(-1, *([1] * (x.ndim - 1))), t)

    def __call__(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """x0 predicted from ``x`` at noise level ``sigma`` (scalar or one per sample)."""
        sig = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(
            -1, *([1] * (x.ndim - 1))
        )
        return x - sig * self.eps(x, sigma)


@dataclass
class SigmaStep:
    """What :meth:`SigmaSampler.step` sees for one step from ``sigma`` to ``sigma_next``."""

    i: int
    x: Tensor  #: x at sigma (``z_t / sqrt(a_t)``)
    sigma: float
    sigma_next: float  #: 0 at the end of a chain that ends clean
    denoised: Tensor  #: D(x, sigma), guidance applied
    is_last: bool
    model: SigmaDenoiser  #: for further evaluations (Heun's corrector)
    generator: GeneratorArg
    state: dict = field(default_factory=dict)
    #: how many steps this call takes (``i`` runs to ``steps - 1``; img2img's ``strength``
    #: shortens it): for samplers that lower their order near the end (UniPC's
    #: ``lower_order_final``); 0 where a caller builds steps by hand and does not say
    steps: int = 0

    def noise(self) -> Tensor:
        return randn_like(self.x, self.generator)


class SigmaSampler(_SpacedSampler):
    """Base of the continuous-time samplers: subclasses write :meth:`step` in sigma space.

    The noise levels are :func:`sigma_levels` (``spacing``, default ``linspace``: k-diffusion's
    ``get_sigmas`` of the CompVis wrapper; also ``karras`` and ``exponential``). Noise drawn
    for z_T in the VP space is mapped to ``x_T = z_T sqrt(1 + sigma_max^2)``, so the same noise
    starts every sampler at the same point (k-diffusion starts at ``z sigma_max``:
    docs/samplers.md says how the two differ).
    """

    spacings = {**SPACINGS, **SIGMA_SPACINGS}

    def __init__(
        self, *, steps: int = 50, spacing: str | None = None, quantize: bool = False
    ) -> None:
        super().__init__(steps=steps, spacing=spacing)
        self.quantize = quantize

    def sigmas(self, schedule: Any, steps: int | None = None) -> list[float]:
        """Descending noise levels, one more than the steps (:func:`sigma_levels`)."""
        return sigma_levels(schedule, steps or self.steps, self.spacing)

    def timesteps(self, schedule: Any, steps: int | None = None) -> list[tuple[float, float]]:
        """``(t, t_next)`` of each step: the timesteps of its noise levels, at which the
        denoiser is evaluated (fractional, integer with ``quantize``; -1: sigma = 0)."""
        sigmas = self.sigmas(schedule, steps)
        return _step_timesteps(sigma_table(schedule).log(), sigmas, self.quantize)

    @abc.abstractmethod
    def step(self, s: SigmaStep) -> Tensor:
        """Return x at ``s.sigma_next``."""

    def churn(
        self, x: Tensor, sigma: float, i: int, steps: int, generator: GeneratorArg
    ) -> tuple[Tensor, float]:
        """``(x, sigma)`` that step ``i`` of ``steps`` starts from (its denoiser call and
        :meth:`step` see them): as given here; a sampler with Karras et al.'s stochastic churn
        (Algorithm 2) adds noise to raise the level to ``sigma_hat >= sigma`` first."""
        return x, sigma

    def sample(
        self,
        denoise: DenoiseFn,
        schedule: Any,
        noise: Tensor,
        *,
        steps: int | None = None,
        generator: GeneratorArg = None,
        callback: Callback | None = None,
        mask: Tensor | None = None,
        known: Tensor | None = None,
        init: Tensor | None = None,
        strength: float = 1.0,
    ) -> Tensor:
        check_mask(mask, known, noise)
        model = SigmaDenoiser(denoise, schedule, quantize=self.quantize)
        sigmas = self.sigmas(schedule, steps)
        if init is not None:
            starts = truncate_for_strength(sigmas[:-1], strength)
            if not starts:
                return init
            sigmas = starts + sigmas[-1:]
        pairs = _step_timesteps(model.log_sigmas, sigmas, self.quantize)
        if init is not None:
            x = init + sigmas[0] * noise
        else:
            x = noise * math.sqrt(1 + sigmas[0] ** 2)
            if mask is not None:
                x = mask * x + (1 - mask) * (known + sigmas[0] * noise)
        state: dict = {}
        for i in range(len(sigmas) - 1):
            x, sigma = self.churn(x, sigmas[i], i, len(sigmas) - 1, generator)
            sigma_next = sigmas[i + 1]
            denoised = model(x, sigma)
            is_last = i == len(sigmas) - 2
            x = self.step(
                SigmaStep(
                    i=i,
                    x=x,
                    sigma=sigma,
                    sigma_next=sigma_next,
                    denoised=denoised,
                    is_last=is_last,
                    model=model,
                    generator=generator,
                    state=state,
                    steps=len(sigmas) - 1,
                )
            )
            if mask is not None:
                if is_last:
                    # undo the final division below: the kept region ends equal to known, also
                    # for spacings that end at sigma_0 > 0 (paper, quad)
                    kept = known * math.sqrt(1 + sigma_next**2)
                else:
                    kept = known + sigma_next * kept_noise(x, generator, mask)
                x = mask * x + (1 - mask) * kept
            if callback is not None:
                callback(
                    {
                        "i": i,
                        "t": pairs[i][0],
                        "z": x / math.sqrt(1 + sigma_next**2),
                        "x0": denoised,
                    }
                )
        # back to the VP latent (a no-op when the chain ends at sigma = 0)
        return x / math.sqrt(1 + sigmas[-1] ** 2)


def _sigma_levels(table: Tensor, pairs: list[tuple[int, int]]) -> list[float]:
    """sigma of each step's start, then of the chain's end (0 for t = -1)."""
    return [0.0 if t < 0 else float(table[t]) for t in [t for t, _ in pairs] + [pairs[-1][1]]]


def _step_timesteps(
    log_sigmas: Tensor, sigmas: list[float], quantize: bool
) -> list[tuple[float, float]]:
    """``(t, t_next)`` for consecutive noise levels (-1 for sigma = 0)."""
    ts = sigma_to_t(log_sigmas, torch.tensor(sigmas, dtype=torch.float64), quantize=quantize)
    ts = [-1 if sigma == 0 else t for sigma, t in zip(sigmas, ts.tolist(), strict=True)]
    return list(zip(ts[:-1], ts[1:], strict=True))


__all__ = [
    "SPACINGS",
    "DiscreteSampler",
    "DiscreteStep",
    "GeneratorArg",
    "SigmaDenoiser",
    "SigmaSampler",
    "SigmaStep",
    "SIGMA_SPACINGS",
    "check_mask",
    "kept_noise",
    "check_spacing",
    "sigma_levels",
    "sigma_table",
    "randn_like",
    "sample_generators",
    "split_generator",
    "timestep_pairs",
    "truncate_for_strength",
]
