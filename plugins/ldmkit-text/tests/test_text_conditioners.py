"""``bert`` and ``frozen_text``: the Conditioner contract, null conditions, truncation, freezing."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from ldmkit.errors import LdmkitError
from ldmkit.interfaces import MissingConditionError
from ldmkit.testing import ConditionerConformance
from ldmkit_text import (
    BertConditioner,
    FrozenTextConditioner,
    ModelNotFoundError,
    PromptTypeError,
)

CAPTIONS = ["grinning face with smiling eyes", "red apple", "face with tears of joy", "snowman"]
LONG = "a very long caption " * 10


def tiny_bert(**kw) -> BertConditioner:
    torch.manual_seed(0)
    return BertConditioner(**{"n_embed": 32, "n_layer": 2, "max_seq_len": 12, "heads": 2, "dim_head": 16, **kw})


def frozen(**kw) -> FrozenTextConditioner:
    return FrozenTextConditioner(**{"max_length": 12, **kw})


def batch(n: int) -> dict:
    return {"caption": [CAPTIONS[i % len(CAPTIONS)] for i in range(n)]}


class TestBertConformance(ConditionerConformance):
    def make_conditioner(self):
        return tiny_bert()

    def make_batch(self, n):
        return batch(n)


class TestFrozenTextConformance(ConditionerConformance):
    def make_conditioner(self):
        return frozen()

    def make_batch(self, n):
        return batch(n)


class TestFrozenTextPooledConformance(TestFrozenTextConformance):
    def make_conditioner(self):
        return frozen(pooled=True)


# -- outputs ------------------------------------------------------------------------------


def test_bert_output_role_shape_and_kinds():
    c = tiny_bert(input_key="text")
    assert c.input_keys == ("text",) and c.input_kind("text") == "text"
    assert c.output_dims() == {"crossattn": 32}
    out = c({"text": CAPTIONS})
    assert set(out) == {"crossattn"} and out["crossattn"].shape == (4, 12, 32)


def test_frozen_output_roles_shapes_and_mean_pooling():
    c = frozen(pooled=True)
    assert c.output_dims() == {"crossattn": 384, "vector": 384}
    assert c.input_kinds == {"caption": "text"}
    out = c({"caption": ["red apple", "snowman"]})
    assert out["crossattn"].shape == (2, 12, 384) and out["vector"].shape == (2, 384)
    # "red apple" is [CLS] red apple [SEP]: the mean of its first 4 hidden states, pads excluded
    torch.testing.assert_close(out["vector"][0], out["crossattn"][0, :4].mean(0))
    assert frozen().output_dims() == {"crossattn": 384}


@pytest.mark.parametrize("make", [tiny_bert, lambda: frozen(pooled=True)], ids=["bert", "frozen_text"])
def test_null_condition_is_the_empty_prompt_and_differs_from_every_caption(make):
    c = make().eval()
    b = batch(4)
    with torch.no_grad():
        cond, null, empty = c(b), c.unconditional(b), c({"caption": [""]})
    for role in cond:
        assert null[role].shape == cond[role].shape
        for i in range(4):
            torch.testing.assert_close(null[role][i], empty[role][0])
            assert not torch.allclose(null[role][i], cond[role][i]), (role, b["caption"][i])


def test_condition_drops_to_the_null_prompt_at_drop_rate():
    c = tiny_bert().eval()
    c.drop_rate = 0.5
    b = batch(64)
    with torch.no_grad():
        out = c.condition(b, generator=torch.Generator().manual_seed(0))["crossattn"]
        null = c.unconditional(b)["crossattn"][0]
    dropped = sum(torch.equal(row, null) for row in out)
    assert 16 < dropped < 48


# -- prompts ------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [tiny_bert, frozen], ids=["bert", "frozen_text"])
def test_truncation_warns_once_per_instance_and_counts(make):
    c = make()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        c({"caption": [LONG, "red apple", LONG]})
        c({"caption": [LONG, "snowman"]})
        c({"caption": ["red apple"]})
    cut = [w for w in caught if "truncated" in str(w.message)]
    assert len(cut) == 1, [str(w.message) for w in caught]
    message = str(cut[0].message)
    assert "2 prompt(s) in this batch exceed 12 tokens" in message and "silently" in message
    assert c.truncated_prompts == 3
    with warnings.catch_warnings(record=True) as caught:  # a new instance warns again
        warnings.simplefilter("always")
        make()({"caption": [LONG]})
    assert len([w for w in caught if "truncated" in str(w.message)]) == 1


@pytest.mark.parametrize("make", [tiny_bert, frozen], ids=["bert", "frozen_text"])
def test_text_the_vocab_does_not_know_warns_once_quoting_it(make):
    """bert-base-uncased's vocab maps emoji to [UNK]: "🐸" and "🍎" would be one condition."""
    c = make().eval()
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        frog, apple = c({"caption": ["a 🐸 on a log", "a 🍎 on a log", "red apple"]})["crossattn"][:2]
        c({"caption": ["☃"]})
        c({"caption": ["snowman"]})
    unknown = [str(w.message) for w in caught if "does not know" in str(w.message)]
    assert len(unknown) == 1, [str(w.message) for w in caught]
    assert "2 prompt(s) in this batch" in unknown[0] and "('🐸', '🍎')" in unknown[0], unknown[0]
    assert c.unknown_prompts == 3
    torch.testing.assert_close(frog, apple)  # why it warns: the two prompts are one condition


