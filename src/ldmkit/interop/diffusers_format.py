"""ldmkit pipelines as diffusers folders, and diffusers folders as ldmkit pipelines.

``to_diffusers`` writes what diffusers loads with ``from_pretrained``:

============== =====================================================================
``unet/``      ``UNet2DConditionModel`` (SpatialTransformer UNets: cross-attention) or
               ``UNet2DModel`` (AttentionBlock UNets: the paper's unconditional,
               super-resolution, inpainting and semantic models)
``vae/``       ``AutoencoderKL`` with ``scaling_factor`` = the pipeline's scale factor
``vqvae/``     ``VQModel`` (``scaling_factor`` 1.0 for the paper's VQ models)
``scheduler/`` ``DDIMScheduler``: the same betas, and the sampler's spacing (the paper's
               DDIM spacing is ``leading`` + ``steps_offset=1`` + ``set_alpha_to_one=False``)
``text_encoder/`` + ``tokenizer/`` for ``clip_text`` (``CLIPTextModel``, ``CLIPTokenizer``)
``bert/`` + ``tokenizer/`` for the paper's ``bert`` (77 tokens, a WordPiece ``vocab.txt``):
               diffusers' ``LDMBertModel`` and ``BertTokenizer``, run by
               ``LDMTextToImagePipeline`` (which names its first stage ``vqvae/`` whatever
               its kind)
``ldmkit_conditioner/`` every other conditioner (class labels, semantic maps, token-id
               BERTs, the low-res image of super-resolution...), which has no diffusers
               component: its config and weights, read back by ``from_diffusers``; diffusers
               ignores the folder (a ``low_res`` model with factor = f over a VQ first stage is
               what ``LDMSuperResolutionPipeline`` runs, and ``model_index.json`` names it)
============== =====================================================================

The weights are renamed, never recomputed, except an AttentionBlock's ``qkv`` Conv1d, which
is split into ``to_q`` / ``to_k`` / ``to_v`` by its channel order (legacy: per head
``(heads, 3, ch)``; ``use_new_attention_order``: ``(3, heads, ch)``) and joined back the same
way; 1x1 convolutions become linear weights. So ldmkit -> diffusers -> ldmkit is bit-identical.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ldmkit.config import refuse_interpolations
from ldmkit.config_checks import Either, Integer, ListOf, Number, Spec, problem
from ldmkit.errors import ConfigError

__all__ = [
    "DIFFUSERS_VERSION",
    "ConversionError",
    "describe",
    "diffusers_unet_config",
    "diffusers_vae_config",
    "fit_state",
    "read_diffusers",
    "to_diffusers",
    "unet_from_diffusers",
    "unet_to_diffusers",
    "vae_from_diffusers",
    "vae_to_diffusers",
]

DIFFUSERS_VERSION = "0.30.0"  # the format written (read by diffusers >= 0.30)
CONDITIONER_DIR = "ldmkit_conditioner"
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


class ConversionError(ConfigError):
    """A model that the diffusers format cannot hold (or a diffusers model ldmkit cannot)."""


# -- the paper's text transformer as diffusers' LDMBertModel ---------------------------------
def bert_maps_to_diffusers(conditioner: dict[str, Any]) -> bool:
    """Whether a ``bert`` conditioner config is what ``LDMTextToImagePipeline`` runs: prompts
    through a WordPiece ``vocab.txt``, 77 tokens (the pipeline's fixed length)."""
    vocab = conditioner.get("vocab")
    return (
        conditioner.get("name") == "bert"
        and conditioner.get("use_tokenizer", True)
        and int(conditioner.get("max_seq_len", 77)) == 77
        and (vocab is None or not str(vocab).endswith(".json"))
    )


def _bert_names(depth: int) -> dict[str, str]:
    """ldmkit ``TextTransformer`` name -> ``LDMBertModel`` name (one-to-one, same shapes)."""
    names = {"token_emb.weight": "model.embed_tokens.weight", "pos_emb.emb.weight": "model.embed_positions.weight",
             "norm.weight": "model.layer_norm.weight", "norm.bias": "model.layer_norm.bias",
             "to_logits.weight": "to_logits.weight", "to_logits.bias": "to_logits.bias"}  # fmt: skip
    for i in range(depth):
        attn, ff, d = f"attn_layers.layers.{2 * i}.", f"attn_layers.layers.{2 * i + 1}.", f"model.layers.{i}."
        for p in ("weight", "bias"):
            names[f"{attn}0.{p}"] = f"{d}self_attn_layer_norm.{p}"
            names[f"{attn}1.to_out.{p}"] = f"{d}self_attn.out_proj.{p}"
            names[f"{ff}0.{p}"] = f"{d}final_layer_norm.{p}"
            names[f"{ff}1.net.0.0.{p}"] = f"{d}fc1.{p}"
            names[f"{ff}1.net.2.{p}"] = f"{d}fc2.{p}"
        for q in "qkv":
            names[f"{attn}1.to_{q}.weight"] = f"{d}self_attn.{q}_proj.weight"
    return names


def _bert_config(conditioner: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    n_embed = int(conditioner["n_embed"])
    return {"architectures": ["LDMBertModel"], "model_type": "ldmbert", "vocab_size": vocab_size,
            "max_position_embeddings": int(conditioner.get("max_seq_len", 77)),
            "encoder_layers": int(conditioner["n_layer"]), "encoder_ffn_dim": 4 * n_embed,
            "encoder_attention_heads": int(conditioner.get("heads", 8)), "head_dim": int(conditioner.get("dim_head", 64)),
            "d_model": n_embed, "activation_function": "gelu", "dropout": 0.0, "attention_dropout": 0.0,
            "activation_dropout": 0.0, "scale_embedding": False, "pad_token_id": 0}  # fmt: skip


def _bert_from_config(c: dict[str, Any], where: str) -> dict[str, Any]:
    d_model = _value(c, "d_model", WHOLE, where, 1280)
    _require(_value(c, "encoder_ffn_dim", WHOLE, where, 5120) == 4 * d_model,
             f"{where}: encoder_ffn_dim={c.get('encoder_ffn_dim')} (ldmkit's bert has 4 x d_model)")  # fmt: skip
    _require(c.get("activation_function", "gelu") == "gelu" and not c.get("scale_embedding", False),
             f"{where}: activation_function={c.get('activation_function')!r}, scale_embedding={c.get('scale_embedding')} "
             "(ldmkit's bert: gelu, unscaled embeddings)")  # fmt: skip
    return {"name": "bert", "n_embed": d_model, "n_layer": _value(c, "encoder_layers", WHOLE, where, 32),
            "max_seq_len": _value(c, "max_position_embeddings", WHOLE, where, 77),
            "heads": _value(c, "encoder_attention_heads", WHOLE, where, 8),
            "dim_head": _value(c, "head_dim", WHOLE, where, 64)}  # fmt: skip


# -- the renaming tables -------------------------------------------------------------------
# a row: (ldmkit prefix, diffusers prefix, kind, heads); kind says how the names under the
# prefix change: plain (unchanged), res / vres (ResBlocks), transformer (unchanged), attn
# (AttentionBlock, qkv split by `heads`), vattn (the autoencoder's mid attention)
Row = tuple[str, str, str, int]


def _unet_rows(cfg: dict[str, Any]) -> list[Row]:
    mult, nrb = list(cfg["channel_mult"]), int(cfg["num_res_blocks"])
    levels, mc = len(mult), int(cfg["model_channels"])
    attn = [2**level in [int(r) for r in cfg["attention_resolutions"]] for level in range(levels)]
    kind = "transformer" if cfg.get("use_spatial_transformer") else "attn"

    def heads(level: int) -> int:
        channels = mc * mult[level]
        return (
            int(cfg["num_heads"])
            if int(cfg.get("num_head_channels", -1)) == -1
            else channels // int(cfg["num_head_channels"])
        )

    rows: list[Row] = [("time_embed.0.", "time_embedding.linear_1.", "plain", 0),
                       ("time_embed.2.", "time_embedding.linear_2.", "plain", 0),
                       ("input_blocks.0.0.", "conv_in.", "plain", 0),
                       ("out.0.", "conv_norm_out.", "plain", 0), ("out.2.", "conv_out.", "plain", 0),
                       ("label_emb.0.0.", "class_embedding.linear_1.", "plain", 0),
                       ("label_emb.0.2.", "class_embedding.linear_2.", "plain", 0),
                       ("label_emb.", "class_embedding.", "plain", 0)]  # fmt: skip
    i = 1
    for level in range(levels):
        for j in range(nrb):
            rows.append((f"input_blocks.{i}.0.", f"down_blocks.{level}.resnets.{j}.", "res", 0))
            if attn[level]:
                rows.append(
                    (
                        f"input_blocks.{i}.1.",
                        f"down_blocks.{level}.attentions.{j}.",
                        kind,
                        heads(level),
                    )
                )
            i += 1
        if level != levels - 1:
            rows.append(
                (f"input_blocks.{i}.0.op.", f"down_blocks.{level}.downsamplers.0.conv.", "plain", 0)
            )
            i += 1
    rows += [("middle_block.0.", "mid_block.resnets.0.", "res", 0),
             ("middle_block.1.", "mid_block.attentions.0.", kind, heads(levels - 1)),
             ("middle_block.2.", "mid_block.resnets.1.", "res", 0)]  # fmt: skip
    i = 0
    for up, level in enumerate(reversed(range(levels))):
        for j in range(nrb + 1):
            rows.append((f"output_blocks.{i}.0.", f"up_blocks.{up}.resnets.{j}.", "res", 0))
            k = 1
            if attn[level]:
                rows.append(
                    (f"output_blocks.{i}.1.", f"up_blocks.{up}.attentions.{j}.", kind, heads(level))
                )
                k = 2
            if level != 0 and j == nrb:
                rows.append(
                    (
                        f"output_blocks.{i}.{k}.conv.",
                        f"up_blocks.{up}.upsamplers.0.conv.",
                        "plain",
                        0,
                    )
                )
            i += 1
    return rows


def _vae_rows(cfg: dict[str, Any]) -> list[Row]:
    levels, nrb = len(cfg["ch_mult"]), int(cfg["num_res_blocks"])
    rows: list[Row] = [("quant_conv.", "quant_conv.", "plain", 0), ("post_quant_conv.", "post_quant_conv.", "plain", 0),
                       ("regularizer.embedding.", "quantize.embedding.", "plain", 0)]  # fmt: skip
    for part in ("encoder", "decoder"):
        rows += [(f"{part}.conv_in.", f"{part}.conv_in.", "plain", 0), (f"{part}.conv_out.", f"{part}.conv_out.", "plain", 0),
                 (f"{part}.norm_out.", f"{part}.conv_norm_out.", "plain", 0),
                 (f"{part}.mid.block_1.", f"{part}.mid_block.resnets.0.", "vres", 0),
                 (f"{part}.mid.attn_1.", f"{part}.mid_block.attentions.0.", "vattn", 0),
                 (f"{part}.mid.block_2.", f"{part}.mid_block.resnets.1.", "vres", 0)]  # fmt: skip
    for level in range(levels):
        for j in range(nrb):
            rows.append(
                (
                    f"encoder.down.{level}.block.{j}.",
                    f"encoder.down_blocks.{level}.resnets.{j}.",
                    "vres",
                    0,
                )
            )
        if level != levels - 1:
            rows.append(
                (
                    f"encoder.down.{level}.downsample.conv.",
                    f"encoder.down_blocks.{level}.downsamplers.0.conv.",
                    "plain",
                    0,
                )
            )
        up = levels - 1 - level
        for j in range(nrb + 1):
            rows.append(
                (
                    f"decoder.up.{level}.block.{j}.",
                    f"decoder.up_blocks.{up}.resnets.{j}.",
                    "vres",
                    0,
                )
            )
        if level != 0:
            rows.append(
                (
                    f"decoder.up.{level}.upsample.conv.",
                    f"decoder.up_blocks.{up}.upsamplers.0.conv.",
                    "plain",
                    0,
                )
            )
    return rows


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


def unet_to_diffusers(state: dict[str, Tensor], cfg: dict[str, Any]) -> dict[str, Tensor]:
    """An ldmkit (= the paper's) UNet state dict in diffusers' names for the ``cfg`` it was built from."""
    return _convert(
        state,
        _unet_rows(cfg),
        to=True,
        what="denoiser",
        new_order=bool(cfg.get("use_new_attention_order")),
    )


def unet_from_diffusers(state: dict[str, Tensor], cfg: dict[str, Any]) -> dict[str, Tensor]:
    """The inverse of :func:`unet_to_diffusers`."""
    return _convert(
        state,
        _unet_rows(cfg),
        to=False,
        what="unet",
        new_order=bool(cfg.get("use_new_attention_order")),
    )


def vae_to_diffusers(state: dict[str, Tensor], cfg: dict[str, Any]) -> dict[str, Tensor]:
    """An ldmkit KL / VQ first stage's state dict in diffusers' ``AutoencoderKL`` / ``VQModel`` names."""
    return _convert(state, _vae_rows(cfg), to=True, what="first_stage")


def vae_from_diffusers(state: dict[str, Tensor], cfg: dict[str, Any]) -> dict[str, Tensor]:
    """The inverse of :func:`vae_to_diffusers`."""
    return _convert(state, _vae_rows(cfg), to=False, what="vae")


# -- configs -------------------------------------------------------------------------------
# what the numbers read from a diffusers config.json may be (a tampered 1e12 is no width)
WHOLE, POSITIVE = Integer(1), Number(0, above=True)
_REQUIRED = object()


def _value(c: dict[str, Any], key: str, spec: Spec, where: str, default: Any = _REQUIRED) -> Any:
    """``c[key]`` when ``spec`` accepts it, ``default`` when it is absent or null; a
    :class:`ConversionError` naming the file (``where``) and the key otherwise."""
    value = c.get(key)
    if value is None:
        if default is _REQUIRED:
            raise ConversionError(f"{where}: {key} is missing")
        return default
    if not spec.accepts(value):
        raise ConversionError(f"{where}: {problem(key, value, spec.expected)}")
    return value


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConversionError(message)


def diffusers_unet_config(cfg: dict[str, Any], sample_size: int) -> dict[str, Any]:
    """The diffusers config (``UNet2DConditionModel`` or ``UNet2DModel``) of an ldmkit UNet."""
    where = "denoiser"
    _require(
        cfg.get("name") == "unet",
        f"{where}: only ldmkit's `unet` converts to diffusers, got {cfg.get('name')!r}",
    )
    _require(
        not cfg.get("resblock_updown"),
        f"{where}.resblock_updown=true has no diffusers UNet2D block",
    )
    _require(
        cfg.get("conv_resample", True), f"{where}.conv_resample=false has no diffusers UNet2D block"
    )
    mult, mc = list(cfg["channel_mult"]), int(cfg["model_channels"])
    channels = [mc * m for m in mult]
    levels = len(mult)
    attn = [2**level in [int(r) for r in cfg["attention_resolutions"]] for level in range(levels)]
    nhc, nh = int(cfg.get("num_head_channels", -1)), int(cfg.get("num_heads", -1))
    common = {
        "_diffusers_version": DIFFUSERS_VERSION, "sample_size": int(sample_size),
        "in_channels": int(cfg["in_channels"]), "out_channels": int(cfg["out_channels"]),
        "block_out_channels": channels, "layers_per_block": int(cfg["num_res_blocks"]),
        "flip_sin_to_cos": True, "freq_shift": 0, "downsample_padding": 1, "mid_block_scale_factor": 1,
        "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5, "center_input_sample": False,
        "resnet_time_scale_shift": "scale_shift" if cfg.get("use_scale_shift_norm") else "default",
    }  # fmt: skip
    num_classes = cfg.get("num_classes")
    if num_classes == "sequential":
        common.update(
            class_embed_type="projection",
            projection_class_embeddings_input_dim=int(cfg["adm_in_channels"]),
        )
    elif num_classes is not None:
        common.update(class_embed_type=None, num_class_embeds=int(num_classes))
    if cfg.get("use_spatial_transformer"):
        _require(cfg.get("context_dim") is not None,
                 f"{where}: a SpatialTransformer UNet without context_dim (self-attention only) has no diffusers block")  # fmt: skip
        heads: int | list[int] = nh if nhc == -1 else [c // nhc for c in channels]
        return {
            "_class_name": "UNet2DConditionModel", **common,
            "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
            "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "cross_attention_dim": int(cfg["context_dim"]), "attention_head_dim": heads,
            "transformer_layers_per_block": int(cfg.get("transformer_depth", 1)),
            "use_linear_projection": False, "upcast_attention": False, "only_cross_attention": False,
            "dual_cross_attention": False,
        }  # fmt: skip
    # AttentionBlock UNet -> UNet2DModel, whose attention has one head width for all levels
    used = [c for c, a in zip(channels, attn, strict=True) if a] + [channels[-1]]
    if nhc != -1:
        head_dim: int | None = nhc
    elif nh == 1:
        head_dim = None  # diffusers: one head of the block's width
    elif len(set(used)) == 1:
        head_dim = used[0] // nh
    else:
        raise ConversionError(
            f"{where}: num_heads={nh} over attention widths {sorted(set(used))} gives a different head width "
            "per level, which diffusers' UNet2DModel cannot hold (it takes one attention_head_dim)"
        )
    return {
        "_class_name": "UNet2DModel", **common, "time_embedding_type": "positional",
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "attention_head_dim": head_dim, "add_attention": True, "attn_norm_num_groups": 32, "downsample_type": "conv", "upsample_type": "conv",
    }  # fmt: skip


def diffusers_vae_config(cfg: dict[str, Any], scaling_factor: float) -> dict[str, Any]:
    """The diffusers config (``AutoencoderKL`` or ``VQModel``) of an ldmkit KL / VQ first stage."""
    name = cfg.get("name")
    where = f"first_stage ({name})"
    _require(
        name in ("kl", "vq"),
        f"first_stage: only ldmkit's `kl` and `vq` convert to diffusers, got {name!r}",
    )
    _require(not list(cfg.get("attn_resolutions") or []),
             f"{where}.attn_resolutions={list(cfg['attn_resolutions'])}: diffusers' encoder/decoder blocks have no attention")  # fmt: skip
    _require(int(cfg.get("norm_groups", 32)) == 32, f"{where}.norm_groups must be 32 for diffusers")
    levels = len(cfg["ch_mult"])
    common = {
        "_diffusers_version": DIFFUSERS_VERSION, "in_channels": int(cfg["in_channels"]),
        "out_channels": int(cfg["out_ch"]), "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [int(cfg["ch"]) * int(m) for m in cfg["ch_mult"]],
        "layers_per_block": int(cfg["num_res_blocks"]), "act_fn": "silu", "norm_num_groups": 32,
        "sample_size": int(cfg["resolution"]), "scaling_factor": float(scaling_factor),
        "mid_block_add_attention": cfg.get("attn_type", "vanilla") != "none",
    }  # fmt: skip
    if name == "kl":
        _require(int(cfg["z_channels"]) == int(cfg["latent_channels"]),
                 f"{where}: z_channels={cfg['z_channels']} != latent_channels={cfg['latent_channels']}; diffusers' AutoencoderKL ties them")  # fmt: skip
        return {
            "_class_name": "AutoencoderKL",
            **common,
            "latent_channels": int(cfg["latent_channels"]),
            "force_upcast": True,
        }
    return {"_class_name": "VQModel", **common, "latent_channels": int(cfg["z_channels"]),
            "vq_embed_dim": int(cfg["latent_channels"]), "num_vq_embeddings": int(cfg["n_embed"]),
            "norm_type": "group", "lookup_from_codebook": False, "force_upcast": False}  # fmt: skip


# the sampler's spacing <-> DDIMScheduler (timestep_spacing, steps_offset, set_alpha_to_one)
SPACING_TO_DDIM = {"paper": ("leading", 1, False), "leading": ("leading", 0, True),
                   "trailing": ("trailing", 0, True), "linspace": ("linspace", 0, True)}  # fmt: skip
SCHEDULE_TO_DIFFUSERS = {
    "linear": "scaled_linear",
    "sqrt_linear": "linear",
    "cosine": "squaredcos_cap_v2",
}
PREDICTION_TO_DIFFUSERS = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


def diffusers_scheduler_config(
    schedule: dict[str, Any], sampler: dict[str, Any], prediction: str
) -> dict[str, Any]:
    spacing = str(sampler.get("spacing", "paper"))
    _require(
        spacing in SPACING_TO_DDIM,
        f"sampler.spacing={spacing!r} has no DDIMScheduler counterpart ({sorted(SPACING_TO_DDIM)})",
    )
    kind = SCHEDULE_TO_DIFFUSERS.get(str(schedule["kind"]), str(schedule["kind"]))
    _require(
        kind in SCHEDULE_TO_DIFFUSERS.values(),
        f"schedule.kind={schedule['kind']!r} has no diffusers beta_schedule",
    )
    timestep_spacing, offset, alpha_one = SPACING_TO_DDIM[spacing]
    return {
        "_class_name": "DDIMScheduler", "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": int(schedule["timesteps"]), "beta_start": float(schedule["linear_start"]),
        "beta_end": float(schedule["linear_end"]), "beta_schedule": kind, "trained_betas": None,
        "clip_sample": False, "set_alpha_to_one": alpha_one, "steps_offset": offset,
        "prediction_type": PREDICTION_TO_DIFFUSERS[prediction], "timestep_spacing": timestep_spacing,
        "thresholding": False, "rescale_betas_zero_snr": False,
    }  # fmt: skip


# -- writing -------------------------------------------------------------------------------
def _write_json(path: Path, data: dict[str, Any]) -> None:
    from ldmkit.io import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def _write_tensors(path: Path, state: dict[str, Tensor]) -> None:
    from safetensors.torch import save_file

    from ldmkit.io import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    atomic_write(path, lambda p: save_file(state, str(p)))


def _sub(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def to_diffusers(
    pipeline: Any, out: str | os.PathLike, *, progress: Callable[[str], None] | None = None
) -> Path:
    """Write ``pipeline`` (an ldmkit :class:`~ldmkit.pipeline.Pipeline` with its config) as a
    diffusers folder; returns ``out``. ``progress`` is called with each component's name."""
    from omegaconf import OmegaConf

    if pipeline.config is None:
        raise ConversionError(
            "this Pipeline has no config (build it with ldmkit.compose or Pipeline.load)"
        )
    cfg = OmegaConf.to_container(pipeline.config, resolve=True)
    out = Path(out)
    step = progress or (lambda _name: None)
    state = {k: v for k, v in pipeline.state_dict().items()}
    first, unet_cfg = cfg["first_stage"], cfg["denoiser"]
    if first.get("name") not in ("kl", "vq"):
        raise ConversionError(
            f"the first stage {first.get('name')!r} cannot be exported to diffusers, which has a "
            "counterpart for kl (AutoencoderKL) and vq (VQModel) first stages only"
        )
    # `auto` values are resolved on the built modules
    for key in ("in_channels", "out_channels", "context_dim"):
        if unet_cfg.get(key) == "auto":
            unet_cfg[key] = getattr(pipeline.denoiser, key, None)
    if unet_cfg.get("in_channels") in (None, "auto"):
        unet_cfg["in_channels"] = pipeline.denoiser.input_blocks[0][0].in_channels
    if unet_cfg.get("out_channels") in (None, "auto"):
        unet_cfg["out_channels"] = pipeline.denoiser.out[-1].out_channels
    if unet_cfg.get("context_dim") == "auto":
        unet_cfg["context_dim"] = pipeline.denoiser.context_dim
    unet_cfg["num_classes"] = _unet_classes(pipeline.denoiser, unet_cfg)
    factor = 2 ** (len(first["ch_mult"]) - 1)
    scale = float(pipeline.scale_factor)
    unet_config = diffusers_unet_config(unet_cfg, int(cfg["image_size"]) // factor)
    vae_config = diffusers_vae_config(first, scale)
    scheduler = diffusers_scheduler_config(
        cfg["schedule"], cfg["sampler"], unet_cfg.get("prediction", "eps")
    )
    unet_state = unet_to_diffusers(_sub(state, "denoiser."), unet_cfg)
    vae_state = vae_to_diffusers(_sub(state, "first_stage."), first)
    conditioner = cfg["conditioner"]
    name = conditioner.get("name")
    ldm_bert = bert_maps_to_diffusers(conditioner) and unet_config["_class_name"] == "UNet2DConditionModel"
    # LDMTextToImagePipeline calls its first stage `vqvae`, a KL one included
    vae_dir = "vae" if first["name"] == "kl" and not ldm_bert else "vqvae"
    components: dict[str, list[Any]] = {
        "unet": ["diffusers", unet_config["_class_name"]],
        vae_dir: ["diffusers", vae_config["_class_name"]],
        "scheduler": ["diffusers", "DDIMScheduler"],
    }
    step("unet")
    _write_json(out / "unet" / "config.json", unet_config)
    _write_tensors(out / "unet" / "diffusion_pytorch_model.safetensors", unet_state)
    step(vae_dir)
    _write_json(out / vae_dir / "config.json", vae_config)
    _write_tensors(out / vae_dir / "diffusion_pytorch_model.safetensors", vae_state)
    _write_json(out / "scheduler" / "scheduler_config.json", scheduler)
    step("conditioner")
    if name == "clip_text":
        module = pipeline.conditioner
        module.transformer.save_pretrained(out / "text_encoder", safe_serialization=True)
        module.tokenizer.save_pretrained(out / "tokenizer")
        components.update(text_encoder=["transformers", type(module.transformer).__name__],
                          tokenizer=["transformers", type(module.tokenizer).__name__])  # fmt: skip
    elif ldm_bert:
        module = pipeline.conditioner
        names = _bert_names(int(conditioner["n_layer"]))
        _write_json(out / "bert" / "config.json", _bert_config(conditioner, module.transformer.num_tokens))
        _write_tensors(out / "bert" / "model.safetensors",
                       {names[k]: v for k, v in _sub(state, "conditioner.transformer.").items()})  # fmt: skip
        (out / "tokenizer").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(module.tokenizer.path, out / "tokenizer" / "vocab.txt")
        _write_json(out / "tokenizer" / "tokenizer_config.json",
                    {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "strip_accents": None,
                     "model_max_length": 77, "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
                     "cls_token": "[CLS]", "mask_token": "[MASK]"})  # fmt: skip
        components.update(bert=["latent_diffusion", "LDMBertModel"], tokenizer=["transformers", "BertTokenizer"])
    elif name != "none":
        cond_state = {k: v for k, v in _sub(state, "conditioner.").items()}
        _write_json(
            out / CONDITIONER_DIR / "config.json", {"conditioner": conditioner, "ldmkit_format": 1}
        )
        _write_tensors(out / CONDITIONER_DIR / "model.safetensors", cond_state)
    if name == "clip_text" and unet_config["_class_name"] == "UNet2DConditionModel":
        index = {"_class_name": "StableDiffusionPipeline", **components, "safety_checker": [None, None],
                 "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False}  # fmt: skip
    elif ldm_bert:
        index = {"_class_name": "LDMTextToImagePipeline", **components}
    elif (
        name == "low_res"
        and vae_dir == "vqvae"
        and unet_config["_class_name"] == "UNet2DModel"
        and int(conditioner.get("factor", 4)) == factor
        and scale == 1.0
    ):  # the paper's SR layout: the low-res image has the latents' size, concatenated after them
        index = {"_class_name": "LDMSuperResolutionPipeline", **components}
    elif name == "none" and vae_dir == "vqvae" and unet_config["_class_name"] == "UNet2DModel":
        index = {"_class_name": "LDMPipeline", **components}
    else:  # no diffusers pipeline class runs this combination: load the components one by one
        index = {"_class_name": "DiffusionPipeline", **components}
    _write_json(out / "model_index.json", {"_diffusers_version": DIFFUSERS_VERSION, **index})
    # what diffusers does not record and ldmkit reads back (the qkv order only changes the layout
    # of equal weights; keeping it makes the round trip bit-identical)
    _write_json(out / "ldmkit.json", {"image_size": int(cfg["image_size"]), "sampler": cfg["sampler"],
                                       "use_new_attention_order": bool(unet_cfg.get("use_new_attention_order")),
                                       "bert_default_vocab": ldm_bert and conditioner.get("vocab") is None,
                                       "source": "ldmkit convert to-diffusers"})  # fmt: skip
    return out


def describe(directory: str | os.PathLike) -> str:
    """One line naming a diffusers folder's pipeline class and components."""
    index = _read_json(Path(directory) / "model_index.json")
    parts = [
        f"{k} {v[1]}" for k, v in index.items() if isinstance(v, list) and v and v[0] is not None
    ]
    return f"{index.get('_class_name')}: " + ", ".join(parts)


def _unet_classes(denoiser: Any, cfg: dict[str, Any]) -> Any:
    """The UNet's class embedding as diffusers sees it (ldmkit feeds it a one-hot vector)."""
    emb = getattr(denoiser, "label_emb", None)
    if emb is None:
        return None
    if isinstance(emb, torch.nn.Embedding):
        return emb.num_embeddings
    return "sequential"


# -- reading -------------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConversionError(f"{path} is missing (is {path.parent.parent} a diffusers folder?)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConversionError(f"{path} is not JSON: {err}") from err
    refuse_interpolations(data, path)  # its values become the pipeline's config
    return data


def _read_tensors(folder: Path) -> dict[str, Tensor]:
    from ldmkit.safetensors_io import read_safetensors

    for name in ("diffusion_pytorch_model.safetensors", "model.safetensors"):
        if (folder / name).is_file():
            return dict(read_safetensors(folder / name))
    if (folder / "diffusion_pytorch_model.bin").is_file():
        from ldmkit.weights import read_weights

        return read_weights(folder / "diffusion_pytorch_model.bin")
    raise ConversionError(f"{folder} holds no weights (diffusion_pytorch_model.safetensors)")


def _unet_from_config(c: dict[str, Any]) -> dict[str, Any]:
    where = f"unet/config.json ({c.get('_class_name')})"
    cls = c.get("_class_name")
    _require(
        cls in ("UNet2DConditionModel", "UNet2DModel"),
        f"{where}: only UNet2DConditionModel and UNet2DModel convert",
    )
    channels = list(_value(c, "block_out_channels", ListOf(WHOLE), where))
    mc = channels[0]
    _require(
        all(x % mc == 0 for x in channels),
        f"{where}: block_out_channels must be multiples of the first",
    )
    for key, want in (("flip_sin_to_cos", True), ("freq_shift", 0), ("downsample_padding", 1), ("act_fn", "silu"),
                      ("norm_num_groups", 32), ("center_input_sample", False), ("mid_block_scale_factor", 1),
                      ("use_linear_projection", False), ("upcast_attention", False), ("only_cross_attention", False),
                      ("dual_cross_attention", False), ("addition_embed_type", None), ("encoder_hid_dim", None),
                      ("time_embedding_type", "positional"), ("time_cond_proj_dim", None),
                      ("downsample_type", "conv"), ("upsample_type", "conv"), ("add_attention", True)):  # fmt: skip
        if key in c:
            _require(
                c[key] == want,
                f"{where}: {key}={c[key]!r} is not supported (ldmkit's UNet has {want!r})",
            )
    if cls == "UNet2DModel" and c.get("resnet_time_scale_shift") == "scale_shift":
        _require(c.get("attn_norm_num_groups") == 32,
                 f"{where}: attn_norm_num_groups={c.get('attn_norm_num_groups')!r} with scale_shift leaves the mid attention "
                 "without a GroupNorm, which ldmkit's AttentionBlock always has")  # fmt: skip
    levels = len(channels)
    down = list(c["down_block_types"])
    attn = [("Attn" in t) for t in down]
    up = list(c["up_block_types"])
    _require(
        [("Attn" in t) for t in reversed(up)] == attn,
        f"{where}: up_block_types must mirror down_block_types",
    )
    known = {"CrossAttnDownBlock2D", "DownBlock2D", "AttnDownBlock2D"}
    _require(set(down) <= known, f"{where}: down_block_types {down} (supported: {sorted(known)})")
    out: dict[str, Any] = {
        "name": "unet", "in_channels": _value(c, "in_channels", WHOLE, where),
        "out_channels": _value(c, "out_channels", WHOLE, where), "model_channels": mc,
        "channel_mult": [x // mc for x in channels], "num_res_blocks": _value(c, "layers_per_block", WHOLE, where),
        "attention_resolutions": [2**level for level in range(levels) if attn[level]], "dropout": 0.0,
        "conv_resample": True, "use_scale_shift_norm": c.get("resnet_time_scale_shift", "default") == "scale_shift",
        "resblock_updown": False, "use_new_attention_order": False, "transformer_depth": 1,
        "use_checkpoint": False, "vector_dim": None, "adm_in_channels": None, "num_classes": None,
    }  # fmt: skip
    if c.get("class_embed_type") == "projection":
        out.update(
            num_classes="sequential",
            adm_in_channels=_value(c, "projection_class_embeddings_input_dim", WHOLE, where),
        )
    elif c.get("class_embed_type") is not None:
        raise ConversionError(
            f"{where}: class_embed_type={c['class_embed_type']!r} is not supported (null or projection)"
        )
    elif c.get("num_class_embeds") is not None:
        out["num_classes"] = _value(c, "num_class_embeds", WHOLE, where)
    if cls == "UNet2DConditionModel":
        _require(
            c.get("mid_block_type", "UNetMidBlock2DCrossAttn") == "UNetMidBlock2DCrossAttn",
            f"{where}: mid_block_type {c.get('mid_block_type')!r}",
        )
        depth = _value(c, "transformer_layers_per_block", WHOLE, where, 1)
        heads_spec = Either(WHOLE, ListOf(WHOLE))
        heads = _value(  # diffusers' attention_head_dim counts heads here
            c, "num_attention_heads", heads_spec, where, None
        ) or _value(c, "attention_head_dim", heads_spec, where)
        if isinstance(heads, int):
            out.update(num_heads=heads, num_head_channels=-1)
        else:
            widths = {ch // h for ch, h in zip(channels, heads, strict=True)}
            _require(
                len(widths) == 1,
                f"{where}: attention_head_dim {heads} gives head widths {sorted(widths)}; ldmkit's UNet needs one",
            )
            out.update(num_heads=-1, num_head_channels=widths.pop())
        out.update(
            use_spatial_transformer=True,
            context_dim=_value(c, "cross_attention_dim", WHOLE, where),
            transformer_depth=depth,
        )
    else:
        head_dim = _value(c, "attention_head_dim", WHOLE, where, None)
        if head_dim is None:
            out.update(num_heads=1, num_head_channels=-1)
        else:
            out.update(num_heads=-1, num_head_channels=head_dim)
        out.update(use_spatial_transformer=False, context_dim=None)
    return out


def _vae_from_config(c: dict[str, Any]) -> tuple[dict[str, Any], float]:
    cls = c.get("_class_name")
    where = f"{'vae' if cls == 'AutoencoderKL' else 'vqvae'}/config.json ({cls})"
    _require(
        cls in ("AutoencoderKL", "VQModel"), f"{where}: only AutoencoderKL and VQModel convert"
    )
    channels = list(_value(c, "block_out_channels", ListOf(WHOLE), where))
    for key, want in (("act_fn", "silu"), ("norm_num_groups", 32), ("norm_type", "group"), ("use_quant_conv", True),
                      ("use_post_quant_conv", True), ("latents_mean", None), ("latents_std", None),
                      ("shift_factor", None)):  # fmt: skip
        if key in c:
            _require(
                c[key] == want,
                f"{where}: {key}={c[key]!r} is not supported (ldmkit's autoencoder has {want!r})",
            )
    arch = {"ch": channels[0], "ch_mult": [x // channels[0] for x in channels],
            "num_res_blocks": _value(c, "layers_per_block", WHOLE, where), "attn_resolutions": [],
            "resolution": _value(c, "sample_size", WHOLE, where, 256), "in_channels": _value(c, "in_channels", WHOLE, where),
            "out_ch": _value(c, "out_channels", WHOLE, where), "dropout": 0.0, "norm_groups": 32,
            "attn_type": "vanilla" if c.get("mid_block_add_attention", True) else "none"}  # fmt: skip
    scale = float(_value(c, "scaling_factor", POSITIVE, where, 1.0))
    latent = _value(c, "latent_channels", WHOLE, where)
    if cls == "AutoencoderKL":
        return {
            "name": "kl",
            "latent_channels": latent,
            "z_channels": latent,
            **arch,
            "kl_weight": 1e-6,
            "encode_mode": "sample",
        }, scale
    return {"name": "vq", "latent_channels": _value(c, "vq_embed_dim", WHOLE, where, latent), "z_channels": latent,
            **arch, "n_embed": _value(c, "num_vq_embeddings", WHOLE, where), "beta": 0.25}, scale  # fmt: skip


def _schedule_from_config(c: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], str]:
    where = f"scheduler/scheduler_config.json ({c.get('_class_name')})"
    inverse = {v: k for k, v in SCHEDULE_TO_DIFFUSERS.items()}
    kind = inverse.get(c.get("beta_schedule", "linear"))
    _require(
        kind is not None,
        f"{where}: beta_schedule={c.get('beta_schedule')!r} (supported: {sorted(inverse)})",
    )
    _require(c.get("trained_betas") is None, f"{where}: trained_betas are not supported")
    schedule = {"kind": kind, "timesteps": _value(c, "num_train_timesteps", WHOLE, where, 1000),
                "linear_start": float(_value(c, "beta_start", POSITIVE, where, 1e-4)),
                "linear_end": float(_value(c, "beta_end", POSITIVE, where, 2e-2)), "cosine_s": 8e-3}  # fmt: skip
    ddim = (
        c.get("timestep_spacing", "leading"),
        _value(c, "steps_offset", Integer(0), where, 0),
        bool(c.get("set_alpha_to_one", True)),
    )
    spacing = next((s for s, v in SPACING_TO_DDIM.items() if v == ddim), None)
    if spacing is None:  # the nearest ldmkit spacing of the scheduler's timestep_spacing
        spacing = (
            "paper"
            if ddim[:2] == ("leading", 1)
            else str(ddim[0])
            if ddim[0] in SPACING_TO_DDIM
            else "linspace"
        )
    prediction = {v: k for k, v in PREDICTION_TO_DIFFUSERS.items()}.get(
        c.get("prediction_type", "epsilon")
    )
    _require(prediction is not None, f"{where}: prediction_type={c.get('prediction_type')!r}")
    return schedule, {"name": "ddim", "steps": 50, "eta": 0.0, "spacing": spacing}, prediction


def read_diffusers(
    directory: str | os.PathLike, *, text_encoder_dir: str | os.PathLike | None = None
) -> tuple[Any, dict[str, Tensor], float]:
    """A diffusers folder (a UNet, a KL or VQ autoencoder, a scheduler, and a CLIP text encoder
    or an ``ldmkit_conditioner``) as (the ldmkit config, the state dict in ldmkit's names, the
    scale factor); :meth:`ldmkit.pipeline.Pipeline.from_diffusers` builds and loads it.

    ``text_encoder_dir``: where the CLIP text encoder's config and tokenizer are read from by
    the pipeline's ``clip_text`` (default: the folder's own ``text_encoder/`` and
    ``tokenizer/``; ``ldmkit convert from-diffusers`` copies them beside the pipeline)."""
    from ldmkit.interop import compvis

    directory = Path(directory)
    index = _read_json(directory / "model_index.json")
    unet_cfg = _unet_from_config(_read_json(directory / "unet" / "config.json"))
    vae_dir = "vae" if "vae" in index else "vqvae" if "vqvae" in index else None
    _require(vae_dir is not None, f"{directory}/model_index.json names no `vae` or `vqvae`")
    first, scale = _vae_from_config(_read_json(directory / vae_dir / "config.json"))
    scheduler_path = directory / "scheduler" / "scheduler_config.json"
    schedule, sampler, prediction = _schedule_from_config(_read_json(scheduler_path))
    unet_cfg["prediction"] = prediction
    unet_raw = _read_json(directory / "unet" / "config.json")
    factor = 2 ** (len(first["ch_mult"]) - 1)
    extra = _read_json(directory / "ldmkit.json") if (directory / "ldmkit.json").is_file() else {}
    if extra.get("sampler"):
        sampler = extra["sampler"]
    unet_cfg["use_new_attention_order"] = bool(extra.get("use_new_attention_order", False))
    image_size = _value(extra, "image_size", WHOLE, "ldmkit.json", None) or factor * _value(
        unet_raw, "sample_size", WHOLE, f"unet/config.json ({unet_raw.get('_class_name')})", 32
    )
    cond_state: dict[str, Tensor] = {}
    if "text_encoder" in index and index["text_encoder"][0] is not None:
        kind = index["text_encoder"][1]
        _require(
            kind == "CLIPTextModel",
            f"{directory}: text_encoder {kind} has no ldmkit conditioner (CLIPTextModel does: clip_text)",
        )
        base = Path(text_encoder_dir) if text_encoder_dir is not None else directory
        conditioner: dict[str, Any] = {
            "name": "clip_text", "name_or_path": str((base / "text_encoder").resolve()),
            "tokenizer_path": str((base / "tokenizer").resolve()), "max_length": 77, "pretrained": False,
            "input_key": "caption", "drop_rate": compvis.GUIDED_DROP_RATE,
        }  # fmt: skip
        cond_state = {
            "transformer." + k: v for k, v in _read_tensors(directory / "text_encoder").items()
        }
    elif "bert" in index and index["bert"][0] is not None:
        kind = index["bert"][1]
        _require(kind == "LDMBertModel", f"{directory}: bert {kind} has no ldmkit conditioner (LDMBertModel does: bert)")
        conditioner = _bert_from_config(_read_json(directory / "bert" / "config.json"), f"{directory}/bert/config.json")
        base = Path(text_encoder_dir) if text_encoder_dir is not None else directory
        conditioner.update(vocab=_bert_vocab(base / "tokenizer", bool(extra.get("bert_default_vocab"))), input_key="caption", drop_rate=compvis.GUIDED_DROP_RATE)
        names = {theirs: ours for ours, theirs in _bert_names(conditioner["n_layer"]).items()}
        bert_state = _read_tensors(directory / "bert")
        unknown = sorted(set(bert_state) - set(names))
        _require(not unknown, f"{directory}/bert: weights ldmkit's bert does not have: {unknown[:5]}")
        cond_state = {"transformer." + names[k]: v for k, v in bert_state.items()}
    elif (directory / CONDITIONER_DIR / "config.json").is_file():
        conditioner = _read_json(directory / CONDITIONER_DIR / "config.json")["conditioner"]
        if (directory / CONDITIONER_DIR / "model.safetensors").is_file():
            cond_state = _read_tensors(directory / CONDITIONER_DIR)
    elif unet_cfg["num_classes"] not in (None, "sequential"):
        conditioner = {"name": "class_label", "num_classes": unet_cfg["num_classes"], "embed_dim": 1, "role": "vector",
                       "input_key": "label", "drop_rate": 0.0}  # fmt: skip
    else:
        conditioner = {"name": "none"}
    groups = {"first_stage": first, "denoiser": unet_cfg, "conditioner": conditioner, "sampler": sampler,
              "schedule": schedule}  # fmt: skip
    model = compvis.CompvisModel("pipeline", groups, {"image_size": image_size, "scale_factor": scale},
                                 source=str(directory))  # fmt: skip
    cfg = compvis.compose(model, source_kind="diffusers")
    state = {
        "denoiser." + k: v
        for k, v in unet_from_diffusers(_read_tensors(directory / "unet"), unet_cfg).items()
    }
    first_state = vae_from_diffusers(_read_tensors(directory / vae_dir), first)
    state.update({"first_stage." + k: v for k, v in first_state.items()})
    state.update({"conditioner." + k: v for k, v in cond_state.items()})
    return cfg, state, scale


def fit_state(state: dict[str, Tensor], own: dict[str, Tensor], scale: float) -> dict[str, Tensor]:
    """``state`` completed for a pipeline whose own state dict is ``own``: the scale factor,
    the schedule buffers diffusers does not store, the text encoder's names."""
    state = _fit_text_encoder(state, own)
    if "scale_factor" in own:
        state["scale_factor"] = torch.full_like(own["scale_factor"], scale)
    for name, value in own.items():
        if name not in state and not name.startswith(("denoiser.", "first_stage.", "conditioner.")):
            state[name] = value
    return state


def _fit_text_encoder(state: dict[str, Tensor], own: dict[str, Tensor]) -> dict[str, Tensor]:
    """CLIP text weights saved by one transformers version (``text_model.*`` or not, with or
    without the ``position_ids`` buffer) in the names of the installed one."""
    prefix = "conditioner.transformer."
    if not any(k.startswith(prefix) for k in own):
        return state
    wants_inner = any(k.startswith(prefix + "text_model.") for k in own)
    out: dict[str, Tensor] = {}
    for name, value in state.items():
        if name.startswith(prefix):
            rest = name[len(prefix) :]
            if rest.startswith("text_model.") and not wants_inner:
                rest = rest[len("text_model.") :]
            elif wants_inner and not rest.startswith("text_model."):
                rest = "text_model." + rest
            name = prefix + rest
            if name not in own and name.endswith("position_ids"):
                continue
        out[name] = value
    return out


def _bert_vocab(tokenizer_dir: Path, default: bool) -> str | None:
    """The ``vocab`` of a ``bert`` read from diffusers: None (ldmkit's default, bert-base-uncased)
    when ``ldmkit.json`` says the pipeline was written with it, else ``tokenizer/vocab.txt``."""
    vocab = tokenizer_dir / "vocab.txt"
    _require(vocab.is_file(), f"{tokenizer_dir}: no vocab.txt (the WordPiece vocabulary of the bert text model)")
    return None if default else str(vocab.resolve())


def copy_text_encoder_files(source: Path, out: Path) -> bool:
    """The text encoder's config and tokenizer files (not its weights) from a diffusers folder
    into ``out`` (``text_encoder/`` or ``bert/``, and ``tokenizer/``); False if it has none."""
    subs = [sub for sub in ("text_encoder", "bert", "tokenizer") if (source / sub).is_dir()]
    if not any(sub in subs for sub in ("text_encoder", "bert")):
        return False
    for sub in subs:
        (out / sub).mkdir(parents=True, exist_ok=True)
        for path in (source / sub).iterdir():
            if path.is_file() and path.suffix not in (".safetensors", ".bin"):
                shutil.copy2(path, out / sub / path.name)
    return True
