"""ldmkit.testing.ConditionerConformance must fail broken conditioners, not only pass good
ones: one that ignores its input, one whose null condition equals the real one, one whose
dropout substitutes something else, one that hides a missing key."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ldmkit.interfaces import Conditioner
from ldmkit.testing import ConditionerConformance


class Tokens(Conditioner):
    input_keys = ("label",)

    def __init__(self):
        super().__init__()
        self.crossattn_dim = 4
        self.embedding = nn.Embedding(6, 4)

    def forward(self, batch):
        return {"crossattn": self.embedding(torch.as_tensor(self.read(batch, "label")))[:, None]}

    def unconditional(self, batch):
        return {"crossattn": self.embedding(torch.full((len(batch["label"]),), 5))[:, None]}


class Blind(Tokens):
    def forward(self, batch):
        return {"crossattn": self.embedding(torch.zeros(len(batch["label"]), dtype=torch.long))[:, None]}


class NullIsReal(Tokens):
    def unconditional(self, batch):
        return self.forward(batch)


class WrongDropout(Tokens):
    def condition(self, batch, *, generator=None):
        out = self.forward(batch)
        return {"crossattn": out["crossattn"] * (1 - self.drop_rate)}


class HidesMissingKey(Tokens):
    def forward(self, batch):
        labels = torch.as_tensor(batch.get("label", [0, 0, 0]))
        return {"crossattn": self.embedding(labels)[:, None]}


def run_conformance(conditioner_cls, test_name):
    class Case(ConditionerConformance):
        def make_conditioner(self):
            return conditioner_cls()

        def make_batch(self, n):
            return {"label": torch.arange(n) % 5}

    getattr(Case(), test_name)()


def test_a_correct_conditioner_passes_every_check():
    for name in dir(ConditionerConformance):
        if name.startswith("test_"):
            run_conformance(Tokens, name)


@pytest.mark.parametrize(("broken", "check"), [
    (Blind, "test_output_depends_on_the_input"),
    (NullIsReal, "test_null_condition_differs_from_every_real_one"),
    (WrongDropout, "test_dropout_substitutes_exactly_the_null_condition_per_sample"),
    (HidesMissingKey, "test_missing_key_names_the_conditioner_and_the_key"),
])
def test_broken_conditioners_fail(broken, check):
    with pytest.raises((AssertionError, pytest.fail.Exception)):
        run_conformance(broken, check)
