"""An example third-party ldmkit plugin: Heun's sampler."""

from ldmkit_heun.heun import HeunSampler

__all__ = ["HeunSampler"]
