"""Channel handling, resize/crop/flip and the [-1, 1] scaling, against hand computations."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from ldmkit.data.transforms import ImageTransform, parse_background, to_uint8


def test_rgba_is_composited_on_the_background():
    pixels = np.zeros((4, 4, 4), np.uint8)
    pixels[0, 0] = (10, 20, 30, 255)  # opaque: kept
    pixels[0, 1] = (200, 100, 0, 0)  # transparent: background
    pixels[0, 2] = (200, 100, 0, 128)  # half: alpha blend
    image = Image.fromarray(pixels)
    out, _ = ImageTransform(image_size=4, background=(0, 128, 255))(image)
    rgb = to_uint8(out).permute(1, 2, 0).numpy().astype(int)
    assert rgb[0, 0].tolist() == [10, 20, 30]
    assert rgb[0, 1].tolist() == [0, 128, 255]
    a = 128 / 255
    blend = [200 * a + 0 * (1 - a), 100 * a + 128 * (1 - a), 0 * a + 255 * (1 - a)]
    assert np.abs(rgb[0, 2] - np.array(blend)).max() <= 1


def test_gray_to_rgb_replicates_and_rgb_to_gray_is_itu_601_luma():
    gray = Image.fromarray(np.arange(16, dtype=np.uint8).reshape(4, 4) * 15)
    out, _ = ImageTransform(image_size=4, channels=3)(gray)
    assert out.shape == (3, 4, 4)
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
    assert torch.equal(to_uint8(out[0]), torch.from_numpy(np.array(gray)))

    rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [90, 160, 30]]], np.uint8)
    out, _ = ImageTransform(image_size=1, channels=1, crop="center")(Image.fromarray(rgb))
    # a 1x4 image: shorter side is already 1, the center crop keeps column (4 - 1) // 2 = 1
    assert out.shape == (1, 1, 1)
    expected = (0 * 299 + 255 * 587 + 0 * 114) / 1000  # ITU-R 601-2 luma of pure green
    assert abs(int(to_uint8(out)) - expected) <= 1


def test_scaling_is_exactly_invertible_for_8_bit_values():
    values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    out, _ = ImageTransform(image_size=16, channels=1)(Image.fromarray(values))
    assert out.min() == -1.0 and out.max() == 1.0
    assert torch.equal(to_uint8(out)[0], torch.from_numpy(values))


def test_resize_then_crop_shapes():
    image = Image.new("RGB", (40, 20), (1, 2, 3))
    out, _ = ImageTransform(image_size=8)(image)
    assert out.shape == (3, 8, 8)
    out, _ = ImageTransform(image_size=30)(image)  # upscaled: shorter side 20 -> 30
    assert out.shape == (3, 30, 30)


def test_random_crop_and_flip_move_the_map_with_the_image():
    """Pixel value = class id * 20, so the map must equal image / 20 after any crop and flip."""
    rng = np.random.default_rng(0)
    classes = rng.integers(0, 10, (24, 36)).astype(np.uint8)
    image = Image.fromarray(classes * 20)
    segmentation = Image.fromarray(classes)
    transform = ImageTransform(image_size=24, channels=1, crop="random", flip=True)
    flips, offsets = set(), set()
    source = random.Random(3)
    for _ in range(30):
        out, seg = transform(image, segmentation, source)
        assert seg.dtype == torch.int64 and seg.shape == (24, 24)
        assert torch.equal(to_uint8(out)[0].long(), seg * 20)
        for left in range(36 - 24 + 1):
            for flipped in (False, True):
                crop = classes[:, left : left + 24]
                crop = crop[:, ::-1] if flipped else crop
                if np.array_equal(crop, seg.numpy()):
                    offsets.add(left)
                    flips.add(flipped)
    assert flips == {False, True} and len(offsets) > 3


def test_nearest_resize_keeps_class_ids():
    classes = np.zeros((10, 10), np.uint8)
    classes[:, 5:] = 7
    _, seg = ImageTransform(image_size=4, channels=1)(
        Image.fromarray(classes * 30), Image.fromarray(classes)
    )
    assert set(seg.unique().tolist()) == {0, 7}


def test_bad_options_name_the_key():
    with pytest.raises(ValueError, match="data.channels must be 1 or 3"):
        ImageTransform(image_size=8, channels=4)
    with pytest.raises(ValueError, match="unknown data.crop 'middle'"):
        ImageTransform(image_size=8, crop="middle")
    with pytest.raises(ValueError, match="data.background"):
        parse_background([1, 2])
    assert parse_background("white") == (255, 255, 255)
    assert parse_background(128) == (128, 128, 128)
