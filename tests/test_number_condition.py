"""The ``number`` input kind: one float per sample, from ``--cond key=...`` and the demo."""

from __future__ import annotations

import pytest
import torch

from ldmkit.sample_io.conditions import ConditionArgumentError, parse_conditions


def test_numbers_parse_to_one_float_per_sample():
    batch = parse_conditions(["brightness=0.25, -1", "brightness=3"], {"brightness": "number"}, image_channels=3)
    assert batch["brightness"].dtype == torch.float32
    assert batch["brightness"].tolist() == [0.25, -1.0, 3.0]


@pytest.mark.parametrize("value", ["bright", "", "nan", "1,inf"])
def test_a_value_that_is_not_a_finite_number_is_one_line(value):
    with pytest.raises(ConditionArgumentError, match=rf"^--cond brightness={value}: expected comma-separated finite numbers$"):
        parse_conditions([f"brightness={value}"], {"brightness": "number"}, image_channels=3)


def test_the_demo_asks_for_a_number():
    from types import SimpleNamespace

    from torch import nn

    from ldmkit.demo.form import condition_fields
    from ldmkit.interfaces import Conditioner

    class Brightness(Conditioner):
        input_keys = ("brightness",)
        input_kinds = {"brightness": "number"}
        crossattn_dim = 4

        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(1, 4)

        def forward(self, batch):
            return {"crossattn": self.proj(self.read(batch, "brightness").reshape(-1, 1))[:, None]}

        def unconditional(self, batch):
            return {"crossattn": torch.zeros(len(self.read(batch, "brightness")), 1, 4)}

    (field,) = condition_fields(SimpleNamespace(conditioner=Brightness(), config=None))
    assert (field.key, field.kind, field.label) == ("brightness", "number", "brightness (a number)")


def test_numbers_are_recorded_and_drawn_as_written():
    """The float32 batch once came back as 0.8999999761581421 in the samples' JSON and on
    their ``--show-conditions`` tile, which a 16-pixel tile cut to "0.89"."""
    from types import SimpleNamespace

    from ldmkit.sample_io.samples import condition_settings
    from ldmkit.visualize import condition_tiles, text_tiles

    batch = parse_conditions(["brightness=0.9,-0.1"], {"brightness": "number"}, image_channels=3)
    assert condition_settings(batch, {"brightness": "number"}, {}) == {"brightness": [0.9, -0.1]}
    conditioner = SimpleNamespace(input_keys=("brightness",), input_kind=lambda key: "number")
    (tiles,) = condition_tiles(conditioner, batch, (32, 32))
    assert torch.equal(tiles, text_tiles(["0.9", "-0.1"], 32))
