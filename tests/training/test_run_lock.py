"""A run folder is used by one trainer at a time (issue 26, item 3): a second `ldmkit train` on
the same run_dir stops in one line naming the first one's PID and touches nothing; start-up
cleans only the temporaries of processes that no longer run."""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import time

import pytest

from ldmkit.data import prepare
from ldmkit.training import train
from ldmkit.training.checkpoint import CheckpointManager, validate
from ldmkit.training.logger import read_metrics
from ldmkit.training.run_lock import LOCK_FILE, RunDirInUseError, RunLock
from tests.conftest import LDMKIT
from tests.data.conftest import make_image_folder
from tests.test_bad_values import digest, error_line, run_main

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="flock and SIGSTOP are POSIX")

IN_USE = re.compile(r"run_dir (?P<dir>\S+) is in use by PID (?P<pid>\d+) \(started [\d: -]+\); ")


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _tiny_ldm(tmp_path, run_dir, *extra):
    images, shards = tmp_path / "images", tmp_path / "shards"
    make_image_folder(images, per_class=4, size=(8, 8))
    prepare("image_folder", shards, path=str(images), shard_size=4, progress=False)
    return [
        "stage=ldm", "trainer=ldm_tiny", "first_stage=identity", "denoiser=unet_tiny",
        "conditioner=class_label", "conditioner.num_classes=3", "conditioner.embed_dim=16",
        "data=image_folder", f"data.path={shards}", "data.flip=false", "image_size=8",
        "trainer.batch_size=2", "trainer.num_workers=0", "trainer.num_threads=1",
        "trainer.progress=false", "trainer.tensorboard=false", "trainer.log_every=1",
        "trainer.val_every=0", f"run_dir={run_dir}", *extra,
    ]  # fmt: skip


def test_a_second_trainer_on_the_run_dir_stops_naming_the_first(tmp_path):
    run = tmp_path / "run"
    args = _tiny_ldm(tmp_path, run, "trainer.max_steps=40", "trainer.checkpoint_every=2",
                     "trainer.keep_checkpoints=3", "trainer.sample_every=20")  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([str(LDMKIT), "train", *args], cwd=tmp_path, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    manager = CheckpointManager(run / "checkpoints")
    try:
        while not manager.list():  # training is under way
            assert first.poll() is None, first.stderr.read()
            time.sleep(0.01)
        os.kill(first.pid, signal.SIGSTOP)  # holds the lock, whatever it was writing
        assert first.poll() is None, "the first trainer ended before the second could start"
        # a checkpoint the first one is writing (today's start-up cleanup deleted it)
        unfinished = run / "checkpoints" / f".tmp-step_000000099-{first.pid}"
        unfinished.mkdir()
        (unfinished / "model.safetensors").write_bytes(b"half")
        before = digest(run)
        second = subprocess.run([str(LDMKIT), "train", *args], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=300)  # fmt: skip
        after = digest(run)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert second.returncode == 1
    match = IN_USE.match(error_line(second.stderr, "train"))
    assert match and match["dir"] == str(run) and int(match["pid"]) == first.pid, second.stderr
    assert after == before  # nothing touched

    assert first.wait(timeout=300) == 0, first.stderr.read()
    assert [c.step for c in manager.list()] == [36, 38, 40]
    assert all(validate(c.path, verify=True) is None for c in manager.list())
    assert [int(r["step"]) for r in read_metrics(run) if "train/loss" in r] == list(range(1, 41))
    assert unfinished.is_dir()  # neither trainer took it for a dead one's leftover
    # written under this process's umask, readable as any file the user writes (item 8)
    umask = os.umask(0o022)
    os.umask(umask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (run / "pipeline").iterdir()}
    assert modes == dict.fromkeys(["config.yaml", "model.safetensors"], 0o666 & ~umask)


def test_start_up_cleans_the_dead_ones_temporaries_and_keeps_the_live_ones(
    tiny_cfg, image_data, tmp_path, capsys
):
    run = tmp_path / "run"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    dead = _dead_pid()
    try:
        checkpoints = run / "checkpoints"
        planted = {
            "dead checkpoint": checkpoints / f".tmp-step_000000001-{dead}",
            "live checkpoint": checkpoints / f".tmp-step_000000001-{live.pid}",
            "dead pruning": checkpoints / f".tmp-pruned-step_000000001-{dead}",
            "live pruning": checkpoints / f".tmp-pruned-step_000000001-{live.pid}",
            "dead config": run / f".config.yaml.{dead}-abc123.tmp",
            "live config": run / f".config.yaml.{live.pid}-def456.tmp",
            "dead grid": run / "images" / f".x.png.{dead}-abc123.tmp",
            "live grid": run / "images" / f".x.png.{live.pid}-def456.tmp",
        }
        for name, path in planted.items():
            if "checkpoint" in name or "pruning" in name:
                path.mkdir(parents=True)
                (path / "model.safetensors").write_bytes(b"half")
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(b"")

        # while another trainer holds the folder (here: this process), nothing is cleaned
        with RunLock(run):
            code, line = run_main(capsys, "train", "stage=autoencoder", "first_stage=kl_tiny",
                                  "trainer=autoencoder_tiny", f"run_dir={run}")  # fmt: skip
        assert code == 1 and IN_USE.match(line) and f"PID {os.getpid()} " in line
        assert all(path.exists() for path in planted.values())

        train(tiny_cfg("trainer.max_steps=2"), data=image_data())
        assert {name for name, path in planted.items() if path.exists()} == {
            "live checkpoint", "live pruning", "live config", "live grid"
        }
    finally:
        live.kill()
        live.wait()
    assert [c.step for c in CheckpointManager(run / "checkpoints").list()] == [2]


HOLDER = """
import os, sys, time
from ldmkit.training.run_lock import RunLock
RunLock(sys.argv[1]).acquire()
worker = os.fork()  # as a DataLoader worker is: it outlives a SIGKILLed trainer for a while
if worker == 0:
    time.sleep(300)
    os._exit(0)
print(worker, flush=True)
time.sleep(300)
"""


def test_the_lock_is_released_on_death_and_a_fresh_folder_left_as_it_was(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE, text=True)
    worker = None
    try:
        worker = int(holder.stdout.readline())
        with pytest.raises(RunDirInUseError, match=f"in use by PID {holder.pid} "):
            RunLock(run).acquire()
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        with RunLock(run):  # the kernel dropped the dead one's lock; its forked worker had none
            pass
    finally:
        holder.kill()
        holder.wait()
        if worker:
            os.kill(worker, signal.SIGKILL)
    assert (run / LOCK_FILE).is_file()  # a folder that was there keeps its lock file

    fresh = tmp_path / "fresh" / "run"
    with RunLock(fresh):
        assert (fresh / LOCK_FILE).is_file()
    assert not fresh.exists()  # created for the lock alone: removed with it
