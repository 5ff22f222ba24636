"""A real `ldmkit train` process killed with SIGKILL resumes from its last checkpoint and
leaves no torn file behind."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from ldmkit.training.checkpoint import CheckpointManager, load_state, validate
from ldmkit.training.logger import read_metrics

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")


def _wait_for(predicate, timeout, proc):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early with code {proc.returncode}: {proc.stderr.read()}")
        time.sleep(0.02)
    raise AssertionError("timed out waiting for checkpoints")


def test_sigkill_then_restart_resumes(tmp_path):
    from ldmkit.data import prepare

    data = tmp_path / "fashion_mnist"
    prepare("fashion_mnist", data, limit=32, progress=False)
    run = tmp_path / "run"
    args = [
        sys.executable, "-m", "ldmkit.cli", "train", "stage=autoencoder", "first_stage=kl_tiny",
        "trainer=autoencoder_tiny", f"data.path={data}", f"run_dir={run}",
        # a checkpoint every step: the kill very likely lands inside a checkpoint write
        "trainer.checkpoint_every=1", "trainer.keep_checkpoints=2", "trainer.log_every=1",
        "trainer.val_every=0", "trainer.sample_every=0", "trainer.tensorboard=false",
        "trainer.num_threads=1",
    ]
    manager = CheckpointManager(run / "checkpoints")
    proc = subprocess.Popen([*args, "trainer.max_steps=100000"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: any(c.step >= 4 for c in manager.list()), 120, proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    # whatever the kill interrupted, every checkpoint folder is complete
    assert all(validate(c.path) is None for c in manager.list())
    killed_at = manager.latest().step
    assert killed_at >= 4

    done = subprocess.run([*args, f"trainer.max_steps={killed_at + 3}"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    latest = manager.latest()
    assert latest.step == killed_at + 3
    assert not [p for p in manager.directory.iterdir() if p.name.startswith(".tmp")]
    for checkpoint in manager.list():
        assert validate(checkpoint.path) is None
        weights = load_file(checkpoint.model_file)
        assert all(torch.isfinite(t).all() for t in weights.values())
        assert load_state(checkpoint)["step"] == checkpoint.step
    steps = [int(r["step"]) for r in read_metrics(run) if "train/loss" in r]
    assert steps == list(range(1, killed_at + 4))  # continued from the checkpoint, each step once
