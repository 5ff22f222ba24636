"""The diffusion process: schedules, forward process, parameterizations, guidance.

Owns the forward process and what every sampler shares. May import the foundation and
``interfaces`` (the ``Sampler`` base); never plugins, configs, training or the pipeline.
"""

from ldmkit.diffusion.guidance import ClassifierFreeGuidance
from ldmkit.diffusion.sampling import (
    SIGMA_SPACINGS,
    SPACINGS,
    DiscreteSampler,
    DiscreteStep,
    SigmaDenoiser,
    SigmaSampler,
    SigmaStep,
    randn_like,
    sample_generators,
    sigma_levels,
    timestep_pairs,
)
from ldmkit.diffusion.schedule import NoiseSchedule, make_betas

__all__ = [
    "SIGMA_SPACINGS",
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
    "sigma_levels",
    "timestep_pairs",
]
