"""Fault injection for training: kills inside every kind of write, damaged checkpoint files,
preemption signals in the middle of a step, resuming with changed settings. Each test checks
the message and that nothing written before is lost (the run ends bitwise equal to one that
never saw the fault). The kill-per-write-phase tests start real processes and are marked slow;
see also tests/training/test_exact_resume.py and benchmarks/fault_injection.py."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys

import pytest
import torch

from ldmkit.io import atomic_write_text, remove_stale_temporaries
from ldmkit.losses import AutoencoderLoss
from ldmkit.safetensors_io import read_safetensors
from ldmkit.training.checkpoint import CheckpointManager, CheckpointWarning
from ldmkit.training.engine import TrainingError
from ldmkit.training.signals import EXIT_PREEMPTED, TrainingInterrupted
from tests.training import faults

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

EVERY_STEP = ("trainer.checkpoint_every=1", "trainer.keep_checkpoints=100")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return faults.make_shards(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    """Uninterrupted runs, stage 1 with a checkpoint after every step (to compare any step);
    ``reference(stage, step)`` -> that checkpoint's contents."""
    runs = {}

    def contents(stage, step=None, *extra):
        key = (stage, extra)
        if key not in runs:
            run_dir = tmp_path_factory.mktemp("reference") / "run"
            args = faults.stage_args(
                stage, shards, run_dir, *(EVERY_STEP if stage == 1 else ()), *extra
            )
            assert faults.train_in_process(args) == 0
            runs[key] = run_dir
        run_dir = runs[key]
        step = step or faults.checkpoint_steps(run_dir)[-1]
        return (
            faults.final_contents(run_dir, step)
            if stage == 2
            else faults.checkpoint_contents(run_dir / "checkpoints" / f"step_{step:09d}")
        )

    return contents


def last_step(stage):
    return 12 if stage == 1 else 10


def ours(run_dir, step, stage=1):
    return (
        faults.final_contents(run_dir, step)
        if stage == 2
        else faults.checkpoint_contents(run_dir / "checkpoints" / f"step_{step:09d}")
    )


# -- damaged checkpoint files ------------------------------------------------------------------
def _flip_middle_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _empty(path):
    path.write_bytes(b"")


def _garbage(path):
    path.write_bytes(b"\x00not what was written\xff" * 7)


@pytest.mark.parametrize(
    ("name", "damage"),
    [
        ("trainer_state.pt", _flip_middle_byte),
        ("trainer_state.pt", _truncate),
        ("meta.json", _truncate),
        ("meta.json", _empty),
        ("model.safetensors", _flip_middle_byte),  # header intact: only the checksum notices
        ("training.safetensors", _truncate),
        ("config.yaml", _garbage),
    ],
)
def test_a_damaged_file_falls_back_to_the_previous_checkpoint(
    name, damage, shards, reference, tmp_path, capsys
):
    run_dir = tmp_path / "run"
    args = faults.stage_args(1, shards, run_dir, "trainer.max_steps=6")
    assert faults.train_in_process(args) == 0
    bad = run_dir / "checkpoints" / "step_000000006" / name
    damage(bad)
    capsys.readouterr()
    assert faults.train_in_process(faults.stage_args(1, shards, run_dir)) == 0
    notes = [x for x in capsys.readouterr().err.splitlines() if "skipping unusable checkpoint" in x]
    assert notes == [
        f"ldmkit train: warning: skipping unusable checkpoint {bad.parent}: {notes[0].split(': ', 3)[3]}"
    ]
    assert notes[0].split(": ", 3)[3].startswith(name)
    # resumed from step 3, redid 4..12: nothing lost, the same end
    assert faults.differences(reference(1, 12), ours(run_dir, 12)) == []


def test_damaged_state_without_checksums_is_caught_when_read(shards, reference, tmp_path):
    from ldmkit.config import compose_config
    from ldmkit.training import train

    """Checkpoints written before checksums existed: a damaged trainer_state.pt fails to
    unpickle, and that too falls back with one warning."""
    run_dir = tmp_path / "run"
    assert (
        faults.train_in_process(faults.stage_args(1, shards, run_dir, "trainer.max_steps=6")) == 0
    )
    folder = run_dir / "checkpoints" / "step_000000006"
    meta = json.loads((folder / "meta.json").read_text())
    del meta["sha256"]
    (folder / "meta.json").write_text(json.dumps(meta))
    _garbage(folder / "trainer_state.pt")
    with pytest.warns(CheckpointWarning, match=r"step_000000006: cannot read .*trainer_state\.pt"):
        train(compose_config(faults.stage_args(1, shards, run_dir)))
    assert faults.differences(reference(1, 12), ours(run_dir, 12)) == []


