"""Training objectives of the core: the first stage's autoencoder loss (L1 + LPIPS +
PatchGAN with an adaptive weight), its discriminator and the LPIPS loader.

Owns the training objectives of the first stage. May import the foundation (``errors``);
never ``training``, ``pipeline`` or plugins.
"""

from ldmkit.losses.autoencoder import AutoencoderLoss, adaptive_weight
from ldmkit.losses.discriminator import PatchDiscriminator, hinge_d_loss, vanilla_d_loss
from ldmkit.losses.perceptual import (
    LPIPS,
    MissingWeightsError,
    require_vgg16_weights,
    torch_hub_checkpoints_dir,
    vgg16_weights_path,
)

__all__ = [
    "LPIPS",
    "AutoencoderLoss",
    "MissingWeightsError",
    "PatchDiscriminator",
    "adaptive_weight",
    "hinge_d_loss",
    "require_vgg16_weights",
    "torch_hub_checkpoints_dir",
    "vanilla_d_loss",
    "vgg16_weights_path",
]
