"""A trained first stage as a 🤗 diffusers ``AutoencoderKL`` / ``VQModel`` with the same
weights, computing the same function.

A thin layer over :mod:`ldmkit.interop.diffusers.autoencoder`, the one implementation of the
mapping (``ldmkit convert to-diffusers`` writes a pipeline's first stage with it): here it
takes a built model (its ``architecture``) instead of a pipeline's config. Used by
``benchmarks/autoencoder_diffusers.py``; requires ``diffusers``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ldmkit.interop.diffusers.autoencoder import diffusers_vae_config, vae_to_diffusers
from ldmkit_autoencoders.engine import AutoencodingEngine
from ldmkit_autoencoders.vq import VQAutoencoder


def _first_stage(model: AutoencodingEngine) -> dict[str, Any]:
    """``model`` as a ``first_stage`` config node (what the interop module reads)."""
    if isinstance(model, VQAutoencoder):
        return {"name": "vq", **model.architecture, "n_embed": model.quantizer.n_embed}
    return {"name": "kl", **model.architecture}


def diffusers_config(model: AutoencodingEngine) -> dict[str, Any]:
    """Constructor arguments of the equivalent diffusers model (``scaling_factor``: diffusers'
    default; a pipeline's scale factor is written by ``ldmkit convert to-diffusers``)."""
    config = diffusers_vae_config(_first_stage(model), 1.0)
    return {k: v for k, v in config.items() if not k.startswith("_") and k != "scaling_factor"}


def to_diffusers_state_dict(model: AutoencodingEngine) -> dict[str, Tensor]:
    return vae_to_diffusers(model.state_dict(), _first_stage(model))


def to_diffusers(model: AutoencodingEngine):
    """A diffusers ``AutoencoderKL`` or ``VQModel`` computing the same function."""
    from diffusers import AutoencoderKL, VQModel

    cls = VQModel if isinstance(model, VQAutoencoder) else AutoencoderKL
    target = cls(**diffusers_config(model))
    target.load_state_dict(to_diffusers_state_dict(model))
    return target.to(next(model.parameters()).device).eval()