def test_a_lone_string_or_missing_key_is_a_clear_error():
    c = tiny_bert()
    with pytest.raises(PromptTypeError, match=r"list of prompts, got str \(wrap a single prompt: \['red apple'\]\)"):
        c({"caption": "red apple"})
    with pytest.raises(PromptTypeError, match=r"must hold strings, found \['int'\]"):
        c({"caption": ["red apple", 3]})
    with pytest.raises(MissingConditionError, match="BertConditioner reads batch key 'caption'"):
        c({"label": [1]})
    assert c({"caption": ("red apple",)})["crossattn"].shape == (1, 12, 32)


# -- training -----------------------------------------------------------------------------


def train_steps(c: nn.Module, steps: int = 3) -> nn.Module:
    """AdamW over every trainable parameter, as the trainer does; a stand-in for the UNet's to_k."""
    torch.manual_seed(0)
    head = nn.Linear(c.crossattn_dim, 8)
    model = nn.ModuleDict({"conditioner": c, "head": head}).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        cond = c.condition(batch(4), generator=gen)
        loss = head(cond["crossattn"]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return head


def test_frozen_encoder_is_bit_identical_after_training_steps():
    c = frozen(pooled=True)
    c.drop_rate = 0.25
    before = {k: v.clone() for k, v in c.state_dict().items()}
    c.train()
    assert c.training and not c.encoder.training and not any(m.training for m in c.encoder.modules())
    assert not any(p.requires_grad for p in c.parameters())
    torch.manual_seed(0)
    head_before = nn.Linear(384, 8).weight.clone()
    head = train_steps(c)
    assert not torch.equal(head.weight, head_before), "the optimizer did not step"
    after = c.state_dict()
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, changed
    assert not c.encoder.training


def test_bert_trains_jointly():
    c = tiny_bert()
    c.drop_rate = 0.25
    before = {k: v.clone() for k, v in c.state_dict().items()}
    train_steps(c)
    after = c.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert {"transformer.token_emb.weight", "transformer.pos_emb.emb.weight", "transformer.norm.weight",
            "transformer.attn_layers.layers.0.1.to_q.weight"} <= changed
    # to_logits exists only for the paper's checkpoints: it gets no gradient, so it stays
    assert not {"transformer.to_logits.weight", "transformer.to_logits.bias"} & changed


@pytest.mark.parametrize("use_tokenizer", [True, False])
def test_every_trainable_bert_parameter_gets_a_gradient(use_tokenizer):
    """DistributedDataParallel (find_unused_parameters=false, the trainer's default) fails at
    the second step on a trainable parameter that no output depends on (to_logits was one)."""
    c = tiny_bert() if use_tokenizer else tiny_bert(use_tokenizer=False, vocab_size=10)
    inputs = batch(2) if use_tokenizer else {"caption": torch.tensor([[1, 2, 3], [4, 5, 6]])}
    c(inputs)["crossattn"].sum().backward()
    unused = [name for name, p in c.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, unused
    assert "transformer.to_logits.weight" in c.state_dict()  # still saved, for the paper's checkpoints


# -- loading ------------------------------------------------------------------------------


def test_missing_model_folder_names_the_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotFoundError, match=f"text encoder folder '{missing}' does not exist") as err:
        FrozenTextConditioner(name_or_path=str(missing))
    assert isinstance(err.value, LdmkitError) and isinstance(err.value, FileNotFoundError)


def test_unreadable_model_folder_names_the_path(tmp_path):
    with pytest.raises(ModelNotFoundError, match=f"cannot load the text encoder in '{tmp_path}'"):
        FrozenTextConditioner(name_or_path=tmp_path)


def test_max_length_beyond_the_models_positions_is_refused():
    with pytest.raises(ValueError, match=r"max_length must be an int in \[2, 512\]"):
        frozen(max_length=1000)
