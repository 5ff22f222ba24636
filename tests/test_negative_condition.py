"""Negative conditions: guidance steers away from given inputs instead of the null condition
(``SampleRequest.negative``, ``ldmkit sample --negative-prompt / --negative-cond``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ldmkit
from ldmkit.sampling_request import SampleArgumentError
from tests.test_bad_values import run_main

CLASS_PIPELINE = ["experiment=fmnist_ldm_kl_f4", "first_stage.checkpoint=null", "sampler=ddim", "sampler.steps=3"]


@pytest.fixture(scope="module")
def pipe():
    pipe = ldmkit.compose(overrides=CLASS_PIPELINE).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # trained-looking weights: the zero-initialised output layer gives eps = 0
        for p in pipe.denoiser.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return pipe


BATCH = {"label": [1, 2, 3]}


def test_scale_zero_samples_the_negative_condition_itself(pipe):
    """eps(neg) + 0 (eps(c) - eps(neg)) = eps(neg): the chain of the negative labels, unguided."""
    steered = pipe.sample(BATCH, negative={"label": [5]}, guidance_scale=0.0, seed=0, precision="fp32")
    plain = pipe.sample({"label": [5, 5, 5]}, seed=0, precision="fp32")
    torch.testing.assert_close(steered, plain, atol=1e-5, rtol=0)


def test_the_negative_replaces_the_null_condition(pipe):
    """A negative equal to the condition cancels guidance at any scale; one value stands for every
    sample; and steering away from a class differs from steering away from the null."""
    same = pipe.sample(BATCH, negative=BATCH, guidance_scale=4.0, seed=0, precision="fp32")
    unguided = pipe.sample(BATCH, seed=0, precision="fp32")
    torch.testing.assert_close(same, unguided, atol=1e-5, rtol=0)
    one = pipe.sample(BATCH, negative={"label": [5]}, guidance_scale=3.0, seed=0, precision="fp32")
    each = pipe.sample(BATCH, negative={"label": [5, 5, 5]}, guidance_scale=3.0, seed=0, precision="fp32")
    torch.testing.assert_close(one, each, atol=0, rtol=0)
    null = pipe.sample(BATCH, guidance_scale=3.0, seed=0, precision="fp32")
    assert (one - null).abs().max() > 1e-2


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"negative": {"label": [5]}}, "negative needs a guidance_scale other than 1"),
        ({"negative": {}, "guidance_scale": 3.0}, "negative is empty"),
        ({"negative": {"caption": ["x"]}, "guidance_scale": 3.0},
         "negative has key(s) 'caption' that conditioner ClassLabelConditioner does not read (its inputs: label)"),
        ({"negative": {"label": [1, 2]}, "guidance_scale": 3.0},
         "negative['label'] holds 2 values for 3 samples: give 1 (for all) or 3"),
        ({"negative": {"label": 4}, "guidance_scale": 3.0}, "negative['label'] is 4, not a list"),
        # a value the conditioner refuses: was its bare message, naming no negative
        ({"negative": {"label": [99]}, "guidance_scale": 3.0},
         "negative: class labels must be in [0, 10) (conditioner.num_classes=10); got min 99, max 99"),
        ({"negative": ["a"], "guidance_scale": 3.0},
         "negative maps each condition key to its values, e.g. {'label': [1, 2]} or {'caption': ['a cat']}; got a list"),
    ],
)
def test_bad_negative_conditions_are_one_error_naming_the_argument(pipe, options, message):
    with pytest.raises(SampleArgumentError) as err:
        pipe.sample(BATCH, seed=0, **options)
    assert message in str(err.value)
    assert err.value.argument == "negative"


def test_an_unconditional_pipeline_has_nothing_to_steer_away_from():
    pipe = ldmkit.compose(overrides=["first_stage=kl_tiny", "denoiser=unet_tiny", "sampler.steps=2"])
    with pytest.raises(SampleArgumentError, match="conditioner .* reads no inputs"):
        pipe.sample(num_samples=1, negative={"label": [1]}, guidance_scale=2.0, seed=0)


def test_cli_negative_prompt_and_cond(tmp_path, capsys):
    """``--negative-cond``, one value per condition repeated with ``--num-samples``, recorded in the
    settings JSON (a real ``ldmkit`` process); the flags' misuse is one line each."""
    out = tmp_path / "grid.png"
    done = subprocess.run(
        [str(Path(sys.executable).with_name("ldmkit")), "sample", *CLASS_PIPELINE, "--labels", "1,2",
         "--num-samples", "2", "--negative-cond", "label=5,6", "--guidance-scale", "3", "--out", str(out),
         "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    settings = json.loads(out.with_suffix(".json").read_text())
    assert settings["negative"] == {"label": [5, 5, 6, 6]} and settings["conditions"] == {"label": [1, 1, 2, 2]}
    base = ["sample", *CLASS_PIPELINE, "--labels", "1,2", "--out", str(tmp_path / "x.png"), "--no-progress"]
    cases = [
        (["--negative-cond", "label=5"], "--negative-cond needs --guidance-scale other than 1"),
        (["--negative-cond", "label=5,6,7", "--guidance-scale", "3"],
         "--negative-cond label=... gives 3 values for 2 condition(s): give 1 (for every sample) or one per condition"),
        (["--negative-prompt", "blurry", "--guidance-scale", "3"],
         "--negative-prompt: the conditioner reads no key 'caption'; it reads ['label']"),
    ]
    for extra, expected in cases:
        code, line = run_main(capsys, *base, *extra)
        assert code == 1 and line.startswith(expected), line
    assert not (tmp_path / "x.png").exists()
