import pytest
import torch

from ldmkit.testing import ConditionerConformance
from ldmkit_conditioners import ClassLabelConditioner, NullConditioner


class TestClassLabelCrossAttention(ConditionerConformance):
    def make_conditioner(self):
        return ClassLabelConditioner(num_classes=5, embed_dim=16)

    def make_batch(self, n):
        return {"label": torch.arange(n) % 5}


class TestClassLabelVector(ConditionerConformance):
    def make_conditioner(self):
        return ClassLabelConditioner(num_classes=5, role="vector")

    def make_batch(self, n):
        return {"label": [i % 5 for i in range(n)]}


class TestNull(ConditionerConformance):
    def make_conditioner(self):
        return NullConditioner()

    def make_batch(self, n):
        return {}


def test_class_embedding_is_a_lookup_and_null_token_differs():
    c = ClassLabelConditioner(num_classes=3, embed_dim=4)
    out = c({"label": [2, 0]})["crossattn"]
    torch.testing.assert_close(out[:, 0], c.embedding.weight[[2, 0]])
    null = c.unconditional({"label": [2, 0]})["crossattn"]
    torch.testing.assert_close(null[:, 0], c.embedding.weight[[3, 3]])


def test_vector_role_is_one_hot_and_null_is_zero():
    c = ClassLabelConditioner(num_classes=4, role="vector")
    assert c({"label": [1, 3]})["vector"].tolist() == [[0, 1, 0, 0], [0, 0, 0, 1]]
    assert c.unconditional({"label": [1, 3]})["vector"].abs().sum() == 0


def test_bad_labels_and_options_are_named():
    c = ClassLabelConditioner(num_classes=3, embed_dim=4)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\) \(conditioner\.num_classes=3\); got min 0, max 3"):
        c({"label": [0, 3]})
    with pytest.raises(ValueError, match=r"class labels must be whole numbers, got \[1.5\]"):
        c({"label": torch.tensor([1.5])})  # was label 1, silently
    assert torch.equal(c({"label": torch.tensor([2.0])})["crossattn"], c({"label": [2]})["crossattn"])
    with pytest.raises(ValueError, match=r"class labels \('label'\) must be whole numbers, got \['cat'\]"):
        c({"label": ["cat"]})  # was torch's "too many dimensions 'str'"
    with pytest.raises(ValueError, match=r"class labels \('label'\) are one per sample.*got shape \(1, 2\)"):
        c({"label": torch.tensor([[1, 2]])})  # was two labels for one sample, failing later in the UNet
    assert torch.equal(c({"label": torch.tensor([[1], [2]])})["crossattn"], c({"label": [1, 2]})["crossattn"])
    with pytest.raises(KeyError, match=r"ClassLabelConditioner reads batch key 'label'.*\['caption'\]"):
        c({"caption": ["a"]})
    with pytest.raises(ValueError, match="unknown role 'concat'"):
        ClassLabelConditioner(role="concat")
