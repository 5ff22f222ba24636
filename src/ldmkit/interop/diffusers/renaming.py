"""State dicts renamed between ldmkit's and diffusers' layouts, row by row: a row maps an
ldmkit prefix to a diffusers one and says how the names under it change (the UNet's rows are
in :mod:`.unet`, the autoencoder's in :mod:`.autoencoder`).

The weights are renamed, never recomputed, except an AttentionBlock's ``qkv`` Conv1d, which
is split into ``to_q`` / ``to_k`` / ``to_v`` by its channel order (legacy: per head
``(heads, 3, ch)``; ``use_new_attention_order``: ``(3, heads, ch)``) and joined back the same
way; 1x1 convolutions become linear weights. So ldmkit -> diffusers -> ldmkit is bit-identical.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from ldmkit.interop.diffusers.common import ConversionError

UNET_RES = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
            "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}  # fmt: skip
VAE_RES = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "nin_shortcut": "conv_shortcut",
}
VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


# a row: (ldmkit prefix, diffusers prefix, kind, heads); kind says how the names under the
# prefix change: plain (unchanged), res / vres (ResBlocks), transformer (unchanged), attn
# (AttentionBlock, qkv split by `heads`), vattn (the autoencoder's mid attention)
Row = tuple[str, str, str, int]


def _by_row(
    state: dict[str, Tensor], rows: list[Row], side: int, what: str
) -> Iterator[tuple[Row, dict[str, Tensor]]]:
    """Group ``state`` under the rows' prefixes (``side`` 0: ldmkit's, 1: diffusers'); a name
    under no row is an error naming it."""
    order = sorted(rows, key=lambda r: -len(r[side]))  # the longest prefix wins
    groups: dict[str, tuple[Row, dict[str, Tensor]]] = {}
    for name, value in state.items():
        row = next((r for r in order if name.startswith(r[side])), None)
        if row is None:
            raise ConversionError(
                f"{what}: {name!r} has no counterpart in the "
                f"{'diffusers' if side == 0 else 'ldmkit'} layout (an architecture the other side cannot hold)"
            )
        groups.setdefault(row[side], (row, {}))[1][name[len(row[side]) :]] = value
    yield from groups.values()


def _rename_first(rest: str, table: dict[str, str], where: str) -> str:
    for old, new in table.items():
        if rest.startswith(old + "."):
            return new + rest[len(old) :]
    raise ConversionError(f"{where}{rest}: not a parameter of this block")


def _qkv_pattern(new_order: bool, heads: int, channels: int) -> tuple[int, ...]:
    return (3, heads, channels // heads) if new_order else (heads, 3, channels // heads)


def _forward(
    kind: str, heads: int, sub: dict[str, Tensor], where: str, new_order: bool
) -> dict[str, Tensor]:
    if kind in ("plain", "transformer"):
        return dict(sub)
    if kind == "res":
        return {_rename_first(k, UNET_RES, where): v for k, v in sub.items()}
    if kind == "vres":
        return {_rename_first(k, VAE_RES, where): v for k, v in sub.items()}
    out: dict[str, Tensor] = {}
    if kind == "vattn":
        for k, v in sub.items():
            name = _rename_first(k, VAE_ATTN, where)
            out[name] = v.reshape(v.shape[0], v.shape[1]) if v.ndim == 4 else v
        return out
    # attn: the UNet's AttentionBlock
    for k, v in sub.items():
        if k.startswith("qkv."):
            channels = v.shape[0] // 3
            split = v.reshape(*_qkv_pattern(new_order, heads, channels), -1)
            parts = split.unbind(0) if new_order else split.unbind(1)
            for name, part in zip(("to_q", "to_k", "to_v"), parts, strict=True):
                flat = part.reshape(channels, -1)
                out[f"{name}.{k[4:]}"] = flat if k.endswith("weight") else flat.reshape(channels)
        elif k.startswith("proj_out."):
            out["to_out.0." + k[len("proj_out.") :]] = (
                v.reshape(v.shape[0], -1) if v.ndim == 3 else v
            )
        elif k.startswith("norm."):
            out["group_norm." + k[5:]] = v
        else:
            raise ConversionError(f"{where}{k}: not a parameter of an AttentionBlock")
    return out


def _backward(
    kind: str, heads: int, sub: dict[str, Tensor], where: str, new_order: bool
) -> dict[str, Tensor]:
    if kind in ("plain", "transformer"):
        return dict(sub)
    if kind in ("res", "vres"):
        table = {v: k for k, v in (UNET_RES if kind == "res" else VAE_RES).items()}
        return {_rename_first(k, table, where): v for k, v in sub.items()}
    out: dict[str, Tensor] = {}
    if kind == "vattn":
        table = {v: k for k, v in VAE_ATTN.items()}
        for k, v in sub.items():
            name = _rename_first(k, table, where)
            out[name] = v.reshape(*v.shape, 1, 1) if v.ndim == 2 else v
        return out
    for suffix in ("weight", "bias"):
        parts = [sub.pop(f"to_{x}.{suffix}", None) for x in "qkv"]
        if all(p is None for p in parts):
            continue
        if any(p is None for p in parts):
            raise ConversionError(
                f"{where}to_q/to_k/to_v.{suffix}: the three projections must all be present"
            )
        channels = parts[0].shape[0]
        shaped = [p.reshape(heads, channels // heads, -1) for p in parts]
        joined = torch.stack(shaped, 0 if new_order else 1).reshape(3 * channels, -1)
        out[f"qkv.{suffix}"] = (
            joined.unsqueeze(-1) if suffix == "weight" else joined.reshape(3 * channels)
        )
    for k, v in sub.items():
        if k.startswith("to_out.0."):
            out["proj_out." + k[len("to_out.0.") :]] = v.unsqueeze(-1) if v.ndim == 2 else v
        elif k.startswith("group_norm."):
            out["norm." + k[len("group_norm.") :]] = v
        else:
            raise ConversionError(f"{where}{k}: not a parameter of diffusers' Attention")
    return out


def _convert(
    state: dict[str, Tensor], rows: list[Row], *, to: bool, what: str, new_order: bool = False
) -> dict[str, Tensor]:
    side, fn = (0, _forward) if to else (1, _backward)
    out: dict[str, Tensor] = {}
    for row, sub in _by_row(state, rows, side, what):
        for rest, value in fn(row[2], row[3], sub, f"{what}: {row[side]}", new_order).items():
            out[row[1 - side] + rest] = value.contiguous()
    return out
