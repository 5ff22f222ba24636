"""The order a sampler declares (:attr:`ldmkit.interfaces.Sampler.convergence_order`, checked by
``ldmkit.testing.SamplerConformance``): its ODE solver's while it draws no fresh noise, none once
it does."""

from __future__ import annotations


class NoiselessOrder:
    """A sampler mixin: ``convergence_order`` is the class's ``ode_order`` (the order of the
    deterministic solver it becomes) while :meth:`draws_noise` is False, None after. The default
    reads ``eta`` (DDIM's, or the ancestral and SDE samplers' noise scale): noise at ``eta > 0``."""

    ode_order: float

    def draws_noise(self) -> bool:
        return self.eta != 0

    @property
    def convergence_order(self) -> float | None:
        return None if self.draws_noise() else self.ode_order
