"""Linear multistep (LMS) on the probability-flow ODE: the Adams-Bashforth method with variable
steps (Hairer, Norsett & Wanner, "Solving Ordinary Differential Equations I", Sec. III.1), in
k-diffusion's ``sample_lms`` form (Crowson's k-diffusion, after Karras et al. 2022, eq. 1 and 3).

The ODE in ``x = z_t / sqrt(a_t)``, ``sigma = sqrt((1 - a_t) / a_t)`` is
``dx / dsigma = d(x, sigma) = (x - D(x; sigma)) / sigma``. Each step interpolates the slopes of
the last ``k = min(order, steps so far)`` steps by the polynomial through their sigmas and
integrates it over the step::

    x_next = x + sum_j c_j d_{i-j},    c_j = int_sigma^sigma_next prod_{m != j}
                                             (s - sigma_{i-m}) / (sigma_{i-j} - sigma_{i-m}) ds

k-diffusion integrates the Lagrange basis with ``scipy.integrate.quad``; here the polynomial is
integrated exactly (:func:`lagrange_weights`). The first step is Euler, the second second
order, and so on up to ``order`` (k-diffusion's default 4).
"""

from __future__ import annotations

from torch import Tensor

from ldmkit.diffusion import SigmaSampler, SigmaStep


def lagrange_weights(nodes: list[float], start: float, end: float) -> list[float]:
    """``int_start^end l_j(s) ds`` for each Lagrange basis polynomial ``l_j`` of ``nodes``."""
    shifted = [node - start for node in nodes]  # integrate in s - start: no large powers
    length = end - start
    weights = []
    for j, node_j in enumerate(shifted):
        poly = [1.0]  # coefficients of l_j in (s - start), lowest power first
        for m, node_m in enumerate(shifted):
            if m == j:
                continue
            scale = node_j - node_m
            poly = [
                ((poly[p - 1] if p else 0.0) - node_m * (poly[p] if p < len(poly) else 0.0)) / scale
                for p in range(len(poly) + 1)
            ]
        weights.append(sum(c * length ** (p + 1) / (p + 1) for p, c in enumerate(poly)))
    return weights


class LMSSampler(SigmaSampler):
    """Deterministic, order ``order`` once warmed up; one denoiser evaluation per step.
    Default spacing: ``linspace``.

    :param order: how many past slopes each step combines (k-diffusion's default 4).
    """

    @property
    def convergence_order(self) -> float:
        """1 for ``order = 1`` (Euler); else 2: the Euler first step caps the global order."""
        return 1 if self.order == 1 else 2

    def __init__(
        self,
        *,
        steps: int = 50,
        order: int = 4,
        spacing: str | None = None,
        quantize: bool = False,
    ) -> None:
        super().__init__(steps=steps, spacing=spacing, quantize=quantize)
        if isinstance(order, bool) or not isinstance(order, int) or order < 1:
            raise ValueError(f"order must be an integer >= 1, got {order!r}")
        self.order = order

    def step(self, s: SigmaStep) -> Tensor:
        if s.sigma_next == s.sigma:
            # a repeated level (``quad`` spacing repeats small ones): no step, and no node
            # twice in the interpolation
            return s.x
        history: list[tuple[float, Tensor]] = s.state.setdefault("slopes", [])  # newest first
        history.insert(0, (s.sigma, (s.x - s.denoised) / s.sigma))
        del history[self.order :]
        weights = lagrange_weights([sigma for sigma, _ in history], s.sigma, s.sigma_next)
        x = s.x
        for weight, (_, d) in zip(weights, history, strict=True):
            x = x + weight * d
        return x

    def __repr__(self) -> str:
        return f"LMSSampler(steps={self.steps}, order={self.order}, spacing={self.spacing!r})"
