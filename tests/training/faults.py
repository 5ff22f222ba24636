"""Fault-injection helpers: tiny real-shard runs of both stages through `ldmkit train`,
killed (SIGKILL, at random moments or inside a chosen write), stopped by signals, resumed,
and compared tensor by tensor with a run that was never interrupted.

Used by tests/test_faults.py, tests/training/test_exact_resume.py and
benchmarks/fault_injection.py (which kills at many random points and prints the table in
docs/reliability.md).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]

# what both stages share: real shards, 2 DataLoader workers, shuffling windows smaller than a
# worker's shards (several windows per epoch), several epochs, grids, validation
COMMON = [
    "data=image_folder",
    "image_size=16",
    "data.shuffle_buffer=8",
    "data.flip=true",
    "trainer.num_workers=2",
    "trainer.batch_size=4",
    "trainer.num_threads=1",
    "trainer.tensorboard=false",
    "trainer.progress=false",
    "trainer.val_split=val",
    "trainer.keep_checkpoints=3",
    "trainer.log_every=1",
]
STAGE1 = [
    "stage=autoencoder",
    "first_stage=kl_tiny",
    "trainer=autoencoder_tiny",
    "trainer.max_steps=12",
    "trainer.checkpoint_every=3",
    "trainer.sample_every=4",
    "trainer.val_every=4",
    "trainer.loss.disc_start=4",
]
# the first stage is an untrained KL model: without the cache every step draws posterior
# samples from the global generator; the conditioner drops labels (guidance dropout)
STAGE2 = [
    "stage=ldm",
    "first_stage=kl_tiny",
    "trainer=ldm_tiny",
    "denoiser=unet_tiny",
    "conditioner=class_label",
    "conditioner.num_classes=3",
    "conditioner.embed_dim=16",
    "conditioner.drop_rate=0.3",
    "trainer.max_steps=10",
    "trainer.checkpoint_every=3",
    "trainer.sample_every=4",
    "trainer.val_every=4",
]


def make_shards(root: Path) -> Path:
    """3 classes x 10 noise images (16x16 after cropping), 24 train + 6 val, 4 per shard."""
    from ldmkit.data import prepare
    from tests.data.conftest import make_image_folder

    make_image_folder(root / "images", per_class=10, size=(18, 17))
    prepare(
        "image_folder",
        root / "shards",
        path=str(root / "images"),
        shard_size=4,
        val_fraction=0.2,
        progress=False,
    )
    return root / "shards"


def stage_args(stage: int, shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        *(STAGE1 if stage == 1 else STAGE2),
        *COMMON,
        f"data.path={shards}",
        f"run_dir={run_dir}",
        *extra,
    ]


def command(args: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "ldmkit.cli", "train", *args]


def environment() -> dict[str, str]:
    """This checkout's tests on the path, before the code this interpreter imports (a
    worktree's src/ on PYTHONPATH, not the installed copy)."""
    paths = [str(REPO), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, paths))}


def train_in_process(args: Sequence[str]) -> int:
    """``ldmkit train ARGS`` in this process (no interpreter start-up: the cheap way to run
    references and resumes; the same code path as the subprocess)."""
    from ldmkit.cli import main

    threads = torch.get_num_threads()
    try:
        return main(["train", *args])
    finally:
        torch.set_num_threads(threads)


