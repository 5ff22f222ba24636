"""The four interfaces every ldmkit component implements.

Owns the contracts plugins implement. May import the foundation and ``diffusion``
(the schedule a sampler receives); never plugins, configs, training or the pipeline.
"""

from ldmkit.interfaces.component import Component
from ldmkit.interfaces.conditioner import (
    CONDITION_ROLES,
    INPUT_KINDS,
    Conditioner,
    ConditionValueError,
    MissingConditionError,
)
from ldmkit.interfaces.denoiser import PREDICTIONS, Denoiser
from ldmkit.interfaces.first_stage import FirstStage
from ldmkit.interfaces.sampler import Callback, DenoiseFn, Sampler

INTERFACES = {
    "first_stage": FirstStage,
    "denoiser": Denoiser,
    "conditioner": Conditioner,
    "sampler": Sampler,
}

__all__ = [
    "CONDITION_ROLES",
    "INPUT_KINDS",
    "INTERFACES",
    "MissingConditionError",
    "PREDICTIONS",
    "Callback",
    "Component",
    "ConditionValueError",
    "Conditioner",
    "DenoiseFn",
    "Denoiser",
    "FirstStage",
    "Sampler",
]
