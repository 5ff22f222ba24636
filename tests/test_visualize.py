"""Condition tiles next to samples (trainer grids, ldmkit sample --show-conditions)."""

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
