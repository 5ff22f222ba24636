"""The plugin's tests reuse ldmkit's conformance suite for samplers."""

from ldmkit_heun import HeunSampler

from ldmkit.testing import SamplerConformance


class TestHeun(SamplerConformance):
    def make_sampler(self):
        return HeunSampler(steps=self.steps)
