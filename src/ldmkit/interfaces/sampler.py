"""The ``Sampler`` interface: the reverse process, run in latent space.

A sampler is written against a plain *denoise callable*::

    denoise(z_t: Tensor, t: Tensor) -> eps_hat: Tensor

with ``t`` the timesteps (shape B, values in ``[0, T)``: integers from discrete-time
samplers, fractional ones from the sigma bridge unless it is told to ``quantize``) and the
return value the predicted noise. The pipeline builds it from the Denoiser, converts
``x0``/``v`` predictions to ``eps`` and wraps classifier-free guidance around it, so a
sampler never sees the condition or the guidance scale.

Samplers come in one shape. A discrete-time sampler subclasses
:class:`ldmkit.diffusion.DiscreteSampler` and writes only its step; the base runs the loop
(timestep ``spacing``, inpainting masks, img2img ``init``/``strength``, per-sample noise,
progress). A complete plugin (deterministic DDIM, Song et al. 2021 eq. 12)::

    import ldmkit
    from ldmkit.diffusion import DiscreteSampler

    class TinyDDIM(DiscreteSampler):
        def step(self, s):
            a_prev = s.alpha_bar_prev
            return a_prev.sqrt() * s.x0 + (1 - a_prev).sqrt() * s.eps

    @ldmkit.hookimpl
    def ldmkit_register_samplers(register):
        register("tiny_ddim", TinyDDIM)

A continuous-time sampler (Euler, Heun, DPM-Solver) subclasses
:class:`ldmkit.diffusion.SigmaSampler` and writes its step in k-diffusion's variables
``x = z_t / sqrt(a_t)``, ``sigma_t = sqrt((1 - a_t) / a_t)``, with ``s.denoised = D(x, sigma)``
(Euler, Karras et al. 2022 Algorithm 2 without churn)::

    from ldmkit.diffusion import SigmaSampler

    class TinyEuler(SigmaSampler):
        def step(self, s):
            return s.x + (s.sigma_next - s.sigma) * (s.x - s.denoised) / s.sigma

Only subclasses of these bases get the shared behaviour (``spacing``, masks, img2img,
per-sample seeds) and the whole of :class:`ldmkit.testing.SamplerConformance`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch import Tensor

from ldmkit.interfaces.component import Component

if TYPE_CHECKING:
    from ldmkit.diffusion.schedule import NoiseSchedule

DenoiseFn = Callable[[Tensor, Tensor], Tensor]
Callback = Callable[[dict[str, Any]], None]


class Sampler(Component, abc.ABC):
    """A reverse-process algorithm. Not a module: it holds no weights.

    What ``sample`` honours beyond the plain reverse process is declared, so that
    ``Pipeline.sample`` refuses a request the sampler would ignore, before it runs:

    * ``supports_mask``: ``mask``/``known`` (inpainting: where ``mask`` is 1 the result is
      generated, where it is 0 the result equals ``known``, re-noised to each step's level
      while sampling);
    * ``supports_init``: ``init``/``strength`` (img2img: start from a noised clean latent).

    Both are False here and True on the bases :class:`ldmkit.diffusion.DiscreteSampler` and
    :class:`ldmkit.diffusion.SigmaSampler`, which implement them.

    ``convergence_order``: for a deterministic sampler, the order it converges at on the
    probability-flow ODE (1 for DDIM and Euler, 2 for Heun); None (the default) when it draws
    noise or declares none. :class:`ldmkit.testing.SamplerConformance` measures at least that
    order, so a "Heun" that is really Euler fails it.
    """

    steps: int  #: set by ``Sampler.__init__`` (call ``super().__init__(steps=...)``)
    supports_mask: bool = False
    supports_init: bool = False
    convergence_order: float | None = None

    def __init__(self, *, steps: int = 50) -> None:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.steps = steps

    @abc.abstractmethod
    def sample(
        self,
        denoise: DenoiseFn,
        schedule: NoiseSchedule,
        noise: Tensor,
        *,
        steps: int | None = None,
        generator: Any = None,
        callback: Callback | None = None,
        mask: Tensor | None = None,
        known: Tensor | None = None,
        init: Tensor | None = None,
        strength: float = 1.0,
    ) -> Tensor:
        """Run the reverse process from ``noise`` (z_T) and return z_0.

        :param denoise: ``(z_t, t) -> eps_hat``, guidance already applied.
        :param schedule: the noise schedule the denoiser was trained with.
        :param noise: the starting latent z_T ~ N(0, I), B×c×h×w.
        :param steps: number of denoiser evaluations' steps (default ``self.steps``).
        :param generator: a ``torch.Generator``, or one per sample (sample i draws all of its
            fresh noise from ``generator[i]``), for any noise the algorithm draws.
        :param callback: called after each step with a dict (``i``, ``t``, ``z``, ``x0``).
        :param mask: 1 where to generate, 0 where to keep ``known`` (B×1×h×w or B×c×h×w).
        :param known: the known latent z_0 for the kept region.
        :param init: img2img / SDEdit: a clean latent to start from instead of pure noise; it is
            noised (with ``noise``) to the level of the step where ``strength`` starts.
        :param strength: in [0, 1]: the share of the steps run from ``init`` (0 returns
            ``init``, 1 starts from ``init`` noised to the first step's level).
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}(steps={self.steps})"
