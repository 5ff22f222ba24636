"""The paper's central results in miniature, in one command (issue 14): LDM-f at equal
stage-2 compute (``compression_tradeoff.py``), the rate-distortion of the first stages
(``rate_distortion.py``) and the guidance sweep (``guidance_sweep.py``, on the LDM-4 model the
first part trains), each training run under the same ``--minutes`` budget:

    .venv/bin/python benchmarks/paper_results.py --minutes 5

* compression trade-off: every stage-2 run trains ``--minutes``, its first stage half that;
* rate-distortion: every first stage trains ``--minutes`` / 2;
* guidance sweep: samples the compression study's LDM-4 pipeline.

Each part writes its JSON to ``benchmarks/results/paper_results/`` and its plots to
``docs/images/paper_results/``; ``summary.json`` there holds each part's wall time.
benchmarks/README.md says how long the set takes on the project's 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--minutes", type=float, default=5.0, help="training minutes per stage-2 run"
    )
    parser.add_argument("--jobs", type=int, default=2, help="trainings at once (one thread each)")
    parser.add_argument(
        "--parts",
        nargs="+",
        default=["compression", "rate_distortion", "guidance"],
        choices=["compression", "rate_distortion", "guidance"],
    )
    parser.add_argument("--out", type=Path, default=ROOT / "runs/paper_results")
    args = parser.parse_args(argv)
    python = sys.executable
    results, images = ROOT / "benchmarks/results/paper_results", ROOT / "docs/images/paper_results"
    results.mkdir(parents=True, exist_ok=True)
    commands = {
        "compression": [python, str(HERE / "compression_tradeoff.py"), f"--minutes={args.minutes}",
                        f"--jobs={args.jobs}", "--evals=2", "--per-class=10", "--sample-steps=20",
                        f"--out={args.out / 'compression'}", f"--json={results / 'compression_tradeoff.json'}",
                        f"--plot={images / 'compression_tradeoff.png'}"],
        "rate_distortion": [python, str(HERE / "rate_distortion.py"), f"--minutes={args.minutes / 2}",
                            f"--jobs={args.jobs}", "--eval-images=1000", f"--out={args.out / 'rate_distortion'}",
                            f"--json={results / 'rate_distortion.json'}", f"--plot={images / 'rate_distortion.png'}"],
        "guidance": [python, str(HERE / "guidance_sweep.py"),
                     f"--pipeline={args.out / 'compression' / 'ldm_f4' / 'pipeline'}", "--per-class=10",
                     "--steps=25", f"--threads={args.jobs}", f"--json={results / 'guidance_sweep.json'}",
                     f"--plot={images / 'guidance_sweep.png'}"],
    }  # fmt: skip
    timings: dict[str, float] = {}
    started = time.perf_counter()
    for part in args.parts:
        print(f"== {part}: {' '.join(commands[part][1:])}", flush=True)
        t0 = time.perf_counter()
        subprocess.run(commands[part], check=True, cwd=ROOT)
        timings[part] = round((time.perf_counter() - t0) / 60, 1)
        print(f"== {part}: {timings[part]} min", flush=True)
    summary = {
        "minutes": args.minutes,
        "jobs": args.jobs,
        "part_wall_minutes": timings,
        "total_wall_minutes": round((time.perf_counter() - started) / 60, 1),
    }
    out = results / "summary.json"
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
