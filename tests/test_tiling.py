"""Tiled encode/decode (ldmkit.tiling): the tiles cover the image, the blend is a partition of
unity (a local first stage decodes tiled exactly as untiled), no call ever sees more than one
tile, and Pipeline.sample / ldmkit sample take ``tile``."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import ldmkit
from ldmkit.pipeline import SampleArgumentError
from ldmkit.tiling import blend_window, tile_starts, tiled_decode, tiled_encode


@pytest.mark.parametrize(
    ("length", "tile", "overlap"), [(10, 4, 1), (37, 8, 2), (8, 8, 2), (5, 8, 2), (64, 16, 0)]
)
def test_tiles_cover_and_overlap(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    covered = torch.zeros(length, dtype=torch.bool)
    for s in starts:
        covered[s : s + tile] = True
    assert covered.all()
    assert starts[0] == 0 and starts[-1] + min(tile, length) == length
    for a, b in zip(starts, starts[1:], strict=False):
        assert a + tile - b >= overlap  # neighbours share at least `overlap`


def test_blend_window_ramps_and_is_positive():
    w = blend_window(12, 4)
    assert (w > 0).all() and w.max() == 1
    assert torch.all(w[:4].diff() > 0) and torch.all(w[-4:].diff() < 0) and torch.all(w[4:8] == 1)
    assert torch.allclose(w, w.flip(0))


def local_decode(z: torch.Tensor) -> torch.Tensor:
    """A decoder without spatial context: a per-position linear map, then nearest 4x."""
    mix = torch.tensor([[0.5, -1.0, 2.0], [1.0, 0.0, 0.3], [-0.2, 0.7, 0.1]])
    return F.interpolate(torch.einsum("oc,bchw->bohw", mix, z), scale_factor=4, mode="nearest")


def local_encode(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x * 2 + 0.1, 4)


@pytest.mark.parametrize(
    ("h", "w", "tile", "overlap"), [(20, 31, 8, 2), (16, 16, 6, None), (9, 40, 8, 0)]
)
def test_a_local_first_stage_tiles_exactly(h, w, tile, overlap):
    """Where the result of a pixel does not depend on its neighbours, blending copies of the
    same value must give that value: tiled == untiled up to float round-off."""
    z = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0))
    whole = local_decode(z)
    tiled = tiled_decode(local_decode, z, factor=4, tile=tile, overlap=overlap)
    assert tiled.shape == whole.shape
    torch.testing.assert_close(tiled, whole, atol=1e-5, rtol=1e-5)
    x = torch.randn(2, 3, h * 4, w * 4, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(
        tiled_encode(local_encode, x, factor=4, tile=tile, overlap=overlap),
        local_encode(x),
        atol=1e-5,
        rtol=1e-5,
    )


def test_no_call_sees_more_than_one_tile():
    seen = []

    def decode(z):
        seen.append(tuple(z.shape[-2:]))
        return local_decode(z)

    tiled_decode(decode, torch.randn(1, 3, 50, 70), factor=4, tile=16)
    assert len(seen) == 4 * 6 and max(max(s) for s in seen) == 16  # 50 -> 4 tiles, 70 -> 6


def test_a_context_dependent_decoder_is_blended_not_cut():
    """A decoder whose output depends on the whole tile (GroupNorm-like statistics): without
    overlap the tile borders show as steps; the ramps make the transition gradual."""

    def normed(z):
        return local_decode((z - z.mean(dim=(-2, -1), keepdim=True)) / 2)

    z = torch.linspace(-3, 3, 48).expand(1, 3, 16, 48).contiguous()  # a ramp: tiles differ in mean
    hard = tiled_decode(normed, z, factor=4, tile=16, overlap=0)
    soft = tiled_decode(normed, z, factor=4, tile=16, overlap=8)
    jump_hard = hard.diff(dim=-1).abs().max()
    jump_soft = soft.diff(dim=-1).abs().max()
    assert jump_soft < 0.5 * jump_hard


@pytest.mark.parametrize(
    ("tile", "overlap", "match"),
    [(1, None, "tile must"), (8, 8, "tile_overlap"), (8, -1, "tile_overlap")],
)
def test_bad_tiling_is_named(tile, overlap, match):
    with pytest.raises(ValueError, match=match):
        tiled_decode(local_decode, torch.randn(1, 3, 20, 20), factor=4, tile=tile, overlap=overlap)


def test_encode_rejects_sizes_not_divisible_by_f():
    with pytest.raises(ValueError, match="not divisible"):
        tiled_encode(local_encode, torch.randn(1, 3, 30, 32), factor=4, tile=4)


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    return ldmkit.compose(
        overrides=[
            "conditioner=class_label",
            "first_stage=kl_tiny",
            "first_stage.encode_mode=mode",
            "image_size=16",
            "sampler=ddim",
            "sampler.steps=2",
        ]
    ).eval()


def test_pipeline_sample_tiles_the_decode(pipe):
    """Same latents, tiled and untiled decode: the tiny KL decoder (GroupNorm, attention-free)
    gives close images; the latents themselves are untouched by tiling."""
    labels = {"label": [1, 2]}
    z = pipe.sample(labels, seed=0, size=64, return_latents=True)
    whole = pipe.sample(labels, seed=0, size=64)
    tiled = pipe.sample(labels, seed=0, size=64, tile=8, tile_overlap=4)
    torch.testing.assert_close(pipe.sample(labels, seed=0, size=64, tile=8, return_latents=True), z)
    assert tiled.shape == whole.shape == (2, 3, 64, 64)
    mse = (tiled - whole).pow(2).mean()
    psnr = 10 * torch.log10(4 / mse)  # images in [-1, 1]
    assert psnr > 20, f"tiled vs untiled decode PSNR {psnr:.1f} dB"
    assert not torch.equal(tiled, whole)  # it really did decode in pieces


def test_pipeline_rejects_bad_tile(pipe):
    with pytest.raises(SampleArgumentError, match="tile"):
        pipe.sample({"label": [1]}, seed=0, tile=0)


def test_cli_rejects_overlap_without_tile(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "ldmkit",
            "sample",
            "--tile-overlap",
            "2",
            "--labels",
            "1",
            "--out",
            str(tmp_path / "s.png"),
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode != 0
    assert "--tile-overlap needs --tile" in out.stderr
    assert "Traceback" not in out.stderr