def test_stale_temporaries_are_removed_live_ones_kept(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    dead = tmp_path / f".model.safetensors.{child.pid}-abc123.tmp"
    live = tmp_path / f".model.safetensors.{os.getppid()}-def456.tmp"
    other = tmp_path / f".config.yaml.{child.pid}-xyz.tmp"
    for path in (dead, live, other):
        path.write_bytes(b"")  # what a kill right after mkstemp leaves
    atomic_write_text(tmp_path / "model.safetensors", "new")
    assert not dead.exists() and live.exists() and other.exists()
    assert remove_stale_temporaries(tmp_path) == [other]
    assert (tmp_path / "model.safetensors").read_text() == "new"


# -- preemption signals ---------------------------------------------------------------------
@pytest.fixture
def signal_mid_step(monkeypatch):
    """``arm(sig, step)``: send ``sig`` to this process inside step ``step`` (1-based), between
    the autoencoder's update and the discriminator's (the moment where an exception used to
    leave a half-made step in the checkpoint)."""
    armed = {}
    real = AutoencoderLoss.discriminator_loss

    def discriminator_loss(self, *args, global_step, **kwargs):
        for sig in armed.pop(global_step + 1, ()):
            os.kill(os.getpid(), sig)
        return real(self, *args, global_step=global_step, **kwargs)

    monkeypatch.setattr(AutoencoderLoss, "discriminator_loss", discriminator_loss)

    def arm(sig, step, times=1):
        armed[step] = [sig] * times

    return arm


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_finishes_the_step_checkpoints_it_and_exits(
    sig, signal_mid_step, shards, reference, tmp_path
):
    from ldmkit.config import compose_config
    from ldmkit.training import train

    run_dir = tmp_path / "run"
    args = faults.stage_args(1, shards, run_dir)
    signal_mid_step(sig, 7)
    threads = torch.get_num_threads()
    try:
        with pytest.raises(TrainingInterrupted) as stopped:
            train(compose_config(args))
    finally:
        torch.set_num_threads(threads)
    name = signal.Signals(sig).name
    # the data workers are ended before the error leaves the trainer, though its traceback
    # still holds the loop's frame: a worker dying later (the same SIGTERM sent to the process
    # group) would otherwise make torch's restored SIGCHLD handler raise while the CLI prints
    assert multiprocessing.active_children() == []
    # and torch's SIGCHLD handler is not back: a child ending now (here: `true`) must not make
    # it raise for data workers the stop signal ended
    assert signal.getsignal(signal.SIGCHLD) == signal.SIG_DFL
    subprocess.run(["true"], check=True)
    assert stopped.value.exit_code == EXIT_PREEMPTED == 75
    assert str(stopped.value) == (
        f"stopped by {name} after step 7; checkpoint {run_dir / 'checkpoints' / 'step_000000007'} holds the state "
        f"after step 7; run the same command again to resume"
    )
    # exactly the state after step 7 (the discriminator's BatchNorm counters included), as
    # written by a run that checkpointed every step
    saved = ours(run_dir, 7)
    assert any(k.endswith("num_batches_tracked") for k in saved)
    assert faults.differences(reference(1, 7), saved) == []
    assert signal.getsignal(sig) is not None  # handlers restored
    assert faults.train_in_process(args) == 0
    assert faults.differences(reference(1, 12), ours(run_dir, 12)) == []


def test_sigusr1_checkpoints_and_training_goes_on(signal_mid_step, shards, reference, tmp_path):
    run_dir = tmp_path / "run"
    signal_mid_step(signal.SIGUSR1, 5)
    assert (
        faults.train_in_process(
            faults.stage_args(1, shards, run_dir, "trainer.keep_checkpoints=10")
        )
        == 0
    )
    assert faults.checkpoint_steps(run_dir) == [3, 5, 6, 9, 12]
    assert faults.differences(reference(1, 5), ours(run_dir, 5)) == []
    assert faults.differences(reference(1, 12), ours(run_dir, 12)) == []


def test_second_sigint_stops_at_once(signal_mid_step, shards, tmp_path):
    run_dir = tmp_path / "run"
    signal_mid_step(signal.SIGINT, 5, times=2)
    assert faults.train_in_process(faults.stage_args(1, shards, run_dir)) == 130  # "interrupted"
    assert faults.checkpoint_steps(run_dir) == [3]
    assert faults.invalid_checkpoints(run_dir) == []


def test_save_on_signal_false_leaves_signals_alone(signal_mid_step, shards, tmp_path):
    # Python's own SIGINT handler, whatever this process inherited: a job a shell starts in the
    # background (`.ci/run &`) begins with SIGINT ignored, and "left alone" would then mean ignored
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _interrupted_without_saving(signal_mid_step, shards, tmp_path)
    finally:
        signal.signal(signal.SIGINT, previous)


def _interrupted_without_saving(signal_mid_step, shards, tmp_path):
    signal_mid_step(signal.SIGINT, 5)
    assert (
        faults.train_in_process(
            faults.stage_args(1, shards, tmp_path / "run", "trainer.save_on_signal=false")
        )
        == 130
    )
    assert faults.checkpoint_steps(tmp_path / "run") == [3]  # nothing half-made was saved


def test_sigterm_while_building_the_latent_cache(monkeypatch, shards, reference, tmp_path):
    import ldmkit.training.latent_cache as latent_cache

    real = latent_cache.build_cache

    def build_cache(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(latent_cache, "build_cache", build_cache)
    run_dir = tmp_path / "run"
    args = faults.stage_args(2, shards, run_dir, "trainer.latent_cache=true")
    with pytest.raises(
        TrainingInterrupted, match="stopped by SIGTERM while building the latent cache; nothing"
    ):
        from ldmkit.config import compose_config
        from ldmkit.training import train

        train(compose_config(args))
    assert not (run_dir / "latent_cache" / "meta.json").exists()
    monkeypatch.setattr(latent_cache, "build_cache", real)
    assert faults.train_in_process(args) == 0
    assert (
        faults.differences(
            reference(2, None, "trainer.latent_cache=true"), ours(run_dir, 10, stage=2)
        )
        == []
    )


def test_truncated_latent_cache_chunk_is_rebuilt_with_a_warning(
    shards, reference, tmp_path, capsys
):
    """Before: every later run stopped at "cannot read checkpoint weights .../chunk_00000..."
    until the chunk was deleted by hand."""
    run_dir = tmp_path / "run"
    args = faults.stage_args(2, shards, run_dir, "trainer.latent_cache=true")
    assert faults.train_in_process([*args, "trainer.max_steps=6"]) == 0
    chunk = run_dir / "latent_cache" / "chunk_00000.safetensors"
    cut = chunk.stat().st_size // 2
    os.truncate(chunk, cut)
    capsys.readouterr()
    assert faults.train_in_process(args) == 0
    about_cache = [line for line in capsys.readouterr().err.splitlines() if "latent cache" in line]
    assert about_cache == [
        f"ldmkit train: warning: {chunk} is unreadable (the tensor offsets in its header do not "
        f"match the file's size ({cut} bytes): the file is cut short, has bytes appended, or its "
        "header is crafted); rebuilding the latent cache"
    ]
    assert (
        faults.differences(
            reference(2, None, "trainer.latent_cache=true"), ours(run_dir, 10, stage=2)
        )
        == []
    )


def test_sigterm_through_the_cli_exits_75_with_the_step_saved(shards, tmp_path):
    """A real process and its 2 DataLoader workers get SIGTERM together, as from Slurm (the
    workers die of it): exit code 75, one line saying where it stopped, the step whole."""
    run_dir = tmp_path / "run"
    args = faults.stage_args(
        1, shards, run_dir, "trainer.max_steps=1000", "trainer.checkpoint_every=2"
    )
    proc = faults.start(args, cwd=tmp_path, group=True)
    faults.signal_after(proc, run_dir, signal.SIGTERM, step=2, group=True)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, stderr[-2000:]
    line = next(
        x
        for x in stderr.splitlines()
        if x.startswith("ldmkit train: stopped by SIGTERM after step")
    )
    step = int(line.split("after step ")[1].split(";")[0])
    assert line.endswith("run the same command again to resume") and "Traceback" not in stderr
    assert (
        faults.checkpoint_steps(run_dir)[-1] == step and faults.invalid_checkpoints(run_dir) == []
    )
    # the saved step is whole: the same as a run told to stop there
    assert (
        faults.train_in_process(
            faults.stage_args(1, shards, tmp_path / "short", f"trainer.max_steps={step}")
        )
        == 0
    )
    assert faults.differences(ours(tmp_path / "short", step), ours(run_dir, step)) == []


# -- resuming with changed settings -----------------------------------------------------------
def test_changed_lr_and_max_steps_are_applied_and_named(shards, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert (
        faults.train_in_process(faults.stage_args(1, shards, run_dir, "trainer.max_steps=3")) == 0
    )
    capsys.readouterr()
    assert (
        faults.train_in_process(
            faults.stage_args(
                1,
                shards,
                run_dir,
                "trainer.max_steps=6",
                "trainer.lr=0.0005",
                "trainer.disc_lr=0.002",
            )
        )
        == 0
    )
    (note,) = [
        x
        for x in capsys.readouterr().err.splitlines()
        if x.startswith("ldmkit train: warning: resuming")
    ]
    assert "at step 3 with 3 changed setting(s), applied from here on" in note
    assert "trainer.disc_lr: None -> 0.002" in note and "trainer.lr: 0.001 -> 0.0005" in note
    assert "trainer.max_steps: 3 -> 6" in note
    state = torch.load(
        run_dir / "checkpoints" / "step_000000006" / "trainer_state.pt", weights_only=True
    )
    assert [g["lr"] for g in state["optimizers"]["autoencoder"]["param_groups"]] == [0.0005]
    assert [g["lr"] for g in state["optimizers"]["discriminator"]["param_groups"]] == [0.002]
    assert "lr: 0.0005" in (run_dir / "config.yaml").read_text()


@pytest.mark.parametrize("learn", ["true", "false"])
def test_a_changed_logvar_init_is_said_to_be_ignored_and_is(learn, shards, tmp_path, capsys):
    """loss.logvar is saved with the loss, learned or not: a resumed run keeps the checkpoint's
    value, so a changed logvar_init must not be reported as applied."""
    run_dir, learned = tmp_path / "run", f"trainer.loss.learn_logvar={learn}"
    assert faults.train_in_process(faults.stage_args(1, shards, run_dir, "trainer.max_steps=2", learned)) == 0
    capsys.readouterr()
    args = faults.stage_args(1, shards, run_dir, "trainer.max_steps=3", learned, "trainer.loss.logvar_init=2.5")
    assert faults.train_in_process(args) == 0
    (note,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("ldmkit train: warning: resuming")]
    assert "trainer.loss.logvar_init: 0.0 -> 2.5 (ignored: the checkpoint's value is kept)" in note
    weights = read_safetensors(run_dir / "checkpoints" / "step_000000003" / "training.safetensors")
    assert abs(float(weights["loss.logvar"])) < 0.1  # near its init 0, not 2.5


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ("first_stage.ch=16", "first_stage.ch: 8 -> 16"),
        ("seed=1", "seed: 0 -> 1"),
    ],
)
def test_model_or_seed_change_is_refused_naming_the_key(change, named, shards, tmp_path):
    run_dir = tmp_path / "run"
    assert (
        faults.train_in_process(faults.stage_args(1, shards, run_dir, "trainer.max_steps=3")) == 0
    )
    from ldmkit.config import compose_config
    from ldmkit.training import train

    with pytest.raises(TrainingError, match="cannot resume") as refused:
        train(compose_config(faults.stage_args(1, shards, run_dir, change)))
    assert named in str(refused.value) and "start a new run_dir" in str(refused.value)
    assert faults.checkpoint_steps(run_dir) == [3]


def test_changed_worker_count_resumes_with_one_line(shards, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert (
        faults.train_in_process(faults.stage_args(1, shards, run_dir, "trainer.max_steps=4")) == 0
    )
    capsys.readouterr()
    assert (
        faults.train_in_process(
            faults.stage_args(1, shards, run_dir, "trainer.max_steps=6", "trainer.num_workers=0")
        )
        == 0
    )
    notes = [x for x in capsys.readouterr().err.splitlines() if "data position" in x]
    assert (
        len(notes) == 1
        and "changed from 2 to 1" in notes[0]
        and "starts again from its beginning" in notes[0]
    )
    assert faults.checkpoint_steps(run_dir)[-1] == 6


# -- SIGKILL inside each write ------------------------------------------------------------------
PHASE_CASES = [
    pytest.param(1, "rename", 2, id="stage1-rename"),
    pytest.param(2, "tmp:model.safetensors", 4, id="stage2-last-pipeline-export"),
    pytest.param(
        2, "tmp:model.safetensors", 2, id="stage2-pipeline-export", marks=pytest.mark.slow
    ),
    pytest.param(1, "model.safetensors", 2, id="stage1-model", marks=pytest.mark.slow),
    pytest.param(1, "training.safetensors", 2, id="stage1-training", marks=pytest.mark.slow),
    pytest.param(1, "trainer_state.pt", 3, id="stage1-state", marks=pytest.mark.slow),
    pytest.param(1, "meta.json", 2, id="stage1-meta", marks=pytest.mark.slow),
    pytest.param(1, "prune", 1, id="stage1-prune", marks=pytest.mark.slow),
    pytest.param(1, "tmp:metrics.csv", 2, id="stage1-metrics", marks=pytest.mark.slow),
    pytest.param(1, "tmp:png", 2, id="stage1-grid", marks=pytest.mark.slow),
    pytest.param(2, "tmp:chunk", 2, id="stage2-latent-cache", marks=pytest.mark.slow),
    pytest.param(2, "trainer_state.pt", 2, id="stage2-state", marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("stage", "phase", "occurrence"), PHASE_CASES)
def test_sigkill_inside_a_write_loses_nothing(
    stage, phase, occurrence, shards, reference, tmp_path
):
    """A real SIGKILL of a process (forked from this one: no start-up cost) inside the
    write; then the same command runs to the end."""
    run_dir = tmp_path / "run"
    extra = ("trainer.latent_cache=true",) if phase == "tmp:chunk" else ()
    args = faults.stage_args(stage, shards, run_dir, *extra)
    code = faults.train_forked(args, phase=phase, occurrence=occurrence)
    assert code == -signal.SIGKILL, f"{phase} #{occurrence} was never reached (exit {code})"
    assert faults.invalid_checkpoints(run_dir) == []  # whatever was torn is not a checkpoint
    assert faults.train_in_process(args) == 0
    assert faults.leftovers(run_dir) == []  # no temporary file or folder, 0-byte or not
    expected = reference(stage, last_step(stage), *extra)
    assert faults.differences(expected, ours(run_dir, last_step(stage), stage)) == []


def test_the_write_phases_are_all_tested():
    assert {case.values[1] for case in PHASE_CASES} == set(faults.PHASES)


def test_interrupted_checkpoint_write_is_invisible(tmp_path):
    """In process: a write that fails half-way (disk error) leaves no step folder; the next
    start removes the temporary one."""
    manager = CheckpointManager(tmp_path)
    manager.save(1, model={"w": torch.ones(2)}, state={"step": 1})

    class Boom(Exception):
        pass

    def fail(*args, **kwargs):
        raise Boom

    original = torch.save
    torch.save = fail
    try:
        with pytest.raises(Boom):
            manager.save(2, model={"w": torch.zeros(2)}, state={"step": 2})
    finally:
        torch.save = original
    assert [c.step for c in manager.list()] == [1] and manager.latest().step == 1
    assert len(manager.remove_incomplete()) == 1


def test_more_readers_than_shards_is_one_warning_line(shards, tmp_path, capsys):
    """Before: a UserWarning with its source location and code line (two lines, on every rank)."""
    run_dir = tmp_path / "run"
    args = faults.stage_args(1, shards, run_dir, "trainer.max_steps=1", "trainer.num_workers=7")
    assert faults.train_in_process(args) == 0
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if "readers" in x or "warnings.warn" in x]
    assert lines == [
        f"ldmkit train: warning: {shards} split 'train' has 6 shards for 7 readers (1 ranks x 7 workers): "
        "some get no data; prepare with a smaller shard_size or use resampled=True"
    ], err
