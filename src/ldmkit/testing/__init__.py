"""Test helpers for ldmkit components, for first-party and third-party plugins alike.

* Conformance mixins (``FirstStageConformance``, ``DenoiserConformance``,
  ``ConditionerConformance``, ``SamplerConformance``): subclass one in a pytest class,
  implement its ``make_*`` method(s) and every contract test of that interface runs
  against your component.
* The ``ldmkit_plugin`` pytest fixture (auto-loaded through the ``pytest11`` entry point)
  registers a temporary plugin and removes it after the test.

Owns the conformance mixins and fixtures. A workflow module (layer 5): may import the
interfaces, ``diffusion`` and ``plugins``; never ``cli``.
"""

from ldmkit.testing.conformance import (
    ConditionerConformance,
    DenoiserConformance,
    FirstStageConformance,
    SamplerConformance,
    perturb_parameters,
    point_mass_denoiser,
)
from ldmkit.testing.plugins import temporary_plugin

__all__ = [
    "ConditionerConformance",
    "DenoiserConformance",
    "FirstStageConformance",
    "SamplerConformance",
    "perturb_parameters",
    "point_mass_denoiser",
    "temporary_plugin",
]
