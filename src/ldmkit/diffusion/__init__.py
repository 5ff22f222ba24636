"""The diffusion process: schedules, forward process, parameterizations, guidance."""

from ldmkit.diffusion.guidance import ClassifierFreeGuidance
from ldmkit.diffusion.schedule import NoiseSchedule, make_betas

__all__ = ["ClassifierFreeGuidance", "NoiseSchedule", "make_betas"]
