"""docs/example-plugin installed as a real distribution (pip, non-editable) and used
through the CLI in subprocesses, as a third party would."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_cli import ldmkit

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs" / "example-plugin"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    target = tmp_path_factory.mktemp("target")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(EXAMPLE)],
        check=True, capture_output=True, timeout=300,
    )
    assert (target / "ldmkit_thresholding" / "conf" / "sampler" / "thresholded_ddim.yaml").is_file()
    assert not (target / "ldmkit_thresholding.pth").exists()  # a real install, not an editable link
    # before this session's own PYTHONPATH (a checkout's src/ ahead of an installed ldmkit)
    return {"PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")])}


def test_listed_by_ldmkit_plugins(installed):
    out = ldmkit("plugins", "--json", env=installed)
    assert out.returncode == 0, out.stderr
    row = next(r for r in json.loads(out.stdout) if r["distribution"] == "ldmkit-thresholding-example")
    assert row["version"] == "0.1.0" and row["error"] is None
    assert row["registers"] == {"sampler": ["thresholded_ddim"]}
    assert row["config_groups"] == {"sampler": ["thresholded_ddim"]}


def test_selected_by_a_hydra_override(installed, tmp_path):
    out = ldmkit("sample", "sampler=thresholded_ddim", "sampler.steps=2", "--print-config",
                 env=installed)
    assert out.returncode == 0, out.stderr
    assert "name: thresholded_ddim" in out.stdout and "steps: 2" in out.stdout
    grid = tmp_path / "thresholded.png"
    out = ldmkit("sample", "sampler=thresholded_ddim", "sampler.steps=2", "image_size=8",
                 "--num-samples", "2", "--out", str(grid), "--no-progress", env=installed)
    assert out.returncode == 0, out.stderr
    assert grid.stat().st_size > 0


def test_not_available_without_the_install():
    out = ldmkit("sample", "sampler=thresholded_ddim", "--print-config")
    assert out.returncode == 1 and "sampler/thresholded_ddim" in out.stderr


def test_its_own_tests_pass_against_the_conformance_suite(installed):
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE / "tests")],
        capture_output=True, text=True, env={**__import__("os").environ, **installed}, timeout=300,
        cwd=EXAMPLE,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    # the whole conformance suite ran (passed or skipped where it does not apply), and its own test
    from ldmkit.testing import SamplerConformance

    expected = sum(name.startswith("test_") for name in dir(SamplerConformance)) + 1
    ran = sum(int(n) for n in re.findall(r"(\d+) (?:passed|skipped)", out.stdout.splitlines()[-1]))
    assert ran == expected, out.stdout
