"""Converting the paper's published architectures at full size (issue 12, item 5 figure):
time and peak memory of ``ldmkit convert compvis`` relative to the checkpoint's size.

For each preset, a model of that architecture with random weights is written in the paper's
layout (``model.diffusion_model.*``, ``first_stage_model.*`` with ``loss.*``,
``cond_stage_model.*``, an EMA copy of the denoiser under ``model_ema.*`` as the paper's
training writes it, the schedule buffers) as a ``{"state_dict": ...}`` pickle. Then
``ldmkit convert compvis CKPT --preset NAME --out DIR`` runs in a fresh process, its wall
time and peak resident memory (``ru_maxrss`` of that process alone: each command runs under
a fresh wrapper process that reports its only child's peak) measured. Stable Diffusion v1
(``sd-v1``) gets a CLIP ViT-L/14-sized text model folder (config and tokenizer, no weights:
those come from the checkpoint) for ``--text-encoder``.

Pipelines that diffusers can hold are then written out with ``ldmkit convert to-diffusers``
and read back with ``ldmkit convert from-diffusers``, each timed and measured the same way.

    .venv/bin/python benchmarks/compvis_convert.py             # every preset
    .venv/bin/python benchmarks/compvis_convert.py --presets kl-f8 cin256-v2

Writes ``benchmarks/results/compvis_convert.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PAPER = {
    "denoiser.": "model.diffusion_model.",
    "first_stage.": "first_stage_model.",
    "conditioner.": "cond_stage_model.",
}


def write_paper_checkpoint(name: str, path: Path, text_encoder: Path | None) -> int:
    """A random-weight checkpoint of preset ``name`` in the paper's layout; returns its bytes."""
    from ldmkit.interop import compvis
    from ldmkit.pipeline import Pipeline
    from ldmkit.plugins import get_registry

    model = compvis.translation(None, name, text_encoder=text_encoder)
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
                    if ours == "conditioner." and text_encoder is not None:
                        # Stable Diffusion's FrozenCLIPEmbedder: transformers 4's names
                        rest = "transformer.text_model." + rest[len("transformer.") :].removeprefix(
                            "text_model."
                        )
                    state[theirs + rest] = value
                    if ours == "denoiser.":
                        state["model_ema." + ("diffusion_model." + rest).replace(".", "")] = (
                            value.clone()
                        )
        state["alphas_cumprod"] = pipe.schedule.alphas_cumprod.clone()
        if text_encoder is not None:
            state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
        del pipe
    torch.save({"state_dict": state, "global_step": 0}, path)
    return path.stat().st_size


# runs one command as its only child and prints that child's wall time and peak RSS (KiB)
MEASURE = """
import json, resource, subprocess, sys, time
start = time.perf_counter()
done = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
seconds = time.perf_counter() - start
if done.returncode:
    sys.exit(done.stderr[-2000:])
print(json.dumps({"seconds": seconds, "peak_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def measured(*args: str) -> dict[str, float]:
    """Run ``ldmkit ARGS`` in a fresh process: its wall time and peak resident memory."""
    exe = Path(sys.executable).with_name("ldmkit")
    done = subprocess.run([sys.executable, "-c", MEASURE, str(exe), *args], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"ldmkit {' '.join(args)} failed: {done.stderr.strip()}")
    result = json.loads(done.stdout)
    return {"seconds": result["seconds"], "peak_rss_mib": result["peak_kib"] / 1024}


def folder_mib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def diffusers_reason(name: str, text_encoder: Path | None) -> str | None:
    """None when the preset's pipeline converts to diffusers, else why not."""
    from ldmkit.interop import compvis, diffusers_format

    model = compvis.translation(None, name, text_encoder=text_encoder)
    if model.kind != "pipeline":
        return "a first stage alone"
    first, unet = model.groups["first_stage"], model.groups["denoiser"]
    try:
        diffusers_format.diffusers_unet_config(dict(unet), 32)
        diffusers_format.diffusers_vae_config(dict(first), 1.0)
    except diffusers_format.ConversionError as err:
        return str(err).split(";")[0]
    return None


def clip_folder(root: Path) -> Path:
    """CLIP ViT-L/14's text model config and a tokenizer (no weights)."""
    from ldmkit_text.testing import write_tiny_clip

    return write_tiny_clip(root / "clip-vit-large-patch14", hidden=768, layers=12, heads=12,
                           intermediate=3072, vocab_size=49408, weights=False)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=None, help="default: every preset")
    parser.add_argument(
        "--json", type=Path, default=ROOT / "benchmarks/results/compvis_convert.json"
    )
    args = parser.parse_args()
    from ldmkit.interop import compvis

    rows = []
    for name in args.presets or compvis.preset_names():
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            text = clip_folder(tmp) if compvis.load_preset(name).groups.get("conditioner", {}).get("name") == "clip_text" else None
            ckpt = tmp / f"{name}.ckpt"
            size = write_paper_checkpoint(name, ckpt, text)
            extra = ["--text-encoder", str(text)] if text else []
            result = measured("convert", "compvis", str(ckpt), "--preset", name, "--out", str(tmp / "out"), *extra)
            row = {"preset": name, "checkpoint_mib": size / 2**20, "written_mib": folder_mib(tmp / "out"), **result,
                   "peak_over_checkpoint": result["peak_rss_mib"] / (size / 2**20)}  # fmt: skip
            ckpt.unlink()
            reason = diffusers_reason(name, text)
            if reason is None:
                to = measured("convert", "to-diffusers", str(tmp / "out"), "--out", str(tmp / "diffusers"))
                back = measured("convert", "from-diffusers", str(tmp / "diffusers"), "--out", str(tmp / "back"))
                row["to_diffusers"] = {**to, "written_mib": folder_mib(tmp / "diffusers")}
                row["from_diffusers"] = {**back, "written_mib": folder_mib(tmp / "back")}
            else:
                row["diffusers"] = reason
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"torch": torch.__version__, "runs": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
