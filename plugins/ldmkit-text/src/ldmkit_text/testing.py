"""Fixtures for tests and benchmarks that need a CLIP text model offline: a tiny
``CLIPTextModel`` folder with a real byte-level BPE tokenizer (``vocab.json`` + ``merges.txt``
in CLIP's format) and random weights."""

from __future__ import annotations

import json
from pathlib import Path

import torch

__all__ = ["write_tiny_clip"]

# a few BPE merges so that common words become multi-character tokens, as in CLIP's vocab
MERGES = ("t h", "th e</w>", "a n", "i n", "e r", "o n", "r e", "e d</w>", "an d</w>", "in g</w>")


def _byte_chars() -> list[str]:
    """CLIP's (GPT-2's) printable stand-ins for the 256 bytes."""
    keep = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def write_tiny_clip(
    directory: str | Path,
    *,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    max_positions: int = 77,
    seed: int = 0,
    weights: bool = True,
    vocab_size: int | None = None,
    intermediate: int | None = None,
) -> Path:
    """Write a tiny CLIP text model folder (``config.json``, ``vocab.json``, ``merges.txt``,
    ``model.safetensors`` unless ``weights`` is False) and return its path.

    ``vocab_size`` (default: the tokenizer's ~520 tokens) and ``intermediate`` (default
    ``2 * hidden``) give the model full-size shapes (CLIP ViT-L/14's text model: hidden 768,
    12 layers, 12 heads, intermediate 3072, vocab_size 49408); the embedding rows past the
    tokenizer's vocabulary are never looked up."""
    from transformers import CLIPTextConfig, CLIPTextModel

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    chars = _byte_chars()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>"}  # fmt: skip
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_positions, **special}
        ),
        encoding="utf-8",
    )
    (directory / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(MERGES) + "\n", encoding="utf-8"
    )
    if vocab_size is not None and vocab_size < len(vocab):
        raise ValueError(f"vocab_size={vocab_size} is smaller than the tokenizer's {len(vocab)} tokens")
    config = CLIPTextConfig(
        vocab_size=vocab_size or len(vocab), hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=max_positions, projection_dim=hidden,
        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"],
    )  # fmt: skip
    torch.manual_seed(seed)
    model = CLIPTextModel(config)
    if weights:
        model.save_pretrained(directory, safe_serialization=True)
    else:
        config.save_pretrained(directory)
    return directory
