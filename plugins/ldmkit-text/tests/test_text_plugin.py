"""ldmkit-text as installed: what `ldmkit plugins` reports, and its configs composing a pipeline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

import ldmkit
from ldmkit.plugins import get_plugin_manager, reset_plugin_manager
from ldmkit_text import BertConditioner, ClipTextConditioner, FrozenTextConditioner
from ldmkit_text.plugin import ldmkit_register_conditioners, ldmkit_register_configs


def test_hooks_register_both_conditioners_and_the_config_group():
    registered = {}
    ldmkit_register_conditioners(register=lambda name, cls: registered.setdefault(name, cls))
    assert registered == {"bert": BertConditioner, "clip_text": ClipTextConditioner,
                          "frozen_text": FrozenTextConditioner}
    roots = []
    ldmkit_register_configs(register=roots.append)
    options = sorted(p.stem for p in (Path(roots[0]) / "conditioner").glob("*.yaml"))
    assert options == ["bert", "bert_paper", "clip_text", "frozen_text"]


def test_plugin_manager_reports_ldmkit_text():
    reset_plugin_manager()
    rows = {row["distribution"]: row for row in get_plugin_manager().plugin_report()}
    row = rows["ldmkit-text"]
    assert row["error"] is None and row["name"] == "text"
    assert row["registers"] == {"conditioner": ["bert", "clip_text", "frozen_text"]}
    assert row["config_groups"] == {"conditioner": ["bert", "bert_paper", "clip_text", "frozen_text"]}


def test_ldmkit_plugins_command_lists_it():
    exe = Path(sys.executable).with_name("ldmkit")
    out = subprocess.run([str(exe), "plugins", "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    row = {r["distribution"]: r for r in json.loads(out.stdout)}["ldmkit-text"]
    assert row["registers"]["conditioner"] == ["bert", "clip_text", "frozen_text"]
    assert "bert_paper" in row["config_groups"]["conditioner"]


def test_bert_config_composes_a_pipeline_that_samples_with_guidance():
    pipe = ldmkit.compose(["conditioner=bert", "conditioner.max_seq_len=8"])
    c = pipe.conditioner
    assert isinstance(c, BertConditioner) and c.drop_rate == 0.1 and c.crossattn_dim == 128
    out = pipe.sample({"caption": ["red apple", "snowman"]}, steps=2, guidance_scale=3.0, seed=0,
                      image_size=8)
    assert out.shape[0] == 2 and torch.isfinite(out).all()


def test_loading_a_frozen_encoder_draws_no_progress_bar(tmp_path):
    """``ldmkit sample --no-progress`` with frozen_text: transformers' "Loading weights" bar
    stays off stderr (the command prints one line: sampling from untrained weights)."""
    exe = Path(sys.executable).with_name("ldmkit")
    out = subprocess.run(
        [str(exe), "sample", "conditioner=frozen_text", "first_stage=identity", "image_size=8", "sampler.steps=1",
         "--prompt", "frog", "--no-progress", "--out", str(tmp_path / "s.png")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Loading weights" not in out.stderr and out.stderr.strip().splitlines() == [
        "ldmkit sample: no --checkpoint given, sampling from untrained weights"
    ]
