"""Stage-2 training under a real `torchrun --nproc_per_node=2` (gloo, CPU) on real shards:
each rank reads its own shards, DDP keeps the ranks' weights identical, only rank 0 writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ldmkit.data import prepare
from ldmkit.training.run_lock import RunLock
from tests.data.conftest import make_image_folder
from tests.test_bad_values import digest

WORKER = textwrap.dedent('''
    import hashlib, json, sys
    from pathlib import Path
    import torch
    import torch.distributed as dist
    from ldmkit.config import compose_config
    from ldmkit.training import distributed_process_group
    from ldmkit.training.ldm import LDMTrainer

    shards, run_dir, out = sys.argv[1:4]
    cfg = compose_config([
        "stage=ldm", "trainer=ldm_tiny", "first_stage=identity", "denoiser=unet_tiny",
        "conditioner=class_label", "conditioner.num_classes=3", "conditioner.embed_dim=16",
        "data=image_folder", f"data.path={shards}", "data.resampled=false", "data.flip=false",
        "image_size=8", f"run_dir={run_dir}", "trainer.max_steps=4", "trainer.batch_size=2",
        "trainer.val_split=val",
    ])

    class Recording(LDMTrainer):
        seen = []

        def make_loader(self, split, epoch):
            for batch in super().make_loader(split, epoch):
                if split == "train":
                    self.seen.extend(batch["__key__"])
                yield batch

    with distributed_process_group():
        rank = dist.get_rank()
        trainer = Recording(cfg)
        trainer.fit()
        digest = hashlib.sha256()
        for name, p in sorted(trainer.trainable.state_dict().items()):
            digest.update(name.encode()); digest.update(p.detach().cpu().numpy().tobytes())
        result = {"rank": rank, "world": dist.get_world_size(), "digest": digest.hexdigest(),
                  "step": trainer.step, "seen": Recording.seen}
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
''')


def _environment() -> dict[str, str]:
    """This checkout's tests on the path, before the code this interpreter imports."""
    paths = [str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, paths))}


def test_torchrun_two_processes(tmp_path):
    images = tmp_path / "images"
    make_image_folder(images, per_class=8, size=(8, 8))
    shards = tmp_path / "shards"
    # 5 train shards; 1 val shard, which validation reads on rank 0 alone
    prepare("image_folder", shards, path=str(images), shard_size=4, val_fraction=0.15, progress=False)
    (tmp_path / "worker.py").write_text(WORKER)
    torchrun = Path(sys.executable).with_name("torchrun")
    env = _environment()
    out = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node=2", str(tmp_path / "worker.py"),
         str(shards), str(tmp_path / "run"), str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2] and [r["step"] for r in ranks] == [4, 4]
    assert ranks[0]["digest"] == ranks[1]["digest"], "ranks diverged"
    seen0, seen1 = set(ranks[0]["seen"]), set(ranks[1]["seen"])
    assert seen0 and seen1 and not seen0 & seen1, "ranks read overlapping samples"
    run = tmp_path / "run"
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert checkpoints == ["step_000000003", "step_000000004"]
    metrics = (run / "metrics.csv").read_text().splitlines()
    assert len(metrics) >= 2 and "val/" in metrics[0], metrics
    assert (run / "pipeline" / "model.safetensors").is_file()


def test_a_run_dir_in_use_stops_every_rank_in_one_line(tmp_path):
    """Rank 0 holds the run folder's lock for all ranks; when another process holds it, every
    rank stops with the same line and nothing in the folder changes."""
    run = tmp_path / "run"
    torchrun = Path(sys.executable).with_name("torchrun")
    with RunLock(run):  # the other trainer: this process
        before = digest(run)
        out = subprocess.run(
            [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "ldmkit.cli", "train",
             "stage=ldm", "trainer=ldm_tiny", "first_stage=identity", "denoiser=unet_tiny",
             "image_size=8", f"run_dir={run}"],
            capture_output=True, text=True, env=_environment(), timeout=300,
        )  # fmt: skip
        assert digest(run) == before
    assert out.returncode != 0
    line = f"ldmkit train: error: run_dir {run} is in use by PID {os.getpid()} (started "
    assert out.stderr.count(line) == 2, out.stderr  # one line from each rank


