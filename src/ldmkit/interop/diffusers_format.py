"""The diffusers format's public names in one module (they live in
:mod:`ldmkit.interop.diffusers`, one module a component: see its docstring)."""

from ldmkit.interop.diffusers.autoencoder import (
    diffusers_vae_config,
    vae_from_diffusers,
    vae_to_diffusers,
)
from ldmkit.interop.diffusers.common import DIFFUSERS_VERSION, ConversionError, ConversionWarning
from ldmkit.interop.diffusers.folder import describe, fit_state, read_diffusers, to_diffusers
from ldmkit.interop.diffusers.scheduler import diffusers_scheduler_config
from ldmkit.interop.diffusers.unet import (
    diffusers_unet_config,
    unet_from_diffusers,
    unet_to_diffusers,
)

__all__ = [
    "DIFFUSERS_VERSION",
    "ConversionError",
    "ConversionWarning",
    "describe",
    "diffusers_scheduler_config",
    "diffusers_unet_config",
    "diffusers_vae_config",
    "fit_state",
    "read_diffusers",
    "to_diffusers",
    "unet_from_diffusers",
    "unet_to_diffusers",
    "vae_from_diffusers",
    "vae_to_diffusers",
]
