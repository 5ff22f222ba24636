"""What the text conditioners share: reading prompts from a batch, counting cut ones and
ones with text the vocabulary does not know."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from ldmkit.errors import LdmkitError
from ldmkit.interfaces import Conditioner

__all__ = ["PromptEncoder", "PromptTypeError", "TextConditioner"]


class PromptTypeError(LdmkitError, TypeError):
    """A text conditioner's batch key does not hold a list of strings."""


class TextConditioner(Conditioner):
    """A conditioner of one text key: ``batch[input_key]`` is a list of B prompts.

    ``truncated_prompts`` counts the prompts cut to the token limit over this instance's
    life; the first batch with cut prompts warns once, later ones are cut silently.
    ``unknown_prompts`` counts the prompts with text the tokenizer maps to its unknown token
    (emoji and most symbols in the bert-base-uncased vocab), with one warning the same way.
    """

    def __init__(self, *, input_key: str = "caption") -> None:
        super().__init__()
        self.input_key = input_key
        self.input_keys = (input_key,)
        self.input_kinds = {input_key: "text"}
        self.truncated_prompts = 0
        self.unknown_prompts = 0
        self._warned = False
        self._warned_unknown = False

    def prompts(self, batch: Mapping[str, Any]) -> list[str]:
        """``batch[input_key]`` as a list of strings (a lone string is an error: B would be ambiguous)."""
        value = self.read(batch, self.input_key)
        if isinstance(value, str | bytes) or not hasattr(value, "__iter__"):
            raise PromptTypeError(
                f"conditioner {type(self).__name__} reads batch[{self.input_key!r}] as a list of "
                f"prompts, got {type(value).__name__} (wrap a single prompt: [{value!r}])"
            )
        prompts = list(value)
        bad = [type(p).__name__ for p in prompts if not isinstance(p, str)]
        if bad:
            raise PromptTypeError(
                f"conditioner {type(self).__name__}: batch[{self.input_key!r}] must hold strings, "
                f"found {sorted(set(bad))}"
            )
        return prompts

    def note_truncated(self, count: int, limit: int) -> None:
        """Record ``count`` prompts cut to ``limit`` tokens; warn the first time only."""
        if count <= 0:
            return
        self.truncated_prompts += count
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"{type(self).__name__}: {count} prompt(s) in this batch exceed {limit} tokens and "
                f"were truncated; further long prompts are truncated silently (the count is kept "
                f"in .truncated_prompts)",
                UserWarning,
                stacklevel=3,
            )

    def note_unknown(
        self, prompts: Sequence[str], ids: Sequence[Sequence[int]], offsets: Sequence[Sequence[tuple[int, int]]], unk_id: int | None
    ) -> None:
        """Record the prompts whose tokens (``ids``, with character ``offsets`` into each
        prompt) hold ``unk_id``; warn the first time only, quoting the unknown text."""
        if unk_id is None:
            return
        count = sum(unk_id in row for row in ids)
        if count <= 0:
            return
        self.unknown_prompts += count
        if not self._warned_unknown:
            self._warned_unknown = True
            unknown = [
                prompt[start:end] for prompt, row, spans in zip(prompts, ids, offsets, strict=True)
                for token, (start, end) in zip(row, spans, strict=True) if token == unk_id
            ]  # fmt: skip
            shown = ", ".join(repr(t) for t in dict.fromkeys(unknown[:8]))
            warnings.warn(
                f"{type(self).__name__}: {count} prompt(s) in this batch hold text its vocabulary does not "
                f"know ({shown}), encoded as the unknown token, so prompts that differ only in such text get the "
                f"same condition; further ones are encoded silently (the count is kept in .unknown_prompts)",
                UserWarning,
                stacklevel=3,
            )


class PromptEncoder(TextConditioner):
    """A text conditioner whose ``encode(prompts)`` gives its condition dict: the batch's
    prompts are encoded, and the unconditional input is the empty prompt's encoding, computed
    once per call and repeated for the batch (``frozen_text``, ``clip_text``)."""

    def encode(self, prompts: list[str]) -> dict[str, Tensor]:
        raise NotImplementedError(f"{type(self).__name__} must implement encode(prompts)")

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        return self.encode(self.prompts(batch))

    def unconditional(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        n = len(self.prompts(batch))
        return {role: v.repeat(n, *([1] * (v.ndim - 1))) for role, v in self.encode([""]).items()}
