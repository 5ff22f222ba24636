"""``ldmkit data``: dataset preparation, in :mod:`ldmkit.data.cli`."""

from __future__ import annotations

from collections.abc import Sequence

from ldmkit.cli.common import _optional_module


def data(argv: Sequence[str], *, prog: str, description: str) -> int:
    module = _optional_module("ldmkit.data.cli", "dataset preparation")
    return int(module.main(list(argv)) or 0)
