"""Tiled encode and decode: images far larger than the first stage was trained on, within a
memory cap.

A first stage's activations grow with the image: a KL-f8 decoder at 512x512 holds several
GiB of 128- to 512-channel feature maps, and its mid-block self-attention a (h*w)^2 score
matrix. :func:`tiled_decode` runs ``decode`` on overlapping latent tiles one at a time and
blends the outputs with a linear ramp across each overlap, so the peak memory is that of one
tile (plus the output) whatever the image size; :func:`tiled_encode` does the same for
``encode``. Both work with any :class:`~ldmkit.interfaces.FirstStage` (KL, VQ, third-party):
they only call ``encode``/``decode``.

What tiling changes: every tile is decoded on its own, so GroupNorm statistics and the
mid-block attention see one tile instead of the whole image. The ramps hide the seams; what
remains is measured in docs/performance.md (PSNR of tiled against untiled decode where both
fit). A VQ decoder quantizes each latent position independently, so tiling does not change
which code a position takes. A KL first stage in ``encode_mode=sample`` draws its posterior
noise per tile; in the overlaps the blend averages two draws (lower variance there), so tiled
encodes of init images are best done with ``encode_mode=mode``.

``Pipeline.sample(tile=...)``, ``Pipeline.encode/decode(tile=...)`` and ``ldmkit sample
--tile N`` use these functions; ``tile`` is counted in latent pixels.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["tile_starts", "blend_window", "tiled_decode", "tiled_encode", "check_tiling"]


def check_tiling(tile: int, overlap: int | None) -> tuple[int, int]:
    """``(tile, overlap)`` validated; ``overlap`` defaults to a quarter of the tile."""
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 2:
        raise ValueError(f"tile must be an integer >= 2 (latent pixels), got {tile!r}")
    overlap = tile // 4 if overlap is None else overlap
    if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap < tile:
        raise ValueError(f"tile_overlap must be an integer in [0, tile={tile}), got {overlap!r}")
    return tile, overlap


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of ``tile`` covering ``length`` with at least ``overlap``
    between neighbours; the last tile ends at ``length`` (it may overlap more)."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def blend_window(length: int, ramp: int, *, device=None) -> Tensor:
    """A 1-D weight of ``length``: rising linearly over the first ``ramp`` entries, falling
    over the last ``ramp``, 1 between; never 0, so a pixel one tile covers alone keeps its
    value after normalisation."""
    i = torch.arange(length, device=device, dtype=torch.float32)
    if ramp <= 0:
        return torch.ones(length, device=device)
    up = (i + 0.5) / ramp
    down = (length - i - 0.5) / ramp
    return torch.minimum(torch.minimum(up, down), torch.ones(()))


def _tiled(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    *,
    tile: int,
    overlap: int,
    scale_num: int,
    scale_den: int,
) -> Tensor:
    """Run ``fn`` on overlapping ``tile``x``tile`` windows of ``x`` (input pixels) whose
    outputs are ``scale_num/scale_den`` times as large, blending them into one output."""
    h, w = x.shape[-2:]
    if h <= tile and w <= tile:
        return fn(x)
    out: Tensor | None = None
    weight: Tensor | None = None
    ramp = overlap * scale_num // scale_den
    windows: dict[tuple[int, int], Tensor] = {}
    for top in tile_starts(h, tile, overlap):
        for left in tile_starts(w, tile, overlap):
            piece = fn(x[..., top : top + tile, left : left + tile])
            ph, pw = piece.shape[-2:]
            if out is None:
                out_h, out_w = h * scale_num // scale_den, w * scale_num // scale_den
                out = piece.new_zeros((*piece.shape[:-2], out_h, out_w), dtype=torch.float32)
                weight = piece.new_zeros((out_h, out_w), dtype=torch.float32)
            if (ph, pw) not in windows:  # edge tiles of a small image may be smaller
                windows[ph, pw] = (
                    blend_window(ph, ramp, device=piece.device)[:, None]
                    * blend_window(pw, ramp, device=piece.device)[None, :]
                )
            win = windows[ph, pw]
            oy, ox = top * scale_num // scale_den, left * scale_num // scale_den
            out[..., oy : oy + ph, ox : ox + pw].addcmul_(piece.float(), win)
            weight[oy : oy + ph, ox : ox + pw].add_(win)
            del piece
    assert out is not None and weight is not None
    return out.div_(weight).to(x.dtype if x.is_floating_point() else torch.float32)


def tiled_decode(
    decode: Callable[[Tensor], Tensor],
    z: Tensor,
    *,
    factor: int,
    tile: int,
    overlap: int | None = None,
) -> Tensor:
    """``decode(z)`` on ``tile``x``tile`` latent tiles overlapping by ``overlap`` latent
    pixels (default ``tile // 4``), blended; ``factor`` is the first stage's f."""
    tile, overlap = check_tiling(tile, overlap)
    return _tiled(decode, z, tile=tile, overlap=overlap, scale_num=factor, scale_den=1)


def tiled_encode(
    encode: Callable[[Tensor], Tensor],
    x: Tensor,
    *,
    factor: int,
    tile: int,
    overlap: int | None = None,
) -> Tensor:
    """``encode(x)`` on image tiles of ``tile * factor`` pixels overlapping by
    ``overlap * factor`` (``tile``/``overlap`` in latent pixels, as for decoding), blended."""
    tile, overlap = check_tiling(tile, overlap)
    h, w = x.shape[-2:]
    if h % factor or w % factor:
        raise ValueError(
            f"image size {h}x{w} is not divisible by the first stage's downsample factor f={factor}"
        )
    return _tiled(
        encode, x, tile=tile * factor, overlap=overlap * factor, scale_num=1, scale_den=factor
    )