def torchrun_worker(folder: Path, worker: str, args: Sequence[str]) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=2 FOLDER/worker.py FOLDER ARGS`` (``worker``:
    the script's source, written there), asserted to exit 0."""
    (folder / "worker.py").write_text(worker)
    torchrun = Path(sys.executable).with_name("torchrun")
    done = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node=2", str(folder / "worker.py"), str(folder), *args],
        capture_output=True, text=True, env=environment(), timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def run(args: Sequence[str], *, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        command(args), cwd=cwd, env=environment(), capture_output=True, text=True, timeout=timeout
    )


def start(
    args: Sequence[str],
    *,
    cwd: Path,
    driver: Path | None = None,
    phase: str = "",
    occurrence: int = 0,
    group: bool = False,
) -> subprocess.Popen:
    """``ldmkit train ARGS`` in the background (under :data:`DRIVER` when given: it SIGKILLs
    itself at ``occurrence`` of ``phase``); ``group``: in a process group of its own, so a
    signal can reach it and its DataLoader workers together (Ctrl-C, Slurm)."""
    cmd = (
        command(args)
        if driver is None
        else [sys.executable, str(driver), phase, str(occurrence), *args]
    )
    return subprocess.Popen(
        cmd,
        cwd=cwd,
        env=environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=group,
    )


def checkpoint_steps(run_dir: Path) -> list[int]:
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(int(p.name[5:]) for p in folder.iterdir() if re.fullmatch(r"step_\d+", p.name))


def wait_for(predicate: Callable[[], bool], proc: subprocess.Popen, timeout: float = 240) -> bool:
    """True once ``predicate()`` holds; False if the process ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return predicate()
        time.sleep(0.01)
    proc.kill()
    raise AssertionError(f"timed out after {timeout}s")


def kill_after(proc: subprocess.Popen, run_dir: Path, *, step: int, delay: float) -> bool:
    """SIGKILL ``proc`` ``delay`` seconds after its checkpoint of ``step`` (or a later one)
    exists. False when the run ended before it could be killed."""
    reached = wait_for(lambda: any(s >= step for s in checkpoint_steps(run_dir)), proc)
    if reached and delay > 0:
        end = time.monotonic() + delay
        while time.monotonic() < end and proc.poll() is None:
            time.sleep(0.005)
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


def signal_after(
    proc: subprocess.Popen,
    run_dir: Path,
    sig: int,
    *,
    step: int,
    delay: float = 0.0,
    group: bool = False,
) -> None:
    """Send ``sig`` (to the process group with ``group``) ``delay`` seconds after the
    checkpoint of ``step`` exists (training is under way)."""
    if not wait_for(lambda: any(s >= step for s in checkpoint_steps(run_dir)), proc):
        raise AssertionError(f"the run ended before step {step}: {proc.stderr.read()[-2000:]}")
    time.sleep(delay)
    if group:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)


# -- comparing runs ------------------------------------------------------------------------
def checkpoint_contents(folder: Path) -> dict[str, Any]:
    """Every tensor and value of a checkpoint folder (and of the exported pipeline beside
    the run's checkpoints, for stage 2), flattened to dotted keys. Wall-clock time and the
    config (which records the command's intervals) are left out."""
    from safetensors.torch import load_file

    out: dict[str, Any] = {}
    for name in ("model.safetensors", "training.safetensors"):
        if (folder / name).is_file():
            out.update({f"{name}:{k}": v for k, v in load_file(folder / name).items()})
    state = torch.load(folder / "trainer_state.pt", map_location="cpu", weights_only=True)
    state.pop("train_seconds", None)
    out.update(_flatten(state, "trainer_state.pt:"))
    return out


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out
    if isinstance(value, list | tuple) and any(
        isinstance(v, Mapping | list | tuple | torch.Tensor) for v in value
    ):
        out = {}
        for i, item in enumerate(value):
            out.update(_flatten(item, f"{prefix}{i}."))
        return out
    return {prefix.rstrip("."): value}


def differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """Keys whose values are not bitwise equal (tensors: ``torch.equal``), or on one side only."""
    diff = sorted(set(a) ^ set(b))
    for key in sorted(set(a) & set(b)):
        x, y = a[key], b[key]
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            same = (
                isinstance(x, torch.Tensor)
                and isinstance(y, torch.Tensor)
                and x.dtype == y.dtype
                and torch.equal(x, y)
            )
        else:
            same = x == y
        if not same:
            diff.append(key)
    return diff


def final_contents(run_dir: Path, step: int) -> dict[str, Any]:
    contents = checkpoint_contents(run_dir / "checkpoints" / f"step_{step:09d}")
    pipeline = run_dir / "pipeline" / "model.safetensors"
    if pipeline.is_file():
        from safetensors.torch import load_file

        contents.update({f"pipeline:{k}": v for k, v in load_file(pipeline).items()})
    return contents


def leftovers(run_dir: Path) -> list[Path]:
    """Temporary files or folders anywhere under ``run_dir`` (what a kill can leave)."""
    found = []
    for path in run_dir.rglob("*"):
        if (
            path.name.startswith(".tmp-")
            or re.fullmatch(r"\..+\.tmp", path.name)
            or path.name.endswith(".partial")
        ):
            found.append(path)
    return found


def invalid_checkpoints(run_dir: Path) -> list[str]:
    from ldmkit.training.checkpoint import validate

    problems = []
    for step in checkpoint_steps(run_dir):
        problem = validate(run_dir / "checkpoints" / f"step_{step:09d}", verify=True)
        if problem:
            problems.append(f"step {step}: {problem}")
    return problems


# -- killing inside a chosen write ---------------------------------------------------------
PHASES = {
    # checkpoint folder (.tmp-step_N-PID/), in the order CheckpointManager.save writes it
    "model.safetensors": "torn model.safetensors in the checkpoint being written",
    "training.safetensors": "torn training.safetensors in the checkpoint being written",
    "trainer_state.pt": "torn trainer_state.pt in the checkpoint being written",
    "meta.json": "after meta.json, before the folder's rename",
    "rename": "at the rename of the finished folder",
    "prune": "while deleting the oldest checkpoint",
    # files replaced through ldmkit.io.atomic_path: killed right after the temporary is created
    "tmp:model.safetensors": "exporting <run_dir>/pipeline/ (0-byte temporary)",
    "tmp:metrics.csv": "rewriting metrics.csv",
    "tmp:png": "writing an image grid",
    "tmp:chunk": "building the latent cache",
}


def install_kill(phase: str, occurrence: int) -> None:
    """Make this process SIGKILL itself at the ``occurrence``-th time it reaches ``phase``
    (see :data:`PHASES`); torn phases first cut the file being written in half."""
    import shutil
    import tempfile

    import safetensors.torch as st

    import ldmkit.training.latent_cache as lc
    import ldmkit.training.state as ck

    seen = [0]

    def due() -> bool:
        seen[0] += 1
        return seen[0] == occurrence

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def tear(path: Any) -> None:
        os.truncate(path, os.path.getsize(path) // 2)
        die()

    lc.CHUNK_SIZE = 8  # several chunks, so a kill can land between them
    if phase in ("model.safetensors", "training.safetensors"):
        real_save_file = st.save_file

        def save_file(tensors, filename, metadata=None):
            real_save_file(tensors, filename, metadata=metadata)
            if ".tmp-step_" in str(filename) and os.path.basename(filename) == phase and due():
                tear(filename)

        st.save_file = save_file
    elif phase == "trainer_state.pt":
        real_torch_save = torch.save

        def torch_save(obj, f, *args, **kwargs):
            real_torch_save(obj, f, *args, **kwargs)
            if str(f).endswith(phase) and due():
                tear(f)

        torch.save = torch_save
    elif phase == "meta.json":
        real_fsync = ck._fsync_file

        def fsync_file(path):
            real_fsync(path)
            if path.name == "meta.json" and due():
                die()

        ck._fsync_file = fsync_file
    elif phase == "rename":
        real_replace = os.replace

        def replace(src, dst):
            if (
                ".tmp-step_" in str(src)
                and os.path.basename(str(dst)).startswith("step_")
                and due()
            ):
                die()
            real_replace(src, dst)

        os.replace = replace
    elif phase == "prune":
        real_rmtree = shutil.rmtree

        def rmtree(path, *args, **kwargs):
            if ".tmp-pruned-" in str(path) and due():
                die()
            real_rmtree(path, *args, **kwargs)

        shutil.rmtree = rmtree
    elif phase.startswith("tmp:"):
        name = phase[4:]
        real_mkstemp = tempfile.mkstemp

        def mkstemp(*args, prefix=None, **kwargs):
            result = real_mkstemp(*args, prefix=prefix, **kwargs)
            if prefix and name in prefix and due():
                die()
            return result

        tempfile.mkstemp = mkstemp
    else:
        raise ValueError(f"unknown phase {phase!r}; expected one of {sorted(PHASES)}")


def train_forked(args: Sequence[str], *, phase: str, occurrence: int) -> int:
    """``ldmkit train ARGS`` in a child forked from this process (everything already
    imported: no interpreter start-up), which SIGKILLs itself at ``occurrence`` of ``phase``.
    Returns the child's exit code, or minus the signal that ended it."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into the caller (pytest)
        code = 1
        try:
            install_kill(phase, occurrence)
            from ldmkit.cli import main

            code = main(["train", *args])
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


# the same, as a separate interpreter (benchmarks/fault_injection.py)
DRIVER = textwrap.dedent('''
    """Run `ldmkit train ARGS`, SIGKILLing this process at OCCURRENCE of PHASE."""
    import sys

    from tests.training.faults import install_kill

    install_kill(sys.argv[1], int(sys.argv[2]))
    from ldmkit.cli import main

    sys.exit(main(["train", *sys.argv[3:]]))
''')


def write_driver(folder: Path) -> Path:
    path = folder / "kill_driver.py"
    path.write_text(DRIVER)
    return path
