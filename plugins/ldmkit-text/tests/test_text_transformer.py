"""``bert``'s transformer against the paper's ``TransformerWrapper`` (fixtures from make_reference.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from ldmkit_text import BertConditioner, TextTransformer

FIXTURES = Path(__file__).parent / "fixtures"
LAYOUT = json.loads((FIXTURES / "paper_key_layout.json").read_text())


def build(cfg: dict) -> TextTransformer:
    return TextTransformer(
        cfg["num_tokens"], cfg["max_seq_len"], cfg["dim"], cfg["depth"],
        heads=cfg["heads"], dim_head=cfg["dim_head"],
    )


def layout(module: torch.nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in module.state_dict().items()}


def test_tiny_keys_and_shapes_equal_the_papers():
    assert layout(build(LAYOUT["tiny"]["config"])) == LAYOUT["tiny"]["shapes"]


def test_paper_size_keys_and_shapes_equal_the_papers():
    cfg = LAYOUT["paper"]["config"]
    assert (cfg["dim"], cfg["depth"], cfg["max_seq_len"], cfg["num_tokens"]) == (1280, 32, 77, 30522)
    with torch.device("meta"):
        ours = build(cfg)
    assert layout(ours) == LAYOUT["paper"]["shapes"]


def test_paper_size_conditioner_keys_read_like_cond_stage_model():
    """``cond_stage_model.transformer.*`` of the paper's checkpoint maps onto ``transformer.*``."""
    with torch.device("meta"):
        c = BertConditioner(n_embed=1280, n_layer=32, max_seq_len=77)
    expected = {f"transformer.{k}": v for k, v in LAYOUT["paper"]["shapes"].items()}
    assert layout(c) == expected
    assert c.crossattn_dim == 1280


def test_paper_weights_give_the_papers_embeddings():
    with safe_open(FIXTURES / "paper_tiny_reference.safetensors", framework="pt") as f:
        cfg = json.loads(f.metadata()["config"])
        state = {k[len("state."):]: f.get_tensor(k) for k in f.keys() if k.startswith("state.")}
        tokens, expected = f.get_tensor("tokens"), f.get_tensor("embeddings")
    assert cfg == LAYOUT["tiny"]["config"]
    ours = build(cfg).eval()
    ours.load_state_dict(state, strict=True)
    with torch.no_grad():
        out = ours(tokens)
    assert out.shape == (3, cfg["max_seq_len"], cfg["dim"])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_the_attention_kernel_does_not_change_the_result():
    from ldmkit.nn.attention import attention_backend

    torch.manual_seed(0)
    t = build(LAYOUT["tiny"]["config"]).eval()
    tokens = torch.randint(0, 100, (2, 12))
    with torch.no_grad(), attention_backend("math"):
        ref = t(tokens)
    with torch.no_grad(), attention_backend("sdpa"):
        torch.testing.assert_close(t(tokens), ref, atol=1e-5, rtol=0)


def test_bad_sizes_are_named():
    with pytest.raises(ValueError, match="depth must be a positive int, got 0"):
        TextTransformer(10, 4, 8, 0)
    t = TextTransformer(10, 4, 8, 1, heads=2, dim_head=4)
    with pytest.raises(ValueError, match=r"n <= 4, got shape \(1, 5\)"):
        t(torch.zeros(1, 5, dtype=torch.long))


def test_token_input_bert_gives_the_papers_embeddings_and_checks_its_ids():
    """``use_tokenizer=false`` (the paper's layout2img ``BERTEmbedder``): the batch holds token
    ids, fed as they are; with the paper's weights, the paper's embeddings. The null condition
    is a sequence of ``null_token`` (default: the last id, the layout builder's padding)."""
    from ldmkit_text.bert import TokenInputError

    with safe_open(FIXTURES / "paper_tiny_reference.safetensors", framework="pt") as f:
        cfg = json.loads(f.metadata()["config"])
        state = {k[len("state."):]: f.get_tensor(k) for k in f.keys() if k.startswith("state.")}
        tokens, expected = f.get_tensor("tokens"), f.get_tensor("embeddings")
    c = BertConditioner(n_embed=cfg["dim"], n_layer=cfg["depth"], max_seq_len=cfg["max_seq_len"],
                        heads=cfg["heads"], dim_head=cfg["dim_head"], use_tokenizer=False,
                        vocab_size=cfg["num_tokens"], input_key="coordinates_bbox").eval()  # fmt: skip
    c.transformer.load_state_dict(state, strict=True)
    assert c.input_kinds == {"coordinates_bbox": "tokens"}
    with torch.no_grad():
        out = c({"coordinates_bbox": tokens})["crossattn"]
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        # B lists of ids work as well as a tensor
        torch.testing.assert_close(c({"coordinates_bbox": tokens.tolist()})["crossattn"], out)
        null = c.unconditional({"coordinates_bbox": tokens})["crossattn"]
        filled = torch.full_like(tokens, cfg["num_tokens"] - 1)
        torch.testing.assert_close(null, c.transformer(filled))
    assert not torch.allclose(null, out)
    with pytest.raises(TokenInputError, match=rf"token id {cfg['num_tokens']}, outside \[0, {cfg['num_tokens']}\)"):
        c({"coordinates_bbox": torch.full_like(tokens, cfg["num_tokens"])})
    with pytest.raises(TokenInputError, match="more than max_seq_len"):
        c({"coordinates_bbox": torch.zeros(1, cfg["max_seq_len"] + 1, dtype=torch.long)})
    with pytest.raises(TokenInputError, match="integer tensor"):
        c({"coordinates_bbox": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="needs vocab_size"):
        BertConditioner(use_tokenizer=False)
    with pytest.raises(ValueError, match="apply to use_tokenizer=false"):
        BertConditioner(vocab_size=100)
