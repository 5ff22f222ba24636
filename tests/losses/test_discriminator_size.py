"""The smallest image the PatchGAN discriminator reads, against torch itself."""

from __future__ import annotations

import pytest
import torch

from ldmkit.losses.discriminator import PatchDiscriminator


@pytest.mark.parametrize("layers", [1, 2, 3, 4])
def test_min_image_size_is_the_smallest_input_torch_accepts(layers):
    disc = PatchDiscriminator(in_channels=1, ndf=2, num_layers=layers).eval()
    smallest = disc.min_image_size
    assert smallest == 3 * 2**layers  # each stride-2 conv halves; the two 4x4 convs need 3 px
    with torch.no_grad():
        assert disc(torch.zeros(1, 1, smallest, smallest)).shape[-1] == 1
        with pytest.raises(RuntimeError):
            disc(torch.zeros(1, 1, smallest - 1, smallest - 1))
