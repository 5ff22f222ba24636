"""The plugin's tests reuse ldmkit's conformance suite for samplers."""

import torch

from ldmkit.diffusion import NoiseSchedule
from ldmkit.testing import SamplerConformance
from ldmkit_thresholding import ThresholdedDDIMSampler


class TestThresholdedDDIM(SamplerConformance):
    # Gaussian data well inside the threshold: nothing is clipped, the step is DDIM's, and
    # DDIM is first order
    expected_order = 1
    stochastic = False
    order_data = (0.0, 0.2)

    def make_sampler(self):
        return ThresholdedDDIMSampler(steps=self.steps)


def test_predictions_outside_the_threshold_are_pulled_in():
    """One step from z = 3 with eps = -1 predicts x0 = 58 everywhere; thresholding makes it 1."""
    z = torch.full((2, 1, 4, 4), 3.0)
    out = ThresholdedDDIMSampler(steps=1).sample(
        lambda z, t: -torch.ones_like(z), NoiseSchedule(), z
    )
    torch.testing.assert_close(out, torch.ones_like(z))
