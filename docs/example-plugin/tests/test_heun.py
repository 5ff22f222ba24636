"""The plugin's tests reuse ldmkit's conformance suite for samplers."""

from ldmkit.testing import SamplerConformance
from ldmkit_heun import HeunSampler


class TestHeun(SamplerConformance):
    def make_sampler(self):
        return HeunSampler(steps=self.steps)
