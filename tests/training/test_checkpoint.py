"""The checkpoint manager: complete-or-absent folders, validation, pruning."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from ldmkit.training.checkpoint import (
    CheckpointError,
    CheckpointManager,
    load_state,
    read_safetensors,
    resolve_checkpoint,
    validate,
)


def _save(manager, step, value=1.0):
    return manager.save(step, model={"first_stage.w": torch.full((3,), value)},
                        state={"step": step, "rng": torch.get_rng_state()}, config_yaml="a: 1\n")


def test_save_writes_complete_folder_and_reads_back(tmp_path):
    manager = CheckpointManager(tmp_path / "ckpt")
    checkpoint = _save(manager, 7, 2.5)
    assert checkpoint.path.name == "step_000000007"
    assert validate(checkpoint.path) is None
    assert torch.equal(read_safetensors(checkpoint.model_file)["first_stage.w"], torch.full((3,), 2.5))
    assert load_state(checkpoint)["step"] == 7
    assert checkpoint.config_file.read_text() == "a: 1\n"
    assert not [p for p in (tmp_path / "ckpt").iterdir() if p.name.startswith(".tmp")]


def test_latest_skips_torn_and_incomplete_checkpoints(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=5)
    _save(manager, 1)
    second = _save(manager, 2)
    third = _save(manager, 3)
    (third.path / "meta.json").unlink()  # as if written by hand, half-way
    with open(second.model_file, "r+b") as f:  # a torn header
        f.write(b"\xff" * 16)
    with pytest.warns(UserWarning, match="skipping unusable checkpoint"):
        latest = manager.latest()
    assert latest.step == 1
    assert third.path.exists() and second.path.exists()  # never deleted


def test_remove_incomplete_and_prune(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    writer = subprocess.Popen([sys.executable, "-c", "pass"])
    writer.wait()  # the writer of the leftover is gone
    leftover = tmp_path / f".tmp-step_000000009-{writer.pid}"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"partial")
    assert manager.remove_incomplete() == [leftover] and not leftover.exists()
    for step in (1, 2, 3):
        _save(manager, step)
    assert [c.step for c in manager.list()] == [2, 3]


def test_prune_keeps_the_step_just_written_when_later_ones_are_damaged(tmp_path):
    """A run whose newest checkpoints are damaged resumes from an older one (or starts
    again); pruning used to count the damaged later steps and delete the checkpoint it had
    just written, leaving the run with no usable checkpoint at all."""
    manager = CheckpointManager(tmp_path, keep_last=1)
    with open(_save(manager, 4).model_file, "r+b") as f:
        f.write(b"\xff" * 16)
    _save(manager, 2)  # the rerun, from scratch
    assert [c.step for c in manager.list()] == [2, 4]  # the damaged one stays until replaced
    with pytest.warns(UserWarning, match="skipping unusable checkpoint"):
        assert manager.latest().step == 2
    _save(manager, 4)  # its step reached again: replaced, and the one before pruned
    assert [c.step for c in manager.list()] == [4] and validate(manager.list()[0].path) is None


def test_same_step_saved_again_replaces_it(tmp_path):
    manager = CheckpointManager(tmp_path)
    _save(manager, 4, 1.0)
    checkpoint = _save(manager, 4, 3.0)
    assert torch.equal(read_safetensors(checkpoint.model_file)["first_stage.w"], torch.full((3,), 3.0))
    assert sorted(os.listdir(tmp_path)) == ["step_000000004"]


def test_resolve_checkpoint(tmp_path):
    run = tmp_path / "run"
    manager = CheckpointManager(run / "checkpoints")
    _save(manager, 1)
    newest = _save(manager, 2)
    assert resolve_checkpoint(run).path == newest.path
    assert resolve_checkpoint(newest.path).step == 2
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        resolve_checkpoint(tmp_path / "empty")
