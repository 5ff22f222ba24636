"""Fault injection at scale: `ldmkit train` on real shards (2 DataLoader workers, shuffling,
augmentation, grids, validation; stage 2 with condition dropout, with and without the latent
cache) is killed with SIGKILL at random moments, killed inside each kind of write, stopped
by SIGTERM / SIGINT sent to its whole process group, asked to checkpoint by SIGUSR1, and
given damaged checkpoint files; after each fault the *same command* is run again and the
final checkpoint (every tensor: weights, EMA, optimizer states, buffers, random streams,
data position) and the exported pipeline are compared with an uninterrupted run.

    python benchmarks/fault_injection.py --kills 24 --seed 0 \
        --out benchmarks/results/fault_injection.json

Prints the table of docs/reliability.md. Every run is a real subprocess, so on a 2-core
machine this takes 10-20 minutes. The harness lives in tests/training/faults.py (shared with
tests/test_faults.py and tests/training/test_exact_resume.py).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.training import faults  # noqa: E402

VARIANTS = {
    "stage 1": (1, ()),
    "stage 2": (2, ()),
    "stage 2 + latent cache": (2, ("trainer.latent_cache=true",)),
}
LAST_STEP = {1: 12, 2: 10}
PHASE_STAGE = {"tmp:model.safetensors": 2, "tmp:chunk": 2}
DAMAGES = {
    "trainer_state.pt: one byte flipped": ("trainer_state.pt", "flip"),
    "trainer_state.pt: cut in half": ("trainer_state.pt", "cut"),
    "meta.json: cut in half": ("meta.json", "cut"),
    "meta.json: empty": ("meta.json", "empty"),
    "model.safetensors: one byte flipped": ("model.safetensors", "flip"),
    "training.safetensors: cut in half": ("training.safetensors", "cut"),
    "config.yaml: garbage": ("config.yaml", "garbage"),
}


def damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0xFF
    elif how == "cut":
        data = data[: len(data) // 2]
    elif how == "empty":
        data = bytearray()
    else:
        data = bytearray(b"\x00not what was written\xff" * 7)
    path.write_bytes(bytes(data))


def where_it_landed(run_dir: Path) -> str:
    """What the killed process was doing, from what it left on disk."""
    left = faults.leftovers(run_dir)
    names = [p.name for p in left]
    if any(n.startswith(".tmp-step_") for n in names):
        return "inside a checkpoint write"
    if any(n.startswith(".tmp-pruned-") or n.startswith(".tmp-old-") for n in names):
        return "deleting an old checkpoint"
    for path in left:
        if path.parent.name == "pipeline":
            return "exporting the pipeline"
        if path.parent.name == "latent_cache":
            return "building the latent cache"
        if path.parent.name == "images":
            return "writing an image grid"
        if "metrics.csv" in path.name:
            return "rewriting metrics.csv"
        return f"writing {path.name}"
    cache = run_dir / "latent_cache"
    if cache.is_dir() and not (cache / "meta.json").is_file():
        return "building the latent cache"
    if not faults.checkpoint_steps(run_dir):
        return "before the first checkpoint"
    return "in a step, a grid or validation"


class Bench:
    def __init__(self, root: Path, seed: int) -> None:
        self.root = root
        self.rng = random.Random(seed)
        self.shards = faults.make_shards(root / "data")
        self.references: dict[str, dict] = {}
        self.rows: list[dict] = []
        self.counter = 0

    def args(self, variant: str, run_dir: Path, *extra: str) -> list[str]:
        stage, base = VARIANTS[variant]
        return faults.stage_args(stage, self.shards, run_dir, *base, *extra)

    def reference(self, variant: str) -> dict:
        if variant not in self.references:
            run_dir = self.root / f"reference-{len(self.references)}"
            done = faults.run(self.args(variant, run_dir), cwd=self.root)
            assert done.returncode == 0, done.stderr[-3000:]
            self.references[variant] = faults.final_contents(
                run_dir, LAST_STEP[VARIANTS[variant][0]]
            )
        return self.references[variant]

    def fresh(self) -> Path:
        self.counter += 1
        return self.root / f"run-{self.counter:03d}"

    def finish(self, row: dict, variant: str, args: list[str], run_dir: Path) -> dict:
        """Run the same command to the end; compare with the uninterrupted run."""
        row["invalid_checkpoints_after_fault"] = faults.invalid_checkpoints(run_dir)
        done = faults.run(args, cwd=self.root)
        row["resume_exit_code"] = done.returncode
        row["resume_warnings"] = [
            x
            for x in done.stderr.splitlines()
            if "warning:" in x and "first_stage.checkpoint" not in x
        ]
        last = LAST_STEP[VARIANTS[variant][0]]
        if done.returncode == 0:
            row["differing"] = faults.differences(
                self.reference(variant), faults.final_contents(run_dir, last)
            )
        else:
            row["differing"] = [f"resume failed: {done.stderr[-500:]}"]
        row["leftovers"] = [str(p.relative_to(run_dir)) for p in faults.leftovers(run_dir)]
        row["bitwise_equal"] = done.returncode == 0 and not row["differing"]
        self.rows.append(row)
        shutil.rmtree(run_dir, ignore_errors=True)
        status = "bitwise-equal" if row["bitwise_equal"] else f"DIFFERENT {row['differing'][:3]}"
        print(
            f"  {row['fault']:<32} {variant:<24} {row.get('detail', ''):<60} -> {status}",
            flush=True,
        )
        return row

    # -- faults --------------------------------------------------------------------------
    def random_kill(self, variant: str) -> None:
        stage = VARIANTS[variant][0]
        every = self.rng.choice([1, 3])  # every step: more kills land inside checkpoint writes
        run_dir = self.fresh()
        args = self.args(variant, run_dir, f"trainer.checkpoint_every={every}")
        kills = []
        for _ in range(self.rng.choice([1, 1, 2])):
            proc = faults.start(args, cwd=self.root)
            if self.rng.random() < 0.25:  # anywhere from start-up on
                delay = self.rng.uniform(1.0, 7.0)
                end = time.monotonic() + delay
                while time.monotonic() < end and proc.poll() is None:
                    time.sleep(0.005)
                killed = proc.poll() is None
                if killed:
                    proc.kill()
                    proc.wait()
                how = f"{delay:.2f}s after start"
            else:
                after = self.rng.randint(1, LAST_STEP[stage] - 2)
                delay = self.rng.uniform(0.0, 0.6)
                killed = faults.kill_after(proc, run_dir, step=after, delay=delay)
                how = f"{delay:.2f}s after checkpoint {after}"
            if killed:
                steps = faults.checkpoint_steps(run_dir)
                kills.append(
                    {
                        "how": how,
                        "landed": where_it_landed(run_dir),
                        "last_checkpoint": steps[-1] if steps else None,
                    }
                )
        if not kills:
            return
        detail = "; ".join(f"{k['how']}: {k['landed']}" for k in kills)
        self.finish(
            {
                "fault": "SIGKILL at a random moment",
                "variant": variant,
                "kills": kills,
                "checkpoint_every": every,
                "detail": detail[:60],
            },
            variant,
            args,
            run_dir,
        )

    def phase_kill(self, phase: str) -> None:
        stage = PHASE_STAGE.get(phase, 1)
        variant = (
            "stage 2 + latent cache"
            if phase == "tmp:chunk"
            else ("stage 2" if stage == 2 else "stage 1")
        )
        run_dir = self.fresh()
        args = self.args(variant, run_dir)
        driver = faults.write_driver(self.root)
        occurrence = 1 if phase in ("prune",) else 2
        proc = faults.start(args, cwd=self.root, driver=driver, phase=phase, occurrence=occurrence)
        proc.communicate(timeout=600)
        row = {
            "fault": "SIGKILL inside a write",
            "variant": variant,
            "phase": phase,
            "detail": faults.PHASES[phase],
            "killed": proc.returncode == -signal.SIGKILL,
            "landed": where_it_landed(run_dir),
        }
        self.finish(row, variant, args, run_dir)

    def stop_signal(self, sig: int, variant: str) -> None:
        stage = VARIANTS[variant][0]
        run_dir = self.fresh()
        args = self.args(variant, run_dir)
        proc = faults.start(args, cwd=self.root, group=True)
        after = self.rng.randint(1, LAST_STEP[stage] - 4)
        delay = self.rng.uniform(0.0, 0.4)
        name = signal.Signals(sig).name
        target = "main process" if sig == signal.SIGUSR1 else "process group"
        faults.signal_after(
            proc, run_dir, sig, step=after, delay=delay, group=sig != signal.SIGUSR1
        )
        _, stderr = proc.communicate(timeout=600)
        said = [x for x in stderr.splitlines() if x.startswith("ldmkit train: stopped by")]
        row = {
            "fault": f"{name} to the {target}",
            "variant": variant,
            "exit_code": proc.returncode,
            "message": said,
            "checkpoints": faults.checkpoint_steps(run_dir),
            "detail": f"{delay:.2f}s after checkpoint {after}: exit {proc.returncode}",
            "stderr_tail": stderr[-1500:] if proc.returncode not in (0, 75) else "",
        }
        self.finish(row, variant, args, run_dir)

    def damaged_file(self, label: str) -> None:
        name, how = DAMAGES[label]
        run_dir = self.fresh()
        args = self.args("stage 1", run_dir)
        first = faults.run([*args, "trainer.max_steps=6"], cwd=self.root)
        assert first.returncode == 0, first.stderr[-2000:]
        damage(run_dir / "checkpoints" / "step_000000006" / name, how)
        row = {"fault": "damaged checkpoint file", "variant": "stage 1", "detail": label}
        self.finish(row, "stage 1", args, run_dir)
        row["one_warning_naming_the_file"] = (
            sum("skipping unusable checkpoint" in w and name in w for w in row["resume_warnings"])
            == 1
        )


def code_digest() -> str:
    """Of every Python file the runs execute: other work on the same checkout must not change
    the code between the reference runs and the faulted ones."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted([*REPO.glob("src/**/*.py"), *REPO.glob("plugins/*/src/**/*.py")]):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def table(rows: list[dict]) -> str:
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        groups[row["fault"]].append(row)
    how = {
        "SIGKILL at a random moment": "`kill -9` after checkpoint k (random) + 0-0.6 s, or 1-7 s after start; 1 or 2 kills per run; checkpoints every 1 or 3 steps",
        "SIGKILL inside a write": "the process SIGKILLs itself inside the write (a torn file where the write is a file): "
        + ", ".join(sorted(faults.PHASES)),
        "SIGTERM to the process group": "`kill -TERM -PGID` (main process and DataLoader workers, as Slurm does) at a random step",
        "SIGINT to the process group": "`kill -INT -PGID` (Ctrl-C) at a random step",
        "SIGUSR1 to the main process": "`kill -USR1 PID` at a random step",
        "damaged checkpoint file": "newest checkpoint's file flipped / cut / emptied / overwritten: "
        + ", ".join(DAMAGES),
    }
    lines = ["| fault | how injected | times | outcome |", "|---|---|---|---|"]
    for fault, items in groups.items():
        equal = sum(r["bitwise_equal"] for r in items)
        kills = sum(len(r.get("kills", [])) for r in items) or len(items)
        outcome = f"{equal} of {len(items)} resumed bitwise-equal"
        if fault.startswith(("SIGTERM", "SIGINT")):
            codes = Counter(r["exit_code"] for r in items)
            outcome += f"; exit codes {dict(codes)}; stop line printed {sum(bool(r['message']) for r in items)}x"
        if fault == "SIGUSR1 to the main process":
            outcome += (
                f"; exit codes {dict(Counter(r['exit_code'] for r in items))}, training went on"
            )
        if fault == "damaged checkpoint file":
            outcome += f"; one warning naming the file: {sum(r.get('one_warning_naming_the_file', False) for r in items)}/{len(items)}"
        if fault.startswith("SIGKILL"):
            landed = Counter(
                k["landed"] for r in items for k in r.get("kills", [{"landed": r.get("landed")}])
            )
            outcome += "; landed: " + ", ".join(f"{v}x {k}" for k, v in landed.most_common())
        left = sum(bool(r["leftovers"]) for r in items)
        outcome += f"; temporary files left after the rerun: {left}"
        times = (
            f"{kills} kills in {len(items)} runs"
            if fault == "SIGKILL at a random moment"
            else str(len(items))
        )
        lines.append(f"| {fault} | {how.get(fault, '')} | {times} | {outcome} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=24, help="random-kill runs (1-2 kills each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", type=Path, default=REPO / "benchmarks" / "results" / "fault_injection.json"
    )
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=["random", "phases", "signals", "damage"]
    )
    args = parser.parse_args()
    started = time.time()
    code_before = code_digest()
    with tempfile.TemporaryDirectory(prefix="ldmkit-faults-") as tmp:
        bench = Bench(Path(tmp), args.seed)
        for variant in VARIANTS:
            bench.reference(variant)
        print(f"references done in {time.time() - started:.0f}s", flush=True)
        if "random" not in args.skip:
            names = list(VARIANTS)
            for i in range(args.kills):
                bench.random_kill(names[i % len(names)])
        if "phases" not in args.skip:
            for phase in faults.PHASES:
                bench.phase_kill(phase)
        if "signals" not in args.skip:
            for sig, variants in (
                (signal.SIGTERM, list(VARIANTS)),
                (signal.SIGINT, list(VARIANTS)),
                (signal.SIGUSR1, ["stage 1", "stage 2"]),
            ):
                for variant in variants:
                    bench.stop_signal(sig, variant)
        if "damage" not in args.skip:
            for label in DAMAGES:
                bench.damaged_file(label)
        rows = bench.rows
    code_after = code_digest()
    if code_after != code_before:
        print(
            "WARNING: the code changed while the benchmark ran; the comparisons are not valid",
            flush=True,
        )
    result = {
        "seconds": round(time.time() - started),
        "code": [code_before, code_after],
        "rows": rows,
        "table": table(rows),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print()
    print(result["table"])
    print(
        f"\n{sum(r['bitwise_equal'] for r in rows)} of {len(rows)} faulted runs ended bitwise-equal "
        f"({result['seconds']}s); written to {args.out}"
    )


if __name__ == "__main__":
    main()
