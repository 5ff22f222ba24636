"""The UNet: ldmkit's ``unet`` as diffusers' ``UNet2DConditionModel`` (SpatialTransformer
UNets: cross-attention) or ``UNet2DModel`` (AttentionBlock UNets: the paper's unconditional,
super-resolution, inpainting and semantic models), its weights and its config, both ways."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ldmkit.config_checks import Either, ListOf
from ldmkit.interop.diffusers.common import (
    DIFFUSERS_VERSION,
    WHOLE,
    ConversionError,
    _require,
    _value,
)
from ldmkit.interop.diffusers.renaming import Row, _convert


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
                      ("downsample_type", "conv"), ("upsample_type", "conv"), ("add_attention", True),
                      # options that change what the UNet computes but none of its weights' shapes
                      ("norm_eps", 1e-5), ("resnet_out_scale_factor", 1.0), ("resnet_skip_time_act", False),
                      ("time_embedding_act_fn", None), ("timestep_post_act", None)):  # fmt: skip
        if key in c:
            _require(
                c[key] == want,
                f"{where}: {key}={c[key]!r} is not supported (ldmkit's UNet has {want!r})",
            )
    _require(
        c.get("resnet_time_scale_shift", "default") in ("default", "scale_shift"),
        f"{where}: resnet_time_scale_shift={c.get('resnet_time_scale_shift')!r} is not supported (default or scale_shift)",
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
        heads = _value(  # diffusers' attention_head_dim counts heads here (absent: its default, 8)
            c, "num_attention_heads", heads_spec, where, None
        ) or _value(c, "attention_head_dim", heads_spec, where, 8)
        _require(
            isinstance(heads, int) or len(heads) == levels,
            f"{where}: attention_head_dim={heads}: expected one number of heads, or one per level ({levels} levels)",
        )
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
        # absent is diffusers' default (heads 8 wide); null is one head of the block's width
        head_dim = _value(c, "attention_head_dim", WHOLE, where, None) if "attention_head_dim" in c else 8
        if head_dim is None:
            out.update(num_heads=1, num_head_channels=-1)
        else:
            out.update(num_heads=-1, num_head_channels=head_dim)
        out.update(use_spatial_transformer=False, context_dim=None)
    return out


def _unet_classes(denoiser: Any, cfg: dict[str, Any]) -> Any:
    """The UNet's class embedding as diffusers sees it (ldmkit feeds it a one-hot vector)."""
    emb = getattr(denoiser, "label_emb", None)
    if emb is None:
        return None
    if isinstance(emb, torch.nn.Embedding):
        return emb.num_embeddings
    return "sequential"
