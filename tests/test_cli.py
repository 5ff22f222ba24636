"""The `ldmkit` console script, run as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def ldmkit(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("ldmkit")
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([str(exe), *args], capture_output=True, text=True, env=full_env,
                          cwd=cwd, timeout=300)


def test_help_lists_subcommands():
    out = ldmkit("--help")
    assert out.returncode == 0
    for command in ("train", "sample", "evaluate", "data", "plugins"):
        assert command in out.stdout


def test_unknown_subcommand_fails_clearly():
    out = ldmkit("trian")
    assert out.returncode == 2 and "unknown command 'trian'" in out.stderr


def test_plugins_json_lists_first_party_plugins():
    out = ldmkit("plugins", "--json")
    assert out.returncode == 0, out.stderr
    rows = {row["distribution"]: row for row in json.loads(out.stdout)}
    samplers = rows["ldmkit-samplers"]
    assert samplers["version"] == "0.1.0"
    assert samplers["registers"]["sampler"] == ["ddim", "ddpm"]
    assert samplers["config_groups"]["sampler"] == ["ddim", "ddpm"]
    assert rows["ldmkit-conditioners"]["registers"]["conditioner"] == [
        "class_label", "inpaint", "low_res", "multi", "none", "semantic_map"]


def test_plugins_table_matches_json():
    table = ldmkit("plugins")
    assert table.returncode == 0, table.stderr
    for row in json.loads(ldmkit("plugins", "--json").stdout):
        assert row["distribution"] in table.stdout


def test_print_config_applies_overrides():
    out = ldmkit("sample", "sampler=ddim", "sampler.steps=7", "--print-config")
    assert out.returncode == 0, out.stderr
    assert "steps: 7" in out.stdout and "name: ddim" in out.stdout


def test_unknown_option_is_one_clear_line():
    out = ldmkit("sample", "sampler=dimm")
    assert out.returncode == 1
    assert "sampler/dimm" in out.stderr and "ddim" in out.stderr
    assert "Traceback" not in out.stderr


def test_sample_writes_a_png_grid(tmp_path):
    target = tmp_path / "grid.png"
    out = ldmkit("sample", "sampler=ddim", "sampler.steps=3", "image_size=16",
                 "--num-samples", "4", "--out", str(target), "--no-progress")
    assert out.returncode == 0, out.stderr
    image = Image.open(target)
    assert image.size == (2 + 2 * (16 + 2), 2 + 2 * (16 + 2))  # 2x2 grid, 2px padding


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_train_and_evaluate_take_overrides(command):
    out = ldmkit(command, "trainer.max_steps=3", "--print-config")
    assert out.returncode == 0, out.stderr
    assert "max_steps: 3" in out.stdout