def test_ranks_that_would_resume_from_different_checkpoints_stop_in_one_line(tmp_path):
    """A run_dir local to each machine: rank 0 finds the checkpoints rank 0 wrote, the other
    ranks find none. Every rank stops with the same line naming each rank's checkpoint, rather
    than rank 0 resuming while the others start from step 0 (or hang at a collective)."""
    shards = _tiny_shards(tmp_path)
    torchrun = Path(sys.executable).with_name("torchrun")
    # ${oc.env:RANK}: each rank its own folder, as node-local storage would give it
    run = f"{tmp_path}/node" + "${oc.env:RANK}"

    def train(steps: int) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "ldmkit.cli", "train",
             "stage=ldm", "trainer=ldm_tiny", "first_stage=identity", "denoiser=unet_tiny",
             "data=image_folder", f"data.path={shards}", "image_size=8", f"run_dir={run}",
             f"trainer.max_steps={steps}", "trainer.batch_size=2", "trainer.checkpoint_every=2"],
            capture_output=True, text=True, env=_environment(), timeout=300,
        )  # fmt: skip

    first = train(2)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (tmp_path / "node0" / "checkpoints" / "step_000000002").is_dir()
    assert not (tmp_path / "node1" / "checkpoints").exists()  # only rank 0 writes
    before = digest(tmp_path / "node0")
    second = train(4)
    assert second.returncode != 0
    line = (f"ldmkit train: error: the ranks found different checkpoints to resume from: "
            f"step 2 ({tmp_path}/node0/checkpoints/step_000000002) on rank 0, none on rank 1")
    assert second.stderr.count(line) == 2, second.stderr[-3000:]
    assert "run_dir must be on storage every machine sees" in second.stderr
    after = digest(tmp_path / "node0")
    assert {k: v for k, v in after.items() if k != ".lock"} == {k: v for k, v in before.items() if k != ".lock"}


@pytest.mark.slow
def test_torchrun_trains_the_paper_text_conditioner(tmp_path):
    """conditioner=bert under DDP (trainer.ddp_find_unused_parameters=false, the default): every
    trainable parameter must get a gradient each step, or the second step stops every rank."""
    shards, run = _tiny_shards(tmp_path), tmp_path / "run"  # every other image has a caption
    proc = _torchrun_train(shards, run, "conditioner=bert", "conditioner.n_layer=1", "conditioner.max_seq_len=8",
                           "trainer.max_steps=3")  # fmt: skip
    out, err = _finish(proc, 300)
    assert proc.returncode == 0, err[-3000:]
    assert (run / "checkpoints" / "step_000000003").is_dir()
    assert out.count("run directory:") == 1, out  # rank 0's, not one per rank


@pytest.mark.slow
def test_latent_cache_under_torchrun(tmp_path):
    """trainer.latent_cache under torchrun: rank 0 builds the cache while the other ranks wait,
    then every rank trains from it (rank 0's signal check while building took part in a
    collective the waiting ranks never joined: the run hung for good)."""
    shards, run = _tiny_shards(tmp_path), tmp_path / "run"
    proc = _torchrun_train(shards, run, "trainer.max_steps=2", "trainer.latent_cache=true")
    _, err = _finish(proc, 90)
    assert proc.returncode == 0, err[-3000:]
    assert (run / "latent_cache" / "meta.json").is_file()
    assert (run / "checkpoints" / "step_000000002").is_dir()


def _torchrun_train(shards: Path, run: Path, *overrides: str) -> subprocess.Popen:
    """`ldmkit train` of a tiny stage 2 on 2 ranks, in a session of its own (killed whole on a hang)."""
    torchrun = Path(sys.executable).with_name("torchrun")
    return subprocess.Popen(
        [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "ldmkit.cli", "train",
         "stage=ldm", "trainer=ldm_tiny", "first_stage=identity", "denoiser=unet_tiny",
         "data=image_folder", f"data.path={shards}", "image_size=8", f"run_dir={run}",
         "trainer.batch_size=2", "trainer.sample_every=null", "trainer.val_every=null", *overrides],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_environment(),
        start_new_session=True,
    )  # fmt: skip


def _tiny_shards(tmp_path: Path, shard_size: int = 4) -> Path:
    """12 captioned-or-not 8x8 images in 3 classes, prepared as shards under tmp_path."""
    make_image_folder(tmp_path / "images", per_class=4, size=(8, 8))
    prepare("image_folder", tmp_path / "shards", path=str(tmp_path / "images"), shard_size=shard_size, progress=False)
    return tmp_path / "shards"


