"""The unconditional model's conditioner: no condition at all."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from ldmkit.interfaces import Conditioner


class NullConditioner(Conditioner):
    """Returns an empty condition; the denoiser then runs unconditionally."""

    input_keys = ()

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        return {}

    def unconditional(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        return {}
