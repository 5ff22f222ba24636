"""Exact resume: a run stopped anywhere and restarted with the same command ends bitwise
equal — every tensor of the final checkpoint (weights, EMA, optimizer states, discriminator
buffers, random streams, data position) and of the exported pipeline — to a run that was
never interrupted. Real shards, 2 DataLoader workers, shuffling, augmentation, grids and
validation on; stage 2 with KL posterior samples and condition dropout."""

from __future__ import annotations

import itertools
import random
import signal
import sys

import pytest
import torch

from ldmkit.data import build_dataloader
from tests.training import faults

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return faults.make_shards(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    """The uninterrupted run of each stage (in this process: same code, no start-up cost)."""
    runs = {}
    for stage in (1, 2):
        run_dir = tmp_path_factory.mktemp(f"reference{stage}") / "run"
        assert faults.train_in_process(faults.stage_args(stage, shards, run_dir)) == 0
        step = faults.checkpoint_steps(run_dir)[-1]
        runs[stage] = (step, faults.final_contents(run_dir, step))
    return runs


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_resumes_exactly_after_any_batch(shards, workers):
    cfg = {
        "source": "image_folder",
        "path": str(shards),
        "image_size": 16,
        "flip": True,
        "shuffle_buffer": 8,
    }

    def loader():
        return build_dataloader(cfg, batch_size=3, num_workers=workers, seed=1)

    def batches(source, start_epoch_iter, count):
        out, it = [], start_epoch_iter
        while len(out) < count:
            batch = next(it, None)
            if batch is None:
                it = iter(source)
                continue
            out.append((batch["__key__"], batch["image"]))
        return out

    straight = loader()
    full = [(b["__key__"], b["image"]) for b in itertools.chain(straight, straight)]  # two epochs
    for cut in range(1, len(full), 4):
        first = loader()
        head = batches(first, iter(first), cut)
        second = loader()
        assert second.load_state_dict(first.state_dict()) is None
        tail = batches(second, iter(second), len(full) - cut)
        for (keys, image), (want_keys, want_image) in zip(head + tail, full, strict=True):
            assert keys == want_keys and torch.equal(image, want_image), f"cut after {cut} batches"


def test_changed_worker_count_is_said_in_one_line(shards):
    cfg = {"source": "image_folder", "path": str(shards), "image_size": 16}
    first = build_dataloader(cfg, batch_size=3, num_workers=2)
    next(iter(first))
    note = build_dataloader(cfg, batch_size=3, num_workers=0).load_state_dict(first.state_dict())
    assert note is not None and "\n" not in note
    assert (
        "trainer.num_workers) changed from 2 to 1" in note
        and "starts again from its beginning" in note
    )


@pytest.mark.parametrize("stage", [1, 2])
def test_sigkill_anywhere_then_the_same_command_ends_bitwise_equal(
    stage, shards, reference, tmp_path
):
    """Through the CLI in subprocesses: killed at a random moment after the first
    checkpoint (inside a step, a grid, a checkpoint write or the pipeline export), restarted
    with the same command."""
    step, expected = reference[stage]
    run_dir = tmp_path / "run"
    args = faults.stage_args(stage, shards, run_dir)
    rng = random.Random(stage)
    proc = faults.start(args, cwd=tmp_path)
    killed = faults.kill_after(proc, run_dir, step=3, delay=rng.uniform(0.0, 0.6))
    assert killed, f"the run ended before the kill: {proc.stderr.read()[-2000:]}"
    assert proc.returncode == -signal.SIGKILL
    assert faults.invalid_checkpoints(run_dir) == []
    done = faults.run(args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert faults.differences(expected, faults.final_contents(run_dir, step)) == []
    assert faults.leftovers(run_dir) == []


def test_restarted_at_every_checkpoint_equals_uninterrupted(shards, reference, tmp_path):
    """Stage 2 stopped at each checkpoint (max_steps raised each time): the position in the
    epoch, the random streams and the EMA carry over every time."""
    step, expected = reference[2]
    run_dir = tmp_path / "run"
    for stop in (3, 6, step):
        assert (
            faults.train_in_process(
                faults.stage_args(2, shards, run_dir, f"trainer.max_steps={stop}")
            )
            == 0
        )
    assert faults.differences(expected, faults.final_contents(run_dir, step)) == []


def test_grid_and_checkpoint_frequency_do_not_change_training(shards, reference, tmp_path):
    """Grids and validation draw from their own generators: running them (and checkpoints)
    at other steps leaves the weights bitwise the same."""
    step, expected = reference[1]
    run_dir = tmp_path / "run"
    args = faults.stage_args(
        1,
        shards,
        run_dir,
        "trainer.sample_every=1",
        "trainer.val_every=5",
        "trainer.checkpoint_every=5",
        "trainer.keep_checkpoints=1",
    )
    assert faults.train_in_process(args) == 0
    assert faults.differences(expected, faults.final_contents(run_dir, step)) == []
