"""A LoRA adapter folder (:mod:`ldmkit.lora`) as the LoRA file diffusers loads onto the
``UNet2DConditionModel`` that :func:`~.folder.to_diffusers` writes from its base:
``pytorch_lora_weights.safetensors`` in peft's layout (``unet.<diffusers module>.lora_A.weight``
/ ``lora_B.weight``), read by ``pipe.load_lora_weights(DIR)`` and
``UNet2DConditionModel.load_lora_adapter(DIR, prefix="unet")``.

Module names go through the UNet's rows (:mod:`.unet`); the scale ``alpha / r`` is baked into
``lora_B``, so diffusers' default ``lora_alpha = r`` gives the same update."""

from __future__ import annotations

import os
from pathlib import Path

from torch import Tensor

from ldmkit import lora
from ldmkit.interop.diffusers.common import ConversionError
from ldmkit.interop.diffusers.renaming import UNET_RES, _rename_first
from ldmkit.interop.diffusers.unet import _unet_rows

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE


def _diffusers_module(module: str, cfg: dict) -> str:
    """The diffusers UNet's name of the ldmkit UNet's layer ``module``."""
    rows = sorted(_unet_rows(cfg), key=lambda r: -len(r[0]))
    row = next((r for r in rows if (module + ".").startswith(r[0])), None)
    if row is None or row[2] == "attn":
        raise ConversionError(
            f"the adapter's layer denoiser.{module} has no LoRA counterpart in diffusers' UNet "
            "(an AttentionBlock's qkv is split there); adapt the SpatialTransformer layers instead"
        )
    rest = (module + ".")[len(row[0]) :]
    if row[2] == "res":
        rest = _rename_first(rest, UNET_RES, f"denoiser: {row[0]}")
    return (row[1] + rest).rstrip(".")


def adapter_to_diffusers(directory: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the adapter of the adapter folder ``directory`` as ``out/pytorch_lora_weights.safetensors``."""
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from ldmkit.config import load_saved_config
    from ldmkit.io import atomic_write
    from ldmkit.safetensors_io import read_safetensors

    directory, out = Path(directory), Path(out)
    adapter = lora.read_adapter(directory)
    if adapter is None:
        raise ConversionError(f"{directory} is not a LoRA adapter folder (no {lora.ADAPTER_CONFIG})")
    others = sorted(set(adapter.targets) - {"denoiser"})
    if others:
        raise ConversionError(
            f"the adapter of {directory} also adapts the {', '.join(others)}, which diffusers' UNet LoRA "
            "cannot hold; export the merged pipeline instead (ldmkit lora merge, then convert to-diffusers)"
        )
    cfg = OmegaConf.to_container(load_saved_config(directory / "config.yaml").denoiser, resolve=True)
    scale = adapter.alpha / adapter.rank
    state: dict[str, Tensor] = {}
    for key, value in read_safetensors(directory / lora.ADAPTER_FILE).items():
        module, _, rest = key.removeprefix("denoiser.").partition(".lora_")
        which = rest.split(".")[0]  # A or B
        state[f"unet.{_diffusers_module(module, cfg)}.lora_{which}.weight"] = value * scale if which == "B" else value
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / LORA_WEIGHTS, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    return out / LORA_WEIGHTS
