"""The diffusion process: schedules, forward process, parameterizations, guidance.

Owns the forward process and what every sampler shares. ``timesteps`` and ``schedule``
import nothing of ldmkit above them (``interfaces`` names the ``NoiseSchedule``); the rest may
import the foundation and ``interfaces`` (the ``Sampler`` base); never plugins, configs,
training or the pipeline.
"""

from ldmkit.diffusion.guidance import ClassifierFreeGuidance
from ldmkit.diffusion.sampling import (
    DiscreteSampler,
    DiscreteStep,
    SigmaDenoiser,
    SigmaSampler,
    SigmaStep,
    randn_like,
    sample_generators,
    sigma_levels,
)
from ldmkit.diffusion.schedule import NoiseSchedule, make_betas
from ldmkit.diffusion.timesteps import SIGMA_SPACINGS, SPACINGS, timestep_pairs

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
