"""ldmkit-unet: the paper's time-conditional UNet denoiser (registered as ``unet``)."""

from ldmkit_unet.unet import UNetModel

__all__ = ["UNetModel"]
