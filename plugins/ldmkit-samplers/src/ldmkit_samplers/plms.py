"""PLMS: Liu, Ren, Lin & Zhao, "Pseudo Numerical Methods for Diffusion Models on Manifolds",
ICLR 2022, as the latent diffusion paper's ``plms.py`` runs it.

Every step is the DDIM "transfer part" phi (the PNDM paper's eq. 9; DDIM's eq. 12 with
sigma = 0) fed a combination ``eps'`` of the current and previous noise predictions instead of
the current one, with the Adams-Bashforth coefficients of the pseudo linear multi-step method:

* first step: the pseudo improved Euler warm-up,
  ``eps' = (eps_t + eps(phi(z_t, eps_t, t, t_next), t_next)) / 2`` (two denoiser evaluations);
* second step: ``(3 eps_t - eps_prev) / 2``;
* third step: ``(23 eps_t - 16 eps_prev + 5 eps_prev2) / 12``;
* then: ``(55 eps_t - 59 eps_prev + 37 eps_prev2 - 9 eps_prev3) / 24``,

where ``eps_prev`` are the denoiser's own predictions at the earlier steps (not the combined
ones). This start differs from the PNDM paper's F-PNDM, which warms up with three pseudo
Runge-Kutta steps; it is the latent diffusion code's, which this module reproduces: with
``spacing="paper"`` (the default) it equals CompVis/latent-diffusion's ``PLMSSampler`` step for
step (checked against it in the tests).
"""

from __future__ import annotations

from torch import Tensor

from ldmkit.diffusion import DiscreteSampler, DiscreteStep

# Adams-Bashforth coefficients for eps_t, eps_prev, eps_prev2, eps_prev3 (by history length)
ADAMS_BASHFORTH = {
    1: ((3, -1), 2),
    2: ((23, -16, 5), 12),
    3: ((55, -59, 37, -9), 24),
}


class PLMSSampler(DiscreteSampler):
    """Pseudo linear multistep sampler, deterministic (the paper's code allows no eta).

    ``steps`` steps cost ``steps + 1`` denoiser evaluations (the warm-up evaluates twice).
    Default spacing: ``paper``.
    """

    default_spacing = "paper"

    # above first order on every spacing, what SamplerConformance measures on the probability-flow
    # ODE at 10-40 steps: 2.05 on linspace, 1.59 on paper, 1.56 on quad (the fourth-order formula's
    # fixed weights reach their order only after many more, evenly spaced steps); DDIM's step alone
    # (no multistep) measures 0.9-1.0. On trailing, whose last step (T / S long) ends at alpha_bar = 1,
    # PLMS measures 0.97, below this: measure its order on another spacing (order_spacing)
    convergence_order = 1.5

    def __init__(self, *, steps: int = 50, spacing: str | None = None) -> None:
        super().__init__(steps=steps, spacing=spacing)

    def step(self, s: DiscreteStep) -> Tensor:
        history: list[Tensor] = s.state.setdefault("eps", [])  # newest last
        if not history:
            z_next = self._transfer(s, s.eps)
            # the paper evaluates the warm-up's end at the next visited timestep; in a one-step
            # chain that is the same timestep again (its time_range[min(i + 1, len - 1)])
            t_next = s.t if s.is_last else s.t_prev
            eps_next = s.denoise(z_next, s.timestep(t_next))
            eps = (s.eps + eps_next) / 2
        else:
            weights, scale = ADAMS_BASHFORTH[len(history)]
            eps = weights[0] * s.eps
            for weight, previous in zip(weights[1:], reversed(history), strict=True):
                eps = eps + weight * previous
            eps = eps / scale
        history.append(s.eps)
        del history[:-3]
        return self._transfer(s, eps)

    @staticmethod
    def _transfer(s: DiscreteStep, eps: Tensor) -> Tensor:
        """phi(z_t, eps, t, t_prev): the deterministic DDIM step with the given eps."""
        a, a_prev = s.alpha_bar, s.alpha_bar_prev
        x0 = (s.z - (1 - a).sqrt() * eps) / a.sqrt()
        return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
