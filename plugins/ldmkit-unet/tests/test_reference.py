"""The UNet is the CompVis UNetModel: same state_dict layout, same function.

The expectations in fixtures/compvis_reference.json come from an independent second
implementation (diffusers' UNet2DConditionModel, loaded through diffusers' converter of
CompVis checkpoints); see make_reference.py for how they were produced.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from ldmkit_unet import UNetModel

HERE = Path(__file__).parent
FIXTURE = json.loads((HERE / "fixtures" / "compvis_reference.json").read_text())


def _load_reference_helpers():
    spec = importlib.util.spec_from_file_location("ldmkit_unet_make_reference", HERE / "make_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


helpers = _load_reference_helpers()


@pytest.mark.parametrize("name", sorted(FIXTURE["cases"]))
def test_state_dict_layout_is_compvis(name):
    case = FIXTURE["cases"][name]
    model = UNetModel(**case["params"])
    ours = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert ours == [tuple(pair) for pair in case["key_shapes"]]


@pytest.mark.parametrize("name", sorted(FIXTURE["cases"]))
def test_output_equals_reference_implementation(name):
    case = FIXTURE["cases"][name]
    model = UNetModel(**case["params"]).eval()
    weights = helpers.deterministic_weights([tuple(p) for p in case["key_shapes"]])
    model.load_state_dict(weights, strict=True)
    x, t, cond = helpers.deterministic_inputs(case)
    expected = torch.tensor(case["expected_output"]).reshape(case["expected_shape"])
    with torch.no_grad():
        out = model(x, t, cond)
    # float32 through ~30 layers; the outputs are O(1)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-5)


def test_paper_config_matches_reference_layout():
    """unet.yaml's architecture has the reference model's exact keys and 872.3M parameters."""
    paper = FIXTURE["paper_txt2img"]
    with torch.device("meta"):
        model = UNetModel(**paper["params"])
    ours = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert ours == [tuple(pair) for pair in paper["key_shapes"]]
    assert sum(p.numel() for p in model.parameters()) == paper["parameter_count"] == 872_300_484


def test_paper_config_file_is_the_reference_case():
    import yaml

    conf = HERE.parent / "src" / "ldmkit_unet" / "conf" / "denoiser" / "unet.yaml"
    config = yaml.safe_load(conf.read_text())
    for key, value in FIXTURE["paper_txt2img"]["params"].items():
        if config[key] != "auto":
            assert config[key] == value, key
