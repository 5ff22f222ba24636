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


@pytest.mark.parametrize("crop", ["center", "random"])
def test_scaling_only_the_crop_matches_scaling_the_whole_image_then_cropping(crop):
    """The transform resizes just the crop's source region (PIL's ``box``); the reference
    scales the whole image (shorter side to ``size``), then crops: class maps equal, images
    within one level. A 3000 x 3 strip no longer becomes 32000 x 32 on the way."""
    rng = np.random.default_rng(0)
    for width, height, size in [(40, 30, 16), (300, 20, 32), (20, 100, 32), (13, 7, 32), (3000, 3, 32)]:
        pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
        classes = rng.integers(0, 5, (height, width), dtype=np.uint8)
        image, seg_in = Image.fromarray(pixels), Image.fromarray(classes)
        scaled = max(size, round(width * size / min(width, height))), max(size, round(height * size / min(width, height)))
        draws = random.Random(7)
        left = draws.randint(0, scaled[0] - size) if crop == "random" else (scaled[0] - size) // 2
        top = draws.randint(0, scaled[1] - size) if crop == "random" else (scaled[1] - size) // 2
        box = (left, top, left + size, top + size)
        want = np.asarray(image.resize(scaled, Image.Resampling.BICUBIC).crop(box)).astype(int)
        out, seg = ImageTransform(image_size=size, crop=crop)(image, seg_in, random.Random(7))
        got = to_uint8(out).permute(1, 2, 0).numpy().astype(int)
        assert got.shape == (size, size, 3) and np.abs(got - want).max() <= 1, (width, height)
        # each map pixel is the class of a source pixel nearest its centre (either one on a tie)
        rows, ties_r = nearest(top, size, height, scaled[1])
        cols, ties_c = nearest(left, size, width, scaled[0])
        ok = np.zeros((size, size), bool)
        for r_shift in (0, 1):
            for c_shift in (0, 1):
                r = np.maximum(rows - r_shift * ties_r, 0)[:, None]
                c = np.maximum(cols - c_shift * ties_c, 0)[None, :]
                ok |= classes[r, c] == seg.numpy()
        assert ok.all(), (width, height)


def test_a_thin_strip_is_not_scaled_whole_first():
    """A 60000 x 2 strip at image_size=64: scaling it whole first made a 1,920,000 x 64 RGB
    image (369 MB) to crop 64 x 64 out of; now only the crop's region is scaled."""
    import subprocess
    import sys

    code = (
        "import resource; from PIL import Image; from ldmkit.data.transforms import ImageTransform\n"
        "strip = Image.new('RGB', (60000, 2), 'red'); transform = ImageTransform(image_size=64)\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "out, _ = transform(strip)\n"
        "print(tuple(out.shape), (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    shape, grown_mib = done.stdout.rsplit(" ", 1)
    assert shape == "(3, 64, 64)" and int(grown_mib) < 50, done.stdout


def nearest(start: int, size: int, source: int, scaled: int) -> tuple[np.ndarray, np.ndarray]:
    """The source index under each output pixel's centre, exactly (integers: the centre is
    (2 (start + i) + 1) source / (2 scaled)), and whether that centre lies on a boundary."""
    numerator = (2 * (start + np.arange(size)) + 1) * source
    return numerator // (2 * scaled), (numerator % (2 * scaled) == 0).astype(int)


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
