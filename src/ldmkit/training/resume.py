"""What changed between the config a checkpoint was written with and the one resuming it.

Keys that define the model (the stage's model groups, ``scale_factor``) and ``seed`` (the
random streams continue from the checkpoint) cannot change: resuming refuses, naming them.
Everything else — ``trainer.lr``, ``trainer.max_steps``, batch size, intervals, data, the
sampler of the grids — is applied from the resumed step on and listed in one warning, so the
run never keeps an old value while its ``config.yaml`` shows a new one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

_ABSENT = "<absent>"


@dataclass(frozen=True)
class Change:
    key: str
    before: Any
    after: Any

    def __str__(self) -> str:
        return f"{self.key}: {_show(self.before)} -> {_show(self.after)}"


def _show(value: Any) -> str:
    return value if value is _ABSENT else repr(value) if isinstance(value, str) else str(value)


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists are values; an empty mapping is a value)."""
    if isinstance(node, Mapping) and node:
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node} if prefix else {}


def config_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[Change]:
    """Every dotted key whose value differs (or that exists on one side only), sorted."""
    before, after = flatten(saved), flatten(current)
    keys = sorted(set(before) | set(after))
    return [
        Change(k, before.get(k, _ABSENT), after.get(k, _ABSENT))
        for k in keys
        if before.get(k, _ABSENT) != after.get(k, _ABSENT)
    ]


def under(key: str, prefixes: Iterable[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def weights_only_key(key: str) -> bool:
    """``first_stage.checkpoint`` and the like: initial weights, which a resumed run takes
    from its own checkpoint instead."""
    return key.rsplit(".", 1)[-1] == "checkpoint"
