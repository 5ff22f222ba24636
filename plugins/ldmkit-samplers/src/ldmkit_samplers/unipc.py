"""UniPC: Zhao, Bai, Rao, Zhou & Lu, "UniPC: A Unified Predictor-Corrector Framework for Fast
Sampling of Diffusion Models", NeurIPS 2023 (Algorithms 2 and 3, the B(h) forms), in the
data-prediction form that diffusers' ``UniPCMultistepScheduler`` uses by default.

Like DPM-Solver++ it integrates the data-prediction ODE in ``lambda = -log sigma``. A step from
``lambda_0`` to ``lambda_t = lambda_0 + h`` combines the newest denoised value ``D_0`` with the
differences to the older ones, ``Delta_k = (D_k - D_0) / r_k`` at ``r_k = (lambda_k - lambda_0) / h``::

    x_t = (sigma_t / sigma_0) x_0 + (1 - e^{-h}) D_0 - B(h) sum_k rho_k Delta_k

with ``B(h) = e^{-h} - 1`` (``bh2``, for guided sampling) or ``-h`` (``bh1``), and the weights
``rho`` solving ``sum_k rho_k r_k^(i-1) = i! phi_{i+1}(-h) / B(h)`` (eq. 8 of the paper; the
order-2 predictor takes ``rho = 1/2``, as the reference code does). That is the predictor
UniP-p. The corrector UniC re-takes the step just made once the denoiser has been evaluated at
its end, adding that new value as one more difference (``r = 1``): the order rises by one, and
it costs no evaluation, since the next step needs the value anyway. The corrected point is the
one the next step starts from; the denoiser's value at the uncorrected one is kept.

The first steps warm up (order 1, 2, ... as values accumulate); ``lower_order_final`` lowers the
order again over the last steps, where few steps make the high-order weights unstable; a step
to ``sigma = 0`` returns the denoised value (order 1 there: ``h`` is infinite).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ldmkit.diffusion import SigmaSampler, SigmaStep

VARIANTS = ("bh1", "bh2")


def b_of_h(h: float, variant: str) -> float:
    """The paper's ``B(h)`` for a step of length ``h`` in lambda: ``e^-h - 1`` (``bh2``) or ``-h``."""
    return math.expm1(-h) if variant == "bh2" else -h


def unipc_weights(rks: list[float], h: float, variant: str, corrector: bool) -> list[float]:
    """``rho`` of one UniP (``corrector=False``) or UniC step of order ``len(rks)``.

    ``rks`` are the ``r_k`` of the older values, then 1 for the step's end (the predictor
    leaves that one out: it does not know that value yet).
    """
    order = len(rks)
    hh = -h  # data prediction integrates backwards in this sign convention
    b_h = b_of_h(h, variant)
    # g runs through phi_2(hh), phi_3(hh), ... (phi_1(hh) hh = e^hh - 1 and
    # phi_{k+1}(hh) = (phi_k(hh) - 1/k!) / hh); b_i = i! phi_{i+1}(hh) / B(h)
    g = math.expm1(hh) / hh - 1
    factorial = 1
    b = []
    for i in range(1, order + 1):
        b.append(g * factorial / b_h)
        factorial *= i + 1
        g = g / hh - 1 / factorial
    if order == (1 if corrector else 2):
        return [0.5]  # the reference code's weight for the lowest order that has one
    if not corrector:  # the predictor solves without the step's end
        rks, b = rks[:-1], b[:-1]
    if not rks:
        return []
    matrix = torch.tensor([[r**i for r in rks] for i in range(len(rks))], dtype=torch.float64)
    return torch.linalg.solve(matrix, torch.tensor(b, dtype=torch.float64)).tolist()


class UniPCSampler(SigmaSampler):
    """Deterministic multistep predictor-corrector; one denoiser evaluation per step.
    Default spacing: ``linspace``.

    :param order: the predictor's order once warmed up (1-3; diffusers' ``solver_order``,
        default 2; the corrector adds one).
    :param variant: ``bh2`` (default; the paper's choice for guided sampling) or ``bh1``.
    :param corrector: apply UniC after each step but the last (false: UniP alone, the plain
        multistep predictor; ``order=2`` is then DPM-Solver++(2M)'s update).
    :param lower_order_final: at most order ``steps - i`` at step ``i``, as diffusers' default.
    """

    @property
    def convergence_order(self) -> float | None:
        """What the conformance order check (``quad`` spacing, 10-40 steps) can rely on: 1 for
        ``order=1`` without the corrector (that is DDIM); 2 for ``order`` 1 or 2 otherwise
        (measured: 1.87 at ``order=1`` with the corrector, 3.57 with it and 2.19 without at
        ``order=2``). None at ``order=3``: on that grid the third-order extrapolation is no
        more accurate than the second (1.67 measured), as in diffusers' scheduler."""
        if self.order == 3:
            return None
        return 1 if self.order == 1 and not self.corrector else 2

    def __init__(
        self,
        *,
        steps: int = 20,
        order: int = 2,
        variant: str = "bh2",
        corrector: bool = True,
        lower_order_final: bool = True,
        spacing: str | None = None,
        quantize: bool = False,
    ) -> None:
        super().__init__(steps=steps, spacing=spacing, quantize=quantize)
        if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= 3:
            raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        for name, value in (("corrector", corrector), ("lower_order_final", lower_order_final)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be true or false, got {value!r}")
        self.order = order
        self.variant = variant
        self.corrector = corrector
        self.lower_order_final = lower_order_final

    def _update(
        self, x: Tensor, sigma: float, sigma_next: float, history: list[tuple[float, Tensor]],
        order: int, new: Tensor | None = None,
    ) -> Tensor:
        """One UniP step (``new=None``) or UniC step (``new``: the denoised value at the end)
        from ``x`` at ``sigma``; ``history`` is newest first, ``history[0]`` at ``sigma``."""
        lam = -math.log(sigma)
        h = -math.log(sigma_next) - lam
        newest = history[0][1]
        older = history[1:order]
        rks = [(-math.log(s) - lam) / h for s, _ in older] + [1.0]
        rhos = unipc_weights(rks, h, self.variant, corrector=new is not None)
        differences = [(value - newest) / r for (_, value), r in zip(older, rks, strict=False)]
        if new is not None:
            differences.append(new - newest)
        out = (sigma_next / sigma) * x - math.expm1(-h) * newest
        if differences:
            out = out - b_of_h(h, self.variant) * sum(rho * d for rho, d in zip(rhos, differences, strict=True))
        return out

    def step(self, s: SigmaStep) -> Tensor:
        if s.sigma_next == s.sigma:
            # a repeated level (``quad`` spacing repeats small ones): no step, and no value
            # twice in the history
            return s.x
        history: list[tuple[float, Tensor]] = s.state.setdefault("history", [])  # newest first
        x = s.x
        last = s.state.pop("last", None)  # (x the last step started from, its order)
        if self.corrector and last is not None and s.sigma_next != 0:
            # (at a step to sigma = 0 the result is D(x; sigma) whatever x was corrected to)
            x = self._update(last[0], history[0][0], s.sigma, history, last[1], new=s.denoised)
        history.insert(0, (s.sigma, s.denoised))
        del history[self.order :]
        if s.sigma_next == 0:
            return s.denoised
        order = len(history)
        if self.lower_order_final and s.steps:
            order = min(order, s.steps - s.i)
        s.state["last"] = (x, order)
        return self._update(x, s.sigma, s.sigma_next, history, order)
