"""The diffusion process: schedules, forward process, parameterizations, guidance."""

from ldmkit.diffusion.guidance import ClassifierFreeGuidance
from ldmkit.diffusion.sampling import (
    SPACINGS,
    DiscreteSampler,
    DiscreteStep,
    SigmaDenoiser,
    SigmaSampler,
    SigmaStep,
    randn_like,
    sample_generators,
    timestep_pairs,
)
from ldmkit.diffusion.schedule import NoiseSchedule, make_betas

__all__ = [
    "SPACINGS",
    "ClassifierFreeGuidance",
    "DiscreteSampler",
    "DiscreteStep",
    "NoiseSchedule",
    "SigmaDenoiser",
    "SigmaSampler",
    "SigmaStep",
    "make_betas",
    "randn_like",
    "sample_generators",
    "timestep_pairs",
]
