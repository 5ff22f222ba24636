"""The text encoders: the paper's ``bert`` as diffusers' ``LDMBertModel`` (run by
``LDMTextToImagePipeline``) with a WordPiece ``vocab.txt``, CLIP text weights in the names of
the installed transformers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from ldmkit.interop.diffusers.common import WHOLE, _require, _value


def bert_maps_to_diffusers(conditioner: dict[str, Any]) -> bool:
    """Whether a ``bert`` conditioner config is what ``LDMTextToImagePipeline`` runs: prompts
    through a WordPiece ``vocab.txt``, 77 tokens (the pipeline's fixed length)."""
    vocab = conditioner.get("vocab")
    return (
        conditioner.get("name") == "bert"
        and conditioner.get("use_tokenizer", True)
        and int(conditioner.get("max_seq_len", 77)) == 77
        and (vocab is None or not str(vocab).endswith(".json"))
    )


def _bert_names(depth: int) -> dict[str, str]:
    """ldmkit ``TextTransformer`` name -> ``LDMBertModel`` name (one-to-one, same shapes)."""
    names = {"token_emb.weight": "model.embed_tokens.weight", "pos_emb.emb.weight": "model.embed_positions.weight",
             "norm.weight": "model.layer_norm.weight", "norm.bias": "model.layer_norm.bias",
             "to_logits.weight": "to_logits.weight", "to_logits.bias": "to_logits.bias"}  # fmt: skip
    for i in range(depth):
        attn, ff, d = f"attn_layers.layers.{2 * i}.", f"attn_layers.layers.{2 * i + 1}.", f"model.layers.{i}."
        for p in ("weight", "bias"):
            names[f"{attn}0.{p}"] = f"{d}self_attn_layer_norm.{p}"
            names[f"{attn}1.to_out.{p}"] = f"{d}self_attn.out_proj.{p}"
            names[f"{ff}0.{p}"] = f"{d}final_layer_norm.{p}"
            names[f"{ff}1.net.0.0.{p}"] = f"{d}fc1.{p}"
            names[f"{ff}1.net.2.{p}"] = f"{d}fc2.{p}"
        for q in "qkv":
            names[f"{attn}1.to_{q}.weight"] = f"{d}self_attn.{q}_proj.weight"
    return names


def _bert_config(conditioner: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    n_embed = int(conditioner["n_embed"])
    return {"architectures": ["LDMBertModel"], "model_type": "ldmbert", "vocab_size": vocab_size,
            "max_position_embeddings": int(conditioner.get("max_seq_len", 77)),
            "encoder_layers": int(conditioner["n_layer"]), "encoder_ffn_dim": 4 * n_embed,
            "encoder_attention_heads": int(conditioner.get("heads", 8)), "head_dim": int(conditioner.get("dim_head", 64)),
            "d_model": n_embed, "activation_function": "gelu", "dropout": 0.0, "attention_dropout": 0.0,
            "activation_dropout": 0.0, "scale_embedding": False, "pad_token_id": 0}  # fmt: skip


def _bert_from_config(c: dict[str, Any], where: str) -> dict[str, Any]:
    d_model = _value(c, "d_model", WHOLE, where, 1280)
    _require(_value(c, "encoder_ffn_dim", WHOLE, where, 5120) == 4 * d_model,
             f"{where}: encoder_ffn_dim={c.get('encoder_ffn_dim')} (ldmkit's bert has 4 x d_model)")  # fmt: skip
    _require(c.get("activation_function", "gelu") == "gelu" and not c.get("scale_embedding", False),
             f"{where}: activation_function={c.get('activation_function')!r}, scale_embedding={c.get('scale_embedding')} "
             "(ldmkit's bert: gelu, unscaled embeddings)")  # fmt: skip
    return {"name": "bert", "n_embed": d_model, "n_layer": _value(c, "encoder_layers", WHOLE, where, 32),
            "max_seq_len": _value(c, "max_position_embeddings", WHOLE, where, 77),
            "heads": _value(c, "encoder_attention_heads", WHOLE, where, 8),
            "dim_head": _value(c, "head_dim", WHOLE, where, 64)}  # fmt: skip


def _fit_text_encoder(state: dict[str, Tensor], own: dict[str, Tensor]) -> dict[str, Tensor]:
    """CLIP text weights saved by one transformers version (``text_model.*`` or not, with or
    without the ``position_ids`` buffer) in the names of the installed one."""
    prefix = "conditioner.transformer."
    if not any(k.startswith(prefix) for k in own):
        return state
    wants_inner = any(k.startswith(prefix + "text_model.") for k in own)
    out: dict[str, Tensor] = {}
    for name, value in state.items():
        if name.startswith(prefix):
            rest = name[len(prefix) :]
            if rest.startswith("text_model.") and not wants_inner:
                rest = rest[len("text_model.") :]
            elif wants_inner and not rest.startswith("text_model."):
                rest = "text_model." + rest
            name = prefix + rest
            if name not in own and name.endswith("position_ids"):
                continue
        out[name] = value
    return out


def _bert_vocab(tokenizer_dir: Path, default: bool) -> str | None:
    """The ``vocab`` of a ``bert`` read from diffusers: None (ldmkit's default, bert-base-uncased)
    when ``ldmkit.json`` says the pipeline was written with it, else ``tokenizer/vocab.txt``."""
    vocab = tokenizer_dir / "vocab.txt"
    _require(vocab.is_file(), f"{tokenizer_dir}: no vocab.txt (the WordPiece vocabulary of the bert text model)")
    return None if default else str(vocab.resolve())

