"""Composite conditions: several conditioners as one (the idea of sgm's GeneralConditioner,
with ldmkit's declared dims).

Each part is a conditioner config (its registered ``name`` and arguments, plus its own
``drop_rate`` for classifier-free guidance). Outputs of the same role are concatenated in
the order of the parts: ``crossattn`` along the tokens (every part must give the same
token width d), ``concat`` along the channels, ``vector`` along the features. In training
each part drops its condition on its own, per sample, and the composite's own
``drop_rate`` (default 0) drops all parts together.

The null condition guidance pushes away from is the one training showed: with a joint
``drop_rate``, every part's null; else the null of the parts that drop and the real
condition of those that never do (a map, a masked image: as Stable Diffusion's inpainting
and SDXL guide, nulling the text only). With no part that drops, every part's null, which
no training showed (``Pipeline.sample`` warns).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ldmkit.interfaces import Conditioner

# the dimension each role is concatenated along
MERGE_DIM = {"crossattn": 1, "concat": 1, "vector": 1}


def merge(outputs: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Concatenate the parts' outputs role by role, in part order."""
    by_role: dict[str, list[Tensor]] = {}
    for out in outputs:
        for role, value in out.items():
            by_role.setdefault(role, []).append(value)
    return {role: torch.cat(values, dim=MERGE_DIM[role]) for role, values in by_role.items()}


class MultiConditioner(Conditioner):
    """Several conditioners as one; see the module docstring.

    :param parts: conditioner configs, e.g. ``[{"name": "class_label", "num_classes": 10,
        "drop_rate": 0.1}, {"name": "semantic_map", "num_classes": 8}]``.
    """

    def __init__(self, *, parts: Sequence[Mapping[str, Any]] = ()) -> None:
        super().__init__()
        from ldmkit.assembly import create_component
        from ldmkit.plugins import get_registry

        if not parts:
            raise ValueError("conditioner=multi needs at least one part in `parts`")
        registry = get_registry()
        built = []
        for i, part in enumerate(parts):
            if not isinstance(part, Mapping) or "name" not in part:
                raise ValueError(f"parts[{i}] must be a conditioner config with a `name`, got {part!r}")
            built.append(create_component(registry, "conditioner", dict(part), f"conditioner=multi parts[{i}]",
                                          key=f"conditioner.parts[{i}]"))
        self.parts = nn.ModuleList(built)
        self.part_names = [str(part["name"]) for part in parts]
        kinds: dict[str, str] = {}
        for name, part in zip(self.part_names, self.parts, strict=True):
            for key in part.input_keys:
                kind = part.input_kind(key)
                if kinds.setdefault(key, kind) != kind:
                    raise ValueError(f"parts disagree on batch key {key!r}: {kinds[key]} and {kind} ({name})")
        self.input_keys = tuple(kinds)
        self.input_kinds = kinds
        self._check_crossattn()

    def _check_crossattn(self) -> None:
        widths = {f"parts[{i}] ({name})": part.crossattn_dim
                  for i, (name, part) in enumerate(zip(self.part_names, self.parts, strict=True))
                  if part.crossattn_dim is not None}
        if len(set(widths.values())) > 1:
            raise ValueError(
                f"crossattn tokens are concatenated, so every part must give the same width; got {widths} "
                "(set the parts' embedding sizes equal)"
            )

    # declared dims follow the parts (a part may set its own when the first stage is bound)
    def _sum(self, attr: str) -> int | None:
        values = [getattr(p, attr) for p in self.parts if getattr(p, attr) is not None]
        return sum(values) if values else None

    @property
    def crossattn_dim(self) -> int | None:
        return next((p.crossattn_dim for p in self.parts if p.crossattn_dim is not None), None)

    @property
    def concat_channels(self) -> int | None:
        return self._sum("concat_channels")

    @property
    def vector_dim(self) -> int | None:
        return self._sum("vector_dim")

    @property
    def data_keys(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(k for p in self.parts for k in p.data_keys))

    @property
    def learns_null_condition(self) -> bool:
        """Whether training shows :meth:`unconditional`: the composite drops all parts
        together, or some part drops its own (its null, beside the others' real conditions,
        is what :meth:`unconditional` gives then)."""
        return self.drop_rate > 0 or any(part.learns_null_condition for part in self.parts)

    def known_region(self, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor] | None:
        return next((r for r in (part.known_region(batch) for part in self.parts) if r is not None), None)

    def bind_first_stage(self, first_stage: nn.Module) -> None:
        for part in self.parts:
            part.bind_first_stage(first_stage)

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        return merge([part(batch) for part in self.parts])

    def unconditional(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        if self.drop_rate > 0 or not any(part.learns_null_condition for part in self.parts):
            return merge([part.unconditional(batch) for part in self.parts])
        # the parts that never drop keep their condition in the null branch (module docstring)
        return merge([part.unconditional(batch) if part.learns_null_condition else part(batch) for part in self.parts])

    def training_inputs(self, batch: Mapping[str, Any], generator: torch.Generator | None = None) -> Mapping[str, Any]:
        for part in self.parts:
            batch = part.training_inputs(batch, generator)
        return batch

    def condition(self, batch: Mapping[str, Any], *, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        merged = merge([part.condition(batch, generator=generator) for part in self.parts])
        return self.drop_conditions(merged, batch, generator)  # the joint drop_rate on top
