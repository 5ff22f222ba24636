"""Registers the ``unet`` denoiser and the ``denoiser/unet*`` config options."""

from __future__ import annotations

from pathlib import Path

import ldmkit


@ldmkit.hookimpl
def ldmkit_register_denoisers(register):
    from ldmkit_unet.unet import UNetModel

    register("unet", UNetModel)


@ldmkit.hookimpl
def ldmkit_register_configs(register):
    register(Path(__file__).parent / "conf")
