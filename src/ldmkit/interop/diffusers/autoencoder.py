"""The first stage: ldmkit's ``kl`` / ``vq`` autoencoders as diffusers' ``AutoencoderKL`` /
``VQModel`` (``scaling_factor``: the pipeline's scale factor), their weights and their config,
both ways."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ldmkit.config_checks import ListOf
from ldmkit.interop.diffusers.common import (
    DIFFUSERS_VERSION,
    POSITIVE,
    WHOLE,
    _require,
    _value,
)
from ldmkit.interop.diffusers.renaming import Row, _convert

# the encoder's and decoder's blocks of a level without and with attention
DOWN, ATTN_DOWN, UP, ATTN_UP = "DownEncoderBlock2D", "AttnDownEncoderBlock2D", "UpDecoderBlock2D", "AttnUpDecoderBlock2D"
# AutoencoderKL's and VQModel's scaling_factor when their config.json has none (Stable
# Diffusion v1's vae/config.json predates the key)
DIFFUSERS_SCALING_FACTOR = 0.18215


def _level_attention(cfg: dict[str, Any]) -> list[bool]:
    """Whether each level of the encoder (and the decoder's level of the same size) attends:
    ``attn_resolutions`` lists feature-map sizes; ``attn_type: none`` attends nowhere."""
    sizes = [int(cfg["resolution"]) // 2**level for level in range(len(cfg["ch_mult"]))]
    attends = cfg.get("attn_type", "vanilla") != "none"
    return [attends and size in list(cfg.get("attn_resolutions") or []) for size in sizes]


def _vae_rows(cfg: dict[str, Any]) -> list[Row]:
    levels, nrb = len(cfg["ch_mult"]), int(cfg["num_res_blocks"])
    attention = _level_attention(cfg)
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
        if attention[level]:  # the level's attention after each ResBlock, as diffusers' Attn*Block2D
            rows += [(f"encoder.down.{level}.attn.{j}.", f"encoder.down_blocks.{level}.attentions.{j}.", "vattn", 0)
                     for j in range(nrb)]  # fmt: skip
            rows += [(f"decoder.up.{level}.attn.{j}.", f"decoder.up_blocks.{up}.attentions.{j}.", "vattn", 0)
                     for j in range(nrb + 1)]  # fmt: skip
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


def vae_to_diffusers(state: dict[str, Tensor], cfg: dict[str, Any]) -> dict[str, Tensor]:
    """An ldmkit KL / VQ first stage's state dict in diffusers' ``AutoencoderKL`` / ``VQModel`` names
    (without ``regularizer.code_usage``, the dead-code restarts' training bookkeeping)."""
    state = {k: v for k, v in state.items() if k != "regularizer.code_usage"}
    return _convert(state, _vae_rows(cfg), to=True, what="first_stage")


def vae_from_diffusers(state: dict[str, Tensor], cfg: dict[str, Any]) -> dict[str, Tensor]:
    """The inverse of :func:`vae_to_diffusers`."""
    return _convert(state, _vae_rows(cfg), to=False, what="vae")


def diffusers_vae_config(cfg: dict[str, Any], scaling_factor: float) -> dict[str, Any]:
    """The diffusers config (``AutoencoderKL`` or ``VQModel``) of an ldmkit KL / VQ first stage."""
    name = cfg.get("name")
    where = f"first_stage ({name})"
    _require(
        name in ("kl", "vq"),
        f"first_stage: only ldmkit's `kl` and `vq` convert to diffusers, got {name!r}",
    )
    attention = _level_attention(cfg)
    common = {
        "_diffusers_version": DIFFUSERS_VERSION, "in_channels": int(cfg["in_channels"]),
        "out_channels": int(cfg["out_ch"]),
        "down_block_types": [ATTN_DOWN if a else DOWN for a in attention],
        "up_block_types": [ATTN_UP if a else UP for a in reversed(attention)],
        "block_out_channels": [int(cfg["ch"]) * int(m) for m in cfg["ch_mult"]],
        "layers_per_block": int(cfg["num_res_blocks"]), "act_fn": "silu",
        "norm_num_groups": int(cfg.get("norm_groups", 32)), "sample_size": int(cfg["resolution"]), "scaling_factor": float(scaling_factor),
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


def _vae_from_config(c: dict[str, Any]) -> tuple[dict[str, Any], float]:
    cls = c.get("_class_name")
    where = f"{'vae' if cls == 'AutoencoderKL' else 'vqvae'}/config.json ({cls})"
    _require(
        cls in ("AutoencoderKL", "VQModel"), f"{where}: only AutoencoderKL and VQModel convert"
    )
    channels = list(_value(c, "block_out_channels", ListOf(WHOLE), where))
    for key, want in (("act_fn", "silu"), ("norm_type", "group"), ("use_quant_conv", True),
                      ("use_post_quant_conv", True), ("latents_mean", None), ("latents_std", None),
                      ("shift_factor", None)):  # fmt: skip
        if key in c:
            _require(
                c[key] == want,
                f"{where}: {key}={c[key]!r} is not supported (ldmkit's autoencoder has {want!r})",
            )
    resolution = _value(c, "sample_size", WHOLE, where, 256)
    down = list(c.get("down_block_types") or [DOWN] * len(channels))
    up = list(c.get("up_block_types") or [UP] * len(channels))
    attention = [kind == ATTN_DOWN for kind in down]
    _require(
        len(down) == len(up) == len(channels)
        and all(kind in (DOWN, ATTN_DOWN) for kind in down)
        and up == [ATTN_UP if a else UP for a in reversed(attention)],
        f"{where}: down_block_types={down}, up_block_types={up}: ldmkit's autoencoder has one block a level, "
        f"{DOWN} or {ATTN_DOWN}, and the decoder's mirror the encoder's ({UP} / {ATTN_UP})",
    )
    _require(
        c.get("mid_block_add_attention", True) or not any(attention),
        f"{where}: mid_block_add_attention=false with {ATTN_DOWN}s: ldmkit's autoencoder attends in its levels "
        "only when its middle block does (attn_type: none is no attention anywhere)",
    )
    arch = {"ch": channels[0], "ch_mult": [x // channels[0] for x in channels],
            "num_res_blocks": _value(c, "layers_per_block", WHOLE, where),
            "attn_resolutions": [resolution // 2**level for level, a in enumerate(attention) if a],
            "resolution": resolution, "in_channels": _value(c, "in_channels", WHOLE, where),
            "out_ch": _value(c, "out_channels", WHOLE, where), "dropout": 0.0,
            "norm_groups": _value(c, "norm_num_groups", WHOLE, where, 32),
            "attn_type": "vanilla" if c.get("mid_block_add_attention", True) else "none"}  # fmt: skip
    # absent: diffusers' default, which the folders written before it was a key rely on
    scale = float(_value(c, "scaling_factor", POSITIVE, where, DIFFUSERS_SCALING_FACTOR))
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
