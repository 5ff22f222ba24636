"""Registers the samplers and their config group with ldmkit."""

from pathlib import Path

import ldmkit


@ldmkit.hookimpl
def ldmkit_register_samplers(register):
    from ldmkit_samplers.ddim import DDIMSampler
    from ldmkit_samplers.ddpm import DDPMSampler

    register("ddpm", DDPMSampler)
    register("ddim", DDIMSampler)


@ldmkit.hookimpl
def ldmkit_register_configs(register):
    register(Path(__file__).parent / "conf")
