"""Export to 🤗 diffusers: our KL-reg / VQ-reg models as ``AutoencoderKL`` / ``VQModel``
with the same weights (the mapping of diffusers' own LDM conversion script, run backwards).

Used by ``benchmarks/autoencoder_diffusers.py`` and to hand a trained first stage to
diffusers pipelines. Requires ``diffusers``; the KL export needs ``z_channels ==
latent_channels`` (diffusers ties them), which every configuration of the paper satisfies.
"""

from __future__ import annotations

import re
from typing import Any

from torch import Tensor

from ldmkit_autoencoders.engine import AutoencodingEngine
from ldmkit_autoencoders.vq import VQAutoencoder

_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _level_has_attention(arch: dict[str, Any], level: int) -> bool:
    return arch["resolution"] // 2**level in arch["attn_resolutions"]


def diffusers_config(model: AutoencodingEngine) -> dict[str, Any]:
    """Constructor arguments of the equivalent diffusers model."""
    arch = model.architecture
    levels = range(len(arch["ch_mult"]))
    down = ["AttnDownEncoderBlock2D" if _level_has_attention(arch, i) else "DownEncoderBlock2D" for i in levels]
    up = ["AttnUpDecoderBlock2D" if _level_has_attention(arch, i) else "UpDecoderBlock2D" for i in reversed(levels)]
    config = dict(
        in_channels=arch["in_channels"], out_channels=arch["out_ch"],
        down_block_types=tuple(down), up_block_types=tuple(up),
        block_out_channels=tuple(arch["ch"] * m for m in arch["ch_mult"]),
        layers_per_block=arch["num_res_blocks"], norm_num_groups=arch["norm_groups"],
        sample_size=arch["resolution"],
    )
    if isinstance(model, VQAutoencoder):
        config.update(latent_channels=arch["z_channels"], vq_embed_dim=arch["latent_channels"],
                      num_vq_embeddings=model.quantizer.n_embed)
    else:
        if arch["z_channels"] != arch["latent_channels"]:
            raise ValueError(
                "diffusers' AutoencoderKL needs z_channels == latent_channels, got "
                f"{arch['z_channels']} and {arch['latent_channels']}"
            )
        config.update(latent_channels=arch["latent_channels"])
    return config


def _rename(key: str, num_levels: int) -> str:
    key = key.replace("regularizer.embedding", "quantize.embedding")
    key = re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", key)
    key = re.sub(r"\.mid\.block_1\.", ".mid_block.resnets.0.", key)
    key = re.sub(r"\.mid\.block_2\.", ".mid_block.resnets.1.", key)
    key = re.sub(r"\.mid\.attn_1\.", ".mid_block.attentions.0.", key)
    key = re.sub(r"^encoder\.down\.(\d+)\.", r"encoder.down_blocks.\1.", key)
    key = re.sub(
        r"^decoder\.up\.(\d+)\.", lambda m: f"decoder.up_blocks.{num_levels - 1 - int(m.group(1))}.", key
    )
    key = re.sub(r"\.block\.(\d+)\.", r".resnets.\1.", key)
    key = re.sub(r"\.attn\.(\d+)\.", r".attentions.\1.", key)
    key = key.replace(".downsample.conv.", ".downsamplers.0.conv.").replace(".upsample.conv.", ".upsamplers.0.conv.")
    key = key.replace(".nin_shortcut.", ".conv_shortcut.")
    match = re.search(r"\.attentions\.\d+\.(norm|q|k|v|proj_out)\.(weight|bias)$", key)
    if match:
        key = key[: match.start(1)] + _ATTN[match.group(1)] + "." + match.group(2)
    return key


def to_diffusers_state_dict(model: AutoencodingEngine) -> dict[str, Tensor]:
    num_levels = len(model.architecture["ch_mult"])
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith("code_usage"):
            continue  # training bookkeeping of the dead-code restarts
        new = _rename(key, num_levels)
        if re.search(r"\.to_(q|k|v|out\.0)\.weight$", new):
            value = value[:, :, 0, 0]  # 1×1 conv -> linear
        state[new] = value
    return state


def to_diffusers(model: AutoencodingEngine):
    """A diffusers ``AutoencoderKL`` or ``VQModel`` computing the same function."""
    from diffusers import AutoencoderKL, VQModel

    cls = VQModel if isinstance(model, VQAutoencoder) else AutoencoderKL
    target = cls(**diffusers_config(model))
    missing, unexpected = target.load_state_dict(to_diffusers_state_dict(model), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"weights did not map onto diffusers' {cls.__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return target.to(next(model.parameters()).device).eval()
