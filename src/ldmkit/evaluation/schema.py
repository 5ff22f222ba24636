"""What the ``eval`` keys of ``ldmkit evaluate`` take (the types and ranges composition
checks; the defaults are in ``conf/config.yaml``). Declared to the config checker through
``ldmkit_register_config_keys`` by :mod:`ldmkit.evaluation.stages`."""

from __future__ import annotations

from ldmkit.config_checks import Boolean, Choice, Device, Either, Integer, Number, Spec, Text
from ldmkit.evaluation.features import FEATURES

__all__ = ["EVAL_KEYS"]

EVAL_KEYS: dict[str, Spec] = {
    "checkpoint": Text(null=True),
    "split": Text(null=True),
    "batch_size": Integer(1),
    "max_images": Integer(1, null=True),
    "lpips": Either(Boolean(), Choice("auto")),
    "fid_features": Choice("auto", *FEATURES, "none"),
    "feature_checkpoint": Text(null=True),
    "output": Text(null=True),
    "device": Device(),
    "num_workers": Integer(0),
    "steps": Integer(1, null=True),
    "guidance_scale": Number(0),
    "seed": Integer(0, 2**32 - 1, null=True),  # sample k of the split uses seed + k
    "progress": Boolean(),
}
