"""Converting the paper's published architectures at full size (issue 12, item 5 figure):
time and peak memory of ``ldmkit convert compvis`` relative to the checkpoint's size.

For each preset, a model of that architecture with random weights is written in the paper's
layout (``model.diffusion_model.*``, ``first_stage_model.*`` with ``loss.*``,
``cond_stage_model.*``, an EMA copy of the denoiser under ``model_ema.*`` as the paper's
training writes it, the schedule buffers) as a ``{"state_dict": ...}`` pickle. Then
``ldmkit convert compvis CKPT --preset NAME --out DIR`` runs in a fresh process, its wall
time and peak resident memory (``ru_maxrss`` of the child) measured.

    .venv/bin/python benchmarks/compvis_convert.py --presets kl-f8 cin256-v2

Writes ``benchmarks/results/compvis_convert.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PAPER = {
    "denoiser.": "model.diffusion_model.",
    "first_stage.": "first_stage_model.",
    "conditioner.": "cond_stage_model.",
}


def write_paper_checkpoint(name: str, path: Path) -> int:
    """A random-weight checkpoint of preset ``name`` in the paper's layout; returns its bytes."""
    from ldmkit.interop import compvis
    from ldmkit.pipeline import Pipeline
    from ldmkit.plugins import get_registry

    model = compvis.load_preset(name)
    torch.manual_seed(0)
    state: dict[str, torch.Tensor] = {}
    if model.kind == "first_stage":
        node = dict(model.groups["first_stage"])
        module = get_registry().create("first_stage", node.pop("name"), **node)
        for key, value in module.state_dict().items():
            state[
                "quantize." + key[len("regularizer.") :] if key.startswith("regularizer.") else key
            ] = value
        state["loss.logvar"] = torch.zeros(())
    else:
        pipe = Pipeline.from_config(compvis.compose(model))
        for key, value in pipe.state_dict().items():
            for ours, theirs in PAPER.items():
                if key.startswith(ours):
                    rest = key[len(ours) :]
                    if ours == "first_stage." and rest.startswith("regularizer."):
                        rest = "quantize." + rest[len("regularizer.") :]
                    if (
                        ours == "conditioner."
                        and model.groups["conditioner"]["name"] == "semantic_map"
                    ):
                        rest = rest[len("rescaler.") :]
                    state[theirs + rest] = value
                    if ours == "denoiser.":
                        state["model_ema." + ("diffusion_model." + rest).replace(".", "")] = (
                            value.clone()
                        )
        state["alphas_cumprod"] = pipe.schedule.alphas_cumprod.clone()
        del pipe
    torch.save({"state_dict": state, "global_step": 0}, path)
    return path.stat().st_size


def convert(ckpt: Path, name: str, out: Path) -> dict[str, float]:
    exe = Path(sys.executable).with_name("ldmkit")
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    subprocess.run([str(exe), "convert", "compvis", str(ckpt), "--preset", name, "--out", str(out)],
                   check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB, the largest child so far
    return {"seconds": seconds, "peak_rss_mib": peak / 1024, "peak_grew": peak > before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["kl-f8", "cin256-v2"])
    parser.add_argument(
        "--json", type=Path, default=ROOT / "benchmarks/results/compvis_convert.json"
    )
    args = parser.parse_args()
    rows = []
    # the smallest first: ru_maxrss of children is a running maximum
    for name in args.presets:
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = Path(tmp) / f"{name}.ckpt"
            size = write_paper_checkpoint(name, ckpt)
            result = convert(ckpt, name, Path(tmp) / "out")
            written = sum(p.stat().st_size for p in (Path(tmp) / "out").iterdir())
        row = {"preset": name, "checkpoint_mib": size / 2**20, "written_mib": written / 2**20, **result,
               "peak_over_checkpoint": result["peak_rss_mib"] / (size / 2**20)}  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"torch": torch.__version__, "runs": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