def _finish(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    """The run's stdout and stderr once it ends; a hang kills torchrun and its ranks and fails
    the test."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"the run hung: {proc.communicate()[1][-3000:]}")


def _assert_no_rank_traceback(err: str) -> None:
    """No rank printed a traceback (torch prefixes those lines "[rankN]:"; torchrun's own
    summary of the failed ranks is torchrun's, not ours)."""
    assert not [line for line in err.splitlines() if line.startswith("[rank")], err[-3000:]
    assert "gloo" not in err, err[-3000:]


def _rank_pid(torchrun: int, rank: int) -> int:
    """The process of ``rank`` among torchrun's children (by the RANK torchrun gave it)."""
    for child in Path(f"/proc/{torchrun}/task/{torchrun}/children").read_text().split():
        if f"RANK={rank}".encode() in Path(f"/proc/{child}/environ").read_bytes().split(b"\0"):
            return int(child)
    raise AssertionError(f"no rank {rank} among torchrun's children")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank's process in /proc")
def test_a_rank_killed_stops_the_others_in_one_line(tmp_path):
    """A rank SIGKILLed mid-run (out of memory, a lost machine): the surviving rank says so in
    one line naming the newest checkpoint, instead of gloo's "Connection reset by peer" traceback."""
    shards, run = _tiny_shards(tmp_path), tmp_path / "run"
    proc = _torchrun_train(shards, run, "trainer.max_steps=100000", "trainer.checkpoint_every=2")
    try:
        while not (run / "checkpoints" / "step_000000002").is_dir():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.05)
        os.kill(_rank_pid(proc.pid, 1), signal.SIGKILL)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    _, err = _finish(proc, 60)
    assert proc.returncode != 0
    lines = [line for line in err.splitlines() if line.startswith("ldmkit train: error: ")]
    assert len(lines) == 1, err[-3000:]  # rank 0's; rank 1 said nothing, it was killed
    newest = max(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert lines[0] == (
        "ldmkit train: error: another rank stopped (the connection to it was lost); the newest "
        f"checkpoint is step {int(newest[5:])} ({run}/checkpoints/{newest}): run the same command "
        "again to resume"
    )
    _assert_no_rank_traceback(err)


@pytest.mark.slow
def test_fewer_shards_than_ranks_stops_every_rank_in_one_line(tmp_path):
    """data.resampled=false deals whole shards to the ranks: with one shard for two ranks rank 1
    would have nothing to train on. Every rank stops before the first step with the reason and
    the fix (rank 1 found "no valid sample" and rank 0 died of the lost connection)."""
    shards, run = _tiny_shards(tmp_path, shard_size=100), tmp_path / "run"  # 1 shard
    proc = _torchrun_train(shards, run, "trainer.max_steps=2", "data.resampled=false")
    _, err = _finish(proc, 60)
    assert proc.returncode != 0
    line = (
        f"ldmkit train: error: {shards} split 'train' has 1 shard for 2 ranks and "
        "data.resampled=false deals whole shards to the ranks, so rank 1 would have nothing to "
        "train on: prepare it with more shards (ldmkit data prepare ... shard_size=N, at most 6 "
        "samples per shard here) or set data.resampled=true"
    )
    assert err.count(line) == 2, err[-3000:]  # one from each rank
    _assert_no_rank_traceback(err)
    assert not (run / "checkpoints").exists()


def test_only_a_lost_connection_to_a_rank_is_reported_as_one():
    """The trainer turns these into one line; every other error keeps its traceback."""
    import torch.distributed as dist

    from ldmkit.training.distributed import lost_connection

    gloo = "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:32144"
    assert lost_connection(RuntimeError(gloo))
    assert lost_connection(RuntimeError(gloo.replace("Connection closed by peer", "Read error: Connection reset by peer")))
    assert lost_connection(dist.DistNetworkError("failed to recv, got 0 bytes"))
    assert lost_connection(dist.DistBackendError("NCCL communicator was aborted"))
    assert not lost_connection(RuntimeError("Connection reset by peer"))  # not from the process group
    assert not lost_connection(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not lost_connection(ConnectionResetError("Connection reset by peer"))  # e.g. streaming data
