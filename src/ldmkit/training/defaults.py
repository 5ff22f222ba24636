"""The trainers' defaults, read from the one place they live: ``conf/trainer/*.yaml``.

``default.yaml`` holds the keys both stages share; each stage's preset (``autoencoder.yaml``,
``ldm.yaml``) extends it through Hydra's ``defaults:`` list and adds its own. A trainer fills
the keys a config leaves out (a config written by hand, or by an older ldmkit) from its
stage's preset, so the Python side holds no second copy that could disagree with the YAML.
"""

from __future__ import annotations

import copy
from functools import cache
from typing import Any

__all__ = ["trainer_preset", "stage_only_keys"]


@cache
def _load(name: str) -> dict[str, Any]:
    from omegaconf import OmegaConf

    from ldmkit.errors import ConfigError
    from ldmkit.resources import config_dir

    path = config_dir() / "trainer" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"no trainer preset {name!r}: {path} does not exist")
    node = OmegaConf.load(path)
    merged = OmegaConf.create({})
    own = OmegaConf.masked_copy(node, [k for k in node if k != "defaults"])
    for entry in node.get("defaults", None) or []:
        if entry == "_self_":
            merged = OmegaConf.merge(merged, own)
        else:
            merged = OmegaConf.merge(merged, OmegaConf.create(_load(str(entry))))
    if "_self_" not in (node.get("defaults", None) or []):
        merged = OmegaConf.merge(merged, own)
    return OmegaConf.to_container(merged, resolve=True)  # type: ignore[return-value]


def trainer_preset(name: str) -> dict[str, Any]:
    """The fully merged ``conf/trainer/<name>.yaml`` (its ``defaults:`` applied), as a new
    dict each call."""
    return copy.deepcopy(_load(name))


def stage_only_keys(name: str) -> dict[str, Any]:
    """The keys preset ``name`` adds to ``default.yaml``, with their values."""
    shared = _load("default")
    return {k: v for k, v in trainer_preset(name).items() if k not in shared}
