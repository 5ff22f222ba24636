"""An example third-party ldmkit plugin: DDIM with dynamic thresholding."""

from ldmkit_thresholding.thresholded_ddim import ThresholdedDDIMSampler

__all__ = ["ThresholdedDDIMSampler"]
