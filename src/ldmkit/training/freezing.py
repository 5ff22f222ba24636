"""``trainer.trainable`` / ``trainer.frozen``: which parameters a run trains.

Both take fnmatch patterns over the parameter names of the stage (stage 2:
``denoiser.…``, ``conditioner.…``, ``objective.logvar``; stage 1: ``first_stage.…``,
``loss.logvar``, ``loss.discriminator.…``, the prefixes of its checkpoints). A pattern
matches a name, or a module above it (``denoiser.output_blocks`` = ``denoiser.output_blocks.*``).
``trainable`` (null: every parameter the stage trains) picks the parameters to train and
``frozen`` then removes some of them. The others get ``requires_grad=False``: no gradient, no
optimizer state, no EMA, unchanged by training. Patterns only narrow what the stage trains: a
part the model keeps frozen (the first stage in stage 2, a pretrained text encoder) stays
frozen. A pattern that matches none of those parameters is an error naming it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from torch import nn

from ldmkit.training.errors import TrainingError

__all__ = ["Selection", "apply_patterns", "patterns"]


def patterns(value: Any) -> list[str] | None:
    """A pattern option as a list (a single string is one pattern; null stays None)."""
    if value is None:
        return None
    return [value] if isinstance(value, str) else [str(v) for v in value]


def _matches(name: str, pattern: str) -> bool:
    return fnmatchcase(name, pattern) or fnmatchcase(name, pattern + ".*")


@dataclass
class Selection:
    trained: int  # parameters (elements) left trainable
    total: int  # of the parameters the stage would train
    frozen_names: list[str]

    def line(self, stage: str) -> str:
        share = 100.0 * self.trained / self.total if self.total else 0.0
        return (
            f"ldmkit train {stage}: {self.trained:,} of {self.total:,} parameters train ({share:.4g}%); "
            f"trainer.trainable/trainer.frozen froze {len(self.frozen_names)} tensor(s)"
        )


def apply_patterns(
    named: Iterable[tuple[str, nn.Parameter]], trainable: Any, frozen: Any, *, what: str = "the model"
) -> Selection | None:
    """Freeze what ``trainable``/``frozen`` leave out of ``named`` (the stage's parameters
    with their checkpoint names; those already frozen are not candidates). None when neither
    option is set. Raises :class:`TrainingError` for a pattern that matches nothing, or when
    nothing is left to train."""
    keep, drop = patterns(trainable), patterns(frozen) or []
    if keep is None and not drop:
        return None
    candidates = [(n, p) for n, p in named if p.requires_grad]
    for key, given in (("trainer.trainable", keep or []), ("trainer.frozen", drop)):
        for pattern in given:
            if not any(_matches(n, pattern) for n, _ in candidates):
                example = ", ".join(n for n, _ in candidates[:3])
                raise TrainingError(
                    f"{key}: pattern {pattern!r} matches none of the parameters {what} trains "
                    f"(names like {example})"
                )
    frozen_names = []
    for name, param in candidates:
        train = (keep is None or any(_matches(name, p) for p in keep)) and not any(_matches(name, p) for p in drop)
        if not train:
            param.requires_grad_(False)
            frozen_names.append(name)
    trained = sum(p.numel() for _, p in candidates if p.requires_grad)
    if trained == 0:
        raise TrainingError(
            f"trainer.trainable={keep} with trainer.frozen={drop} leaves nothing of {what} to train"
        )
    return Selection(trained, sum(p.numel() for _, p in candidates), frozen_names)


def print_selection(selection: Selection | None, trainer: Any) -> None:
    if selection is not None and trainer.is_main:
        print(selection.line(trainer.stage), file=sys.stderr)
