"""The ``Sampler`` interface: the reverse process, run in latent space.

A sampler is written against a plain *denoise callable*::

    denoise(z_t: Tensor, t: Tensor) -> eps_hat: Tensor

with ``t`` a LongTensor of discrete timesteps (shape B, values in ``[0, T)``) and the
return value the predicted noise. The pipeline builds it from the Denoiser, converts
``x0``/``v`` predictions to ``eps`` and wraps classifier-free guidance around it, so a
sampler never sees the condition or the guidance scale.

A complete minimal plugin (deterministic DDIM, eta = 0, Song et al. 2021 eq. 12)::

    import torch
    import ldmkit
    from ldmkit.interfaces import Sampler

    class TinyDDIM(Sampler):
        def sample(self, denoise, schedule, noise, *, steps=None, generator=None,
                   callback=None, mask=None, known=None):
            timesteps = schedule.spaced_timesteps(steps or self.steps)
            z = noise
            for i, t in enumerate(timesteps):
                tt = torch.full((z.shape[0],), int(t), device=z.device, dtype=torch.long)
                eps = denoise(z, tt)
                x0 = schedule.predict_x0(z, tt, eps)
                prev = int(timesteps[i + 1]) if i + 1 < len(timesteps) else -1
                a_prev = schedule.alpha_bar_at(prev, z)
                z = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
                if callback is not None:
                    callback({"i": i, "t": int(t), "z": z, "x0": x0})
            return z

    @ldmkit.hookimpl
    def ldmkit_register_samplers(register):
        register("tiny_ddim", TinyDDIM)
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch import Tensor

if TYPE_CHECKING:
    from ldmkit.diffusion.schedule import NoiseSchedule

DenoiseFn = Callable[[Tensor, Tensor], Tensor]
Callback = Callable[[dict[str, Any]], None]


class Sampler(abc.ABC):
    """A reverse-process algorithm. Not a module: it holds no weights.

    ``supports_mask`` says whether ``sample`` honours ``mask``/``known``
    (inpainting: where ``mask`` is 1 the result is generated, where it is 0 the
    result equals ``known``, re-noised to each step's level while sampling).
    """

    supports_mask: bool = False

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
    ) -> Tensor:
        """Run the reverse process from ``noise`` (z_T) and return z_0.

        :param denoise: ``(z_t, t) -> eps_hat``, guidance already applied.
        :param schedule: the noise schedule the denoiser was trained with.
        :param noise: the starting latent z_T ~ N(0, I), B×c×h×w.
        :param steps: number of denoiser evaluations' steps (default ``self.steps``).
        :param generator: ``torch.Generator`` for any fresh noise the algorithm draws.
        :param callback: called after each step with a dict (``i``, ``t``, ``z``, ``x0``).
        :param mask: 1 where to generate, 0 where to keep ``known`` (B×1×h×w or B×c×h×w).
        :param known: the known latent z_0 for the kept region.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}(steps={self.steps})"
