"""The "complete minimal plugin" in each interface's docstring is complete: it runs as
written and passes that interface's conformance mixin from ``ldmkit.testing`` (a newcomer
copies it first)."""

from __future__ import annotations

import textwrap

import pytest
import torch

from ldmkit.interfaces import conditioner, denoiser, first_stage
from ldmkit.testing import ConditionerConformance, DenoiserConformance, FirstStageConformance


def example(module) -> dict:
    """The names the docstring's ``::`` block defines, executed as written."""
    block = module.__doc__.split("::\n", 1)[1]
    lines = []
    for line in block.splitlines():
        if line.strip() and not line.startswith("    "):
            break  # the prose after the block
        lines.append(line)
    namespace: dict = {}
    exec(compile(textwrap.dedent("\n".join(lines)), f"{module.__name__} docstring", "exec"), namespace)
    return namespace


CONDITIONER, DENOISER, FIRST_STAGE = example(conditioner), example(denoiser), example(first_stage)


class TestConditionerExample(ConditionerConformance):
    def make_conditioner(self):
        return CONDITIONER["ClassTokens"](num_classes=4, embed_dim=8)

    def make_batch(self, n):
        return {"label": torch.arange(n) % 4}


class TestDenoiserExample(DenoiserConformance):
    def make_denoiser(self):
        return DENOISER["ConvDenoiser"](in_channels=4, out_channels=4)


class TestFirstStageExample(FirstStageConformance):
    deterministic_encode = True

    def make_first_stage(self):
        return FIRST_STAGE["Pool2"](latent_channels=3)


def test_each_example_registers_its_plugin():
    registered = {}
    for namespace, hook in ((CONDITIONER, "ldmkit_register_conditioners"),
                            (DENOISER, "ldmkit_register_denoisers"),
                            (FIRST_STAGE, "ldmkit_register_first_stages")):  # fmt: skip
        namespace[hook](register=lambda name, cls: registered.__setitem__(name, cls))
    assert registered == {"class_tokens": CONDITIONER["ClassTokens"], "conv": DENOISER["ConvDenoiser"],
                          "pool2": FIRST_STAGE["Pool2"]}  # fmt: skip


def test_the_conditioner_example_refuses_a_label_out_of_range_in_one_line():
    """A newcomer's copy once failed ``ldmkit sample --labels 12`` with a traceback ending in
    ``IndexError: index out of range in self``: the example checks its labels and raises the
    core's ``ConditionValueError`` (an ``LdmkitError``: the CLI prints it in one line), the
    error ldmkit's own conditioners raise."""
    from ldmkit.errors import LdmkitError
    from ldmkit.interfaces import ConditionValueError

    c = CONDITIONER["ClassTokens"](num_classes=4, embed_dim=8)
    with pytest.raises(ConditionValueError, match=r"labels must be in \[0, 4\).*got \[1, 12\]"):
        c({"label": torch.tensor([1, 12])})
    assert issubclass(ConditionValueError, LdmkitError) and issubclass(ConditionValueError, ValueError)
    class_label = pytest.importorskip("ldmkit_conditioners.class_label")
    with pytest.raises(ConditionValueError):  # ldmkit's own class labels raise the same error
        class_label.ClassLabelConditioner(num_classes=4)({"label": torch.tensor([12])})
