"""Registers the samplers and their config group with ldmkit."""

from pathlib import Path

import ldmkit


@ldmkit.hookimpl
def ldmkit_register_samplers(register):
    import ldmkit_samplers as samplers

    register("ddpm", samplers.DDPMSampler)
    register("ddim", samplers.DDIMSampler)
    register("dpm_2", samplers.DPM2Sampler)
    register("dpm_2_ancestral", samplers.DPM2AncestralSampler)
    register("plms", samplers.PLMSSampler)
    register("dpmpp_2m", samplers.DPMSolverPP2MSampler)
    register("dpmpp_2m_sde", samplers.DPMSolverPP2MSDESampler)
    register("dpmpp_2s_ancestral", samplers.DPMSolverPP2SAncestralSampler)
    register("dpmpp_3m_sde", samplers.DPMSolverPP3MSDESampler)
    register("euler", samplers.EulerSampler)
    register("euler_ancestral", samplers.EulerAncestralSampler)
    register("heun", samplers.HeunSampler)
    register("lms", samplers.LMSSampler)
    register("unipc", samplers.UniPCSampler)


@ldmkit.hookimpl
def ldmkit_register_configs(register):
    register(Path(__file__).parent / "conf")
