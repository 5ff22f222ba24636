"""First-party ldmkit samplers, one module per algorithm."""

from ldmkit_samplers.ddim import DDIMSampler
from ldmkit_samplers.ddpm import DDPMSampler

__all__ = ["DDIMSampler", "DDPMSampler"]
