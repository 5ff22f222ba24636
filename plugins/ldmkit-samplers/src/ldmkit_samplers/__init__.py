"""First-party ldmkit samplers, one module per algorithm."""

from ldmkit_samplers.ddim import DDIMSampler
from ldmkit_samplers.ddpm import DDPMSampler
from ldmkit_samplers.dpm_2 import DPM2Sampler
from ldmkit_samplers.dpm_2_ancestral import DPM2AncestralSampler
from ldmkit_samplers.dpmpp_2m import DPMSolverPP2MSampler
from ldmkit_samplers.dpmpp_2m_sde import DPMSolverPP2MSDESampler
from ldmkit_samplers.dpmpp_2s_ancestral import DPMSolverPP2SAncestralSampler
from ldmkit_samplers.dpmpp_3m_sde import DPMSolverPP3MSDESampler
from ldmkit_samplers.euler import EulerSampler
from ldmkit_samplers.euler_ancestral import EulerAncestralSampler
from ldmkit_samplers.heun import HeunSampler
from ldmkit_samplers.lms import LMSSampler
from ldmkit_samplers.plms import PLMSSampler
from ldmkit_samplers.unipc import UniPCSampler

__all__ = [
    "DDIMSampler",
    "DDPMSampler",
    "DPM2AncestralSampler",
    "DPM2Sampler",
    "DPMSolverPP2MSampler",
    "DPMSolverPP2MSDESampler",
    "DPMSolverPP2SAncestralSampler",
    "DPMSolverPP3MSDESampler",
    "EulerAncestralSampler",
    "EulerSampler",
    "HeunSampler",
    "LMSSampler",
    "PLMSSampler",
    "UniPCSampler",
]
