"""Class-label conditioning (the paper's class-conditional ImageNet LDM, Sec. 4.3)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldmkit.interfaces import Conditioner, ConditionValueError

ROLES = ("crossattn", "vector")


class ClassLabelConditioner(Conditioner):
    """tau(y) for an integer class label ``batch[input_key]``.

    * ``role="crossattn"``: a learned embedding per class as one token (B×1×embed_dim),
      attended to by cross-attention (CompVis ``ClassEmbedder``); the unconditional
      token is an extra learned row: the table has ``num_classes + 1`` rows, the null one
      at ``null_index`` (default the last, ``num_classes``; labels name table rows, so with
      ``null_index=0`` the real labels are 1..num_classes).
    * ``role="vector"``: a one-hot B×num_classes vector for a denoiser with a class
      embedding of its own (adm style, UNet ``num_classes``); unconditional is all zeros.

    ``class_names`` (optional, one per class in label order; ``experiment=folder_class`` reads
    them from the dataset's manifest) travel with the pipeline's config so that labels can be
    given by name (``ldmkit sample --labels sandal,bag``).
    """

    def __init__(
        self,
        *,
        num_classes: int = 10,
        embed_dim: int = 512,
        role: str = "crossattn",
        input_key: str = "label",
        null_index: int | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; expected one of {ROLES}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if null_index is not None and (role != "crossattn" or not 0 <= null_index <= num_classes):
            raise ValueError(
                f"null_index={null_index!r} must be in [0, {num_classes}] and needs role='crossattn' "
                "(a vector condition's null is all zeros)"
            )
        if class_names is not None:
            class_names = [str(name) for name in class_names]
            if len(class_names) != num_classes or len(set(class_names)) != num_classes:
                raise ValueError(
                    f"class_names must name each of the {num_classes} classes once; got "
                    f"{len(class_names)} names ({len(set(class_names))} different)"
                )
        self.class_names: list[str] | None = class_names
        self.num_classes, self.role, self.input_key = num_classes, role, input_key
        self.null_index = num_classes if null_index is None else int(null_index)
        self.input_keys = (input_key,)
        self.input_kinds = {input_key: "class"}
        # follows .to(device) so that one-hot vectors land where the model is
        self.register_buffer("_anchor", torch.zeros(0), persistent=False)
        if role == "crossattn":
            self.crossattn_dim = embed_dim
            self.embedding = nn.Embedding(num_classes + 1, embed_dim)
        else:
            self.vector_dim = num_classes

    def _labels(self, batch: Mapping[str, Any]) -> Tensor:
        raw = self.read(batch, self.input_key)
        try:
            given = torch.as_tensor(raw, device=self._device())
        except (TypeError, ValueError, RuntimeError):  # strings, ragged lists, objects
            shown = list(raw)[:8] if isinstance(raw, (list, tuple)) else raw
            raise ConditionValueError(f"class labels ({self.input_key!r}) must be whole numbers, got {shown!r}") from None
        if given.is_floating_point() and not torch.equal(given, given.round()):  # long() would truncate 1.5 to 1
            raise ValueError(f"class labels must be whole numbers, got {given.flatten()[:8].tolist()}")
        if given.dim() > 1 and given[0].numel() != 1:  # one label per sample: (B,) or a (B, 1) column
            raise ConditionValueError(
                f"class labels ({self.input_key!r}) are one per sample, a list or a 1-D tensor; got shape "
                f"{tuple(given.shape)}"
            )
        labels = given.to(dtype=torch.long)
        if self.null_index == self.num_classes:
            if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise ConditionValueError(
                    f"class labels must be in [0, {self.num_classes}) (conditioner.num_classes="
                    f"{self.num_classes}); got min {int(labels.min())}, max {int(labels.max())}" + _unlabelled(labels)
                )
        elif labels.numel() and (labels.min() < 0 or labels.max() > self.num_classes or (labels == self.null_index).any()):
            raise ConditionValueError(
                f"class labels must be in [0, {self.num_classes}] without the null class {self.null_index} "
                f"(conditioner.num_classes={self.num_classes}, null_index={self.null_index}); "
                f"got min {int(labels.min())}, max {int(labels.max())}" + _unlabelled(labels)
            )
        return labels.reshape(-1)

    def adapt_loaded_tensor(
        self, name: str, source: Tensor, own: Tensor, source_options: Mapping[str, Any] | None = None
    ) -> Tensor | None:
        """``trainer.init_from`` from a table of another class count (with
        ``trainer.init_strict=false``), another null row or other class names
        (:mod:`ldmkit.training.init_from`). Where both configs name their classes
        (``class_names``) and the names differ, a class keeps the row of its *name* in the source
        (a folder with one more class that sorts first shifts every label, not every name);
        otherwise a label keeps its row (a label names the same row in both). The source's null
        row moves to this table's null row, and each new class row is drawn from the normal
        distribution of the known class rows (their mean and covariance, as transformers'
        ``resize_token_embeddings(mean_resizing=True)`` does): a new class starts among the
        known ones rather than at the untrained scale of a fresh row. The source's null row is
        where its config (``source_options``) puts it; without one, where this table's is (row
        0 with ``null_index=0``, else the last)."""
        if name != "embedding.weight" or source.dim() != 2 or source.shape[1] != own.shape[1]:
            return None
        rows = source.shape[0]
        null = _null_row(source_options, rows)
        if null is None:
            if self.null_index not in (0, self.num_classes):
                return None
            null = 0 if self.null_index == 0 else rows - 1
        theirs = _source_names(source_options, rows)
        by_name = theirs is not None and self.class_names is not None and theirs != self.class_names
        if rows == own.shape[0] and null == self.null_index and not by_name:
            return None  # the same layout: loaded as it is
        own_rows = [r for r in range(own.shape[0]) if r != self.null_index]
        source_rows = [r for r in range(rows) if r != null]
        if by_name:  # class j of each table is its j-th row after the null one is left out
            row_of = dict(zip(theirs, source_rows, strict=True))
            pairs = [(own_rows[j], row_of[n]) for j, n in enumerate(self.class_names) if n in row_of]
        else:
            pairs = [(r, r) for r in range(min(rows, own.shape[0])) if r not in (null, self.null_index)]
        out = own.detach().clone()
        out[self.null_index] = source[null]
        if pairs:
            out[[d for d, _ in pairs]] = source[[s for _, s in pairs]]
        known = source[source_rows]
        taken = {d for d, _ in pairs}
        new = [r for r in own_rows if r not in taken]
        if new and len(known) >= 2:
            # mean + a random combination of the centred known rows: covariance = theirs
            centred = known.float() - known.float().mean(0)
            mix = torch.randn(len(new), len(known), dtype=torch.float32) / (len(known) - 1) ** 0.5
            out[new] = (known.float().mean(0) + mix @ centred).to(out.dtype)
        return out

    def init_from_note(self, source_options: Mapping[str, Any] | None) -> str | None:
        """The line ``trainer.init_from``'s report adds under this component: which classes
        kept the source's row of their name, which are new and which the source had alone,
        where both configs name their classes and the names differ."""
        if self.role != "crossattn" or self.class_names is None or not source_options:
            return None
        theirs = source_options.get("class_names")
        if theirs is None or [str(n) for n in theirs] == self.class_names:
            return None
        theirs = [str(n) for n in theirs]
        kept = [n for n in self.class_names if n in theirs]
        new = [n for n in self.class_names if n not in theirs]
        gone = [n for n in theirs if n not in self.class_names]
        moved = sum(theirs.index(n) != self.class_names.index(n) for n in kept)
        parts = [f"{len(kept)} kept ({', '.join(kept)})" if kept else "none kept"]
        if moved:
            parts.append(f"{moved} of them under another label")
        if new:
            parts.append(f"{len(new)} new ({', '.join(new)})")
        if gone:
            parts.append(f"{len(gone)} not in this run ({', '.join(gone)})")
        return "class rows matched by name (class_names differ from the source's): " + ", ".join(parts)

    def _device(self) -> torch.device:
        return self._anchor.device

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        labels = self._labels(batch)
        if self.role == "crossattn":
            return {"crossattn": self.embedding(labels)[:, None, :]}
        return {"vector": F.one_hot(labels, self.num_classes).to(self._anchor.dtype)}

    def unconditional(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        n = self._labels(batch).shape[0]
        if self.role == "crossattn":
            null = torch.full((n,), self.null_index, dtype=torch.long, device=self._device())
            return {"crossattn": self.embedding(null)[:, None, :]}
        return {"vector": torch.zeros(n, self.num_classes, device=self._device(), dtype=self._anchor.dtype)}


def _source_names(options: Mapping[str, Any] | None, rows: int) -> list[str] | None:
    """The ``class_names`` of a ``class_label`` config whose table has ``rows`` rows (None:
    it names none, or not one per class row)."""
    names = options.get("class_names") if options else None
    if names is None or len(names) != rows - 1:
        return None
    return [str(n) for n in names]


def _null_row(options: Mapping[str, Any] | None, rows: int) -> int | None:
    """The null row of a ``class_label`` table of ``rows`` rows configured by ``options``
    (None: not a crossattn ``class_label`` config, or one of another size)."""
    if not options or options.get("name") != "class_label" or options.get("role", "crossattn") != "crossattn":
        return None
    if options.get("num_classes") is not None and int(options["num_classes"]) + 1 != rows:
        return None
    index = rows - 1 if options.get("null_index") is None else int(options["null_index"])
    return index if 0 <= index < rows else None


def _unlabelled(labels: Tensor) -> str:
    """A note for labels holding -1, the data loader's label of a sample without one."""
    if not bool((labels == -1).any()):
        return ""
    return (
        "; -1 is the data's label for a sample without one (no .cls member): train on labelled data "
        "(docs/data.md) or with a conditioner that reads what the data has"
    )
