"""Writes fixtures/compvis_reference.json: what the reference implementation computes.

The reference is a second, independent implementation of the CompVis UNet: diffusers'
``UNet2DConditionModel``, configured from CompVis-style hyperparameters and loaded with
diffusers' own converter of CompVis (``ldm``) UNet checkpoints. For each case we record

* the CompVis state_dict key -> shape table: every one of our keys must be consumed by
  diffusers' converter and the result must load *strictly* into the diffusers model,
  so the table is the CompVis layout, checked by code we did not write;
* the diffusers output for deterministic weights and inputs (``deterministic_weights``,
  ``deterministic_inputs``; NumPy's legacy ``RandomState`` stream is frozen by NumPy's
  compatibility policy, so the tests regenerate the same numbers without diffusers).

Run it (needs ``pip install diffusers``) only when the cases change:

    .venv/bin/python plugins/ldmkit-unet/tests/make_reference.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).parent
FIXTURE = HERE / "fixtures" / "compvis_reference.json"

# hyperparameters in CompVis UNetModel spelling; `batch` describes the test input
CASES: dict[str, dict[str, Any]] = {
    # the unet_tiny config, cross-attending to 5 tokens of width 24
    "tiny_crossattn": {
        "params": dict(
            in_channels=4, out_channels=4, model_channels=32, channel_mult=[1, 2],
            num_res_blocks=1, attention_resolutions=[2], num_heads=-1, num_head_channels=16,
            transformer_depth=1, context_dim=24,
        ),
        "batch": dict(size=2, height=8, width=8, tokens=5, timesteps=[3, 715]),
    },
    # three levels with attention at ds 1 and 4 only, two heads (num_heads), two
    # transformer blocks, FiLM (scale-shift) ResBlocks, classes, concat channels
    "class_scale_shift": {
        "params": dict(
            in_channels=6, out_channels=4, model_channels=32, channel_mult=[1, 1, 2],
            num_res_blocks=1, attention_resolutions=[1, 4], num_heads=2, num_head_channels=-1,
            transformer_depth=2, context_dim=16, use_scale_shift_norm=True, num_classes=5,
        ),
        "batch": dict(size=2, height=8, width=8, tokens=3, timesteps=[999, 0], labels=[1, 4]),
    },
}

# the unet.yaml config (the paper's txt2img KL-f8 UNet) with a 1280-d text encoder:
# key/shape table only, built on the meta device
PAPER_CASE = dict(
    in_channels=4, out_channels=4, model_channels=320, channel_mult=[1, 2, 4, 4],
    num_res_blocks=2, attention_resolutions=[4, 2, 1], num_heads=8, num_head_channels=-1,
    transformer_depth=1, context_dim=1280,
)


def deterministic_weights(key_shapes: list[tuple[str, list[int]]]) -> dict[str, torch.Tensor]:
    """Seeded N(0, 1) numbers per key, scaled like a sane initialisation.

    Norm weights ~ 1 + 0.1 n, biases ~ 0.1 n, matrices ~ n / sqrt(fan_in), embeddings ~ n.
    """
    weights = {}
    for index, (key, shape) in enumerate(sorted(key_shapes)):
        noise = np.random.RandomState(index).standard_normal(shape)
        if len(shape) == 1:
            value = 0.1 * noise + (1.0 if key.endswith(".weight") else 0.0)
        elif key == "label_emb.weight":
            value = noise
        else:
            value = noise / np.sqrt(np.prod(shape[1:]))
        weights[key] = torch.from_numpy(np.asarray(value, dtype=np.float32))
    return weights


def deterministic_inputs(case: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(x, t, cond) of a case; cond in ldmkit's roles (crossattn / vector one-hot)."""
    params, batch = case["params"], case["batch"]
    shape = (batch["size"], params["in_channels"], batch["height"], batch["width"])
    x = torch.from_numpy(np.random.RandomState(1000).standard_normal(shape).astype(np.float32))
    t = torch.tensor(batch["timesteps"])
    tokens = (batch["size"], batch["tokens"], params["context_dim"])
    context = np.random.RandomState(1001).standard_normal(tokens).astype(np.float32)
    cond = {"crossattn": torch.from_numpy(context)}
    if "labels" in batch:
        labels = torch.tensor(batch["labels"])
        cond["vector"] = torch.nn.functional.one_hot(labels, params["num_classes"]).float()
    return x, t, cond


def ours(params: dict[str, Any]):
    from ldmkit_unet import UNetModel

    return UNetModel(**params)


def main() -> None:
    sys.path.insert(0, str(HERE.parents[2] / "benchmarks"))
    from unet_train_step import diffusers_forward, reference_diffusers_unet

    torch.set_grad_enabled(False)
    fixture: dict[str, Any] = {"cases": {}}
    for name, case in CASES.items():
        model = ours(case["params"])
        key_shapes = [(k, list(v.shape)) for k, v in model.state_dict().items()]
        model.load_state_dict(deterministic_weights(key_shapes))
        reference = reference_diffusers_unet(model, case["params"])  # strict load
        x, t, cond = deterministic_inputs(case)
        expected = diffusers_forward(reference, x, t, cond)
        print(f"{name}: |ours - diffusers| = {(model(x, t, cond) - expected).abs().max():.2e}, "
              f"|expected| max {expected.abs().max():.2f}")
        fixture["cases"][name] = {
            **case,
            "key_shapes": key_shapes,
            "expected_output": expected.flatten().tolist(),
            "expected_shape": list(expected.shape),
        }

    with torch.device("meta"):
        model = ours(PAPER_CASE)
        key_shapes = [(k, list(v.shape)) for k, v in model.state_dict().items()]
        reference = reference_diffusers_unet(model, PAPER_CASE)
    fixture["paper_txt2img"] = {
        "params": PAPER_CASE,
        "key_shapes": key_shapes,
        "parameter_count": sum(p.numel() for p in reference.parameters()),
    }
    FIXTURE.parent.mkdir(exist_ok=True)
    FIXTURE.write_text(json.dumps(fixture, indent=0) + "\n")
    print(f"wrote {FIXTURE} ({FIXTURE.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
