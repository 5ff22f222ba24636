"""Condition tiles next to samples (trainer grids, ldmkit sample --show-conditions)."""

import numpy as np
import pytest
import torch

from ldmkit.visualize import PALETTE, colorize, samples_with_conditions, text_tiles
from ldmkit_conditioners import ClassLabelConditioner, InpaintConditioner, SemanticMapConditioner


def test_colorize_maps_ids_to_the_palette():
    ids = torch.tensor([[[0, 1], [2, 3]]])
    rgb = colorize(ids)
    assert rgb.shape == (1, 3, 2, 2)
    assert torch.equal(rgb[0, :, 1, 0], PALETTE[2])
    assert torch.equal(colorize(ids[:, None]), rgb)


def test_text_tiles_draw_the_text():
    tiles = text_tiles(["a red apple", ""], 32)
    assert tiles.shape == (2, 3, 32, 32)
    assert tiles[0].min() < 0.5 and tiles[1].min() == 1.0  # ink only where there is text


def test_rows_hold_each_samples_conditions_then_the_sample():
    c = SemanticMapConditioner(num_classes=4, n_stages=0)
    ids = torch.randint(0, 4, (3, 8, 8))
    samples = torch.rand(3, 1, 8, 8) * 2 - 1
    tiles, per_row = samples_with_conditions(samples, c, {"segmentation": ids})
    assert per_row == 2 and tiles.shape == (6, 3, 8, 8)
    assert torch.equal(tiles[2], colorize(ids)[1])                              # row 1: its map
    torch.testing.assert_close(tiles[3], ((samples[1] + 1) / 2).expand(3, -1, -1))  # then its sample


def test_inpainting_rows_show_image_and_mask_and_labels_as_text():
    c = InpaintConditioner()
    image, mask = torch.zeros(2, 3, 8, 8), torch.zeros(2, 1, 8, 8)
    mask[:, :, 2:4] = 1
    tiles, per_row = samples_with_conditions(torch.zeros(2, 3, 8, 8), c, {"image": image, "mask": mask})
    assert per_row == 3
    assert torch.equal(tiles[1], mask[0].expand(3, -1, -1))
    tiles, per_row = samples_with_conditions(torch.zeros(2, 3, 16, 16), ClassLabelConditioner(), {"label": [3, 4]})
    assert per_row == 2 and tiles.shape == (4, 3, 16, 16) and tiles[0].min() < 0.5


def test_no_condition_gives_the_samples_alone():
    tiles, per_row = samples_with_conditions(torch.zeros(4, 3, 8, 8), ClassLabelConditioner(), None)
    assert per_row == 0 and tiles.shape == (4, 3, 8, 8)


@pytest.mark.parametrize("shape, nrow, padding, pad_value", [
    ((7, 3, 5, 6), 3, 2, 0.0),   # a last row with two missing tiles
    ((6, 1, 4, 4), 3, 1, 1.0),   # gray repeated to RGB, white padding
    ((1, 3, 8, 8), 8, 2, 0.0),   # a single image: as it is, no padding
    ((5, 4, 3, 2), 10, 0, 0.5),  # more columns than images, no padding
    ((3, 6, 7), 8, 2, 0.0),      # one C×H×W image
    ((1, 6, 7), 8, 2, 0.0),      # one gray image
])
def test_make_grid_and_save_image_equal_torchvisions(tmp_path, shape, nrow, padding, pad_value):
    """torchvision's make_grid and save_image are the reference: the same grid, bit for bit,
    and the same PNG pixels (ldmkit's own avoid importing torchvision: seconds per process)."""
    from PIL import Image
    from torchvision.utils import make_grid as tv_make_grid
    from torchvision.utils import save_image as tv_save_image

    from ldmkit.visualize import make_grid, save_image

    images = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    assert torch.equal(make_grid(images, nrow=nrow, padding=padding, pad_value=pad_value),
                       tv_make_grid(images, nrow=nrow, padding=padding, pad_value=pad_value))
    save_image(images, tmp_path / "ours.png", nrow=nrow, padding=padding, pad_value=pad_value)
    tv_save_image(images, tmp_path / "theirs.png", nrow=nrow, padding=padding, pad_value=pad_value)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "ours.png")), np.asarray(Image.open(tmp_path / "theirs.png")))


def test_make_grid_takes_a_list_and_names_a_wrong_shape():
    from ldmkit.visualize import make_grid

    images = torch.rand(4, 3, 2, 2)
    assert torch.equal(make_grid(list(images), nrow=2), make_grid(images, nrow=2))
    with pytest.raises(ValueError, match=r"B×C×H×W images, got shape \(1, 2, 3, 4, 5\)"):
        make_grid(torch.rand(1, 2, 3, 4, 5))


def test_writing_samples_does_not_import_torchvision(tmp_path):
    """``ldmkit sample`` wrote its grid with torchvision's save_image, whose import (torchvision's
    models and ops, then ``torch._dynamo``) took 2.5 of the command's 4.5 s on a tiny model."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from pathlib import Path\n"
        "from ldmkit.sample_io.samples import write_samples\n"
        f"write_samples(torch.rand(3, 3, 4, 4) * 2 - 1, Path({str(tmp_path / 'g.png')!r}), settings={{'seed': 0}})\n"
        "print(sorted(m for m in ('torchvision', 'torch._dynamo') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
    assert (tmp_path / "g.png").exists() and (tmp_path / "g" / "000002.png").exists()
