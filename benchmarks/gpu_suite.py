"""GPU readiness in one command: every CUDA-only test, the races against diffusers in bf16,
and the paper-size UNet's train step (issue 13).

    python benchmarks/gpu_suite.py --json benchmarks/results/gpu_suite.json \\
        --markdown benchmarks/results/gpu_suite.md

Where CUDA exists it runs, in this order, within ``--budget-s`` (540 s: a section that would
start later is skipped and listed, so one command ends inside a 10-minute device call):

1. ``pytest -m cuda`` — attention kernels (SDPA flash / memory-efficient, xformers, math,
   chunked) in fp32/bf16/fp16, LDM and autoencoder training steps under bf16/fp16 autocast
   (the fp16 loss scaler checkpointed), bf16 vs fp32 sampling, a one-GPU NCCL ``torchrun``;
2. the measured bf16 matrix-product peak (8192^3), the yardstick for MFU;
3. UNet train step, ldmkit vs diffusers ``UNet2DConditionModel`` with the same weights,
   interleaved: each default (ldmkit ``precision=auto`` = bf16 autocast, diffusers float32),
   bf16 vs bf16 (both autocast) and fp32 vs fp32; time per step, peak memory, MFU; in the
   bf16 modes also ldmkit's step on its bf16 working weights (``trainer.bf16_weights=true``,
   which ``auto`` leaves off on CUDA until this measures it);
4. end-to-end sampling (conditioner + 50 DDIM steps with guidance 3 + decode), ldmkit vs
   diffusers (``benchmarks/sampling_diffusers.py`` on ``--device cuda``), the same three modes;
5. the paper-size UNet (SD-v1 / LDM-KL-8 text-to-image shape: 320 channels, [1, 2, 4, 4],
   attention at 4, 2, 1, 768-d context; 64x64x4 latents): parameters, bf16 train-step time,
   peak memory and MFU, with and without gradient checkpointing;
6. sampling with CUDA graphs (``compile=reduce-overhead`` on the bf16 weight copy) for the
   CPU-size models, which are launch-bound: against diffusers eager and against diffusers'
   UNet compiled the same way (issue 30);
7. ``trainer.strategy=fsdp``'s memory per rank (``benchmarks/fsdp_memory.py --cuda`` under
   ``torchrun``, one rank per visible GPU): the measured training state of txt2img-1p4B and
   SD-v1 next to the value computed on the meta device.

Without CUDA it prints one line saying so and exits 0 (nothing to measure). diffusers and
xformers are optional: a missing one skips its part with the reason in the JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

# the SD-v1 / LDM text-to-image UNet (CompVis spelling), on 64x64x4 latents
PAPER_UNET: dict[str, Any] = dict(
    in_channels=4,
    out_channels=4,
    model_channels=320,
    channel_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    attention_resolutions=[4, 2, 1],
    num_heads=8,
    num_head_channels=-1,
    transformer_depth=1,
    context_dim=768,
    use_spatial_transformer=True,
)
MODES = {  # name -> (ldmkit precision, diffusers autocast dtype or None for float32)
    "default": ("auto", None),
    "bf16": ("bf16", torch.bfloat16),
    "fp32": ("fp32", None),
}


def sync() -> None:
    torch.cuda.synchronize()


def environment() -> dict[str, Any]:
    from ldmkit.nn.attention import xformers_available

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0),
        "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
        "xformers": xformers_available(),
    }
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:
        info["diffusers"] = None
    return info


def run_cuda_tests(timeout: int) -> dict[str, Any]:
    """``pytest -m cuda`` over tests/ and plugins/; counts from its JUnit XML."""
    import xml.etree.ElementTree as ET

    junit = Path(os.environ.get("TMPDIR", "/tmp")) / "ldmkit_gpu_suite_junit.xml"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "cuda",
        "-q",
        "-p",
        "no:cacheprovider",
        f"--junitxml={junit}",
        "tests",
        "plugins",
    ]
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    result: dict[str, Any] = {
        "command": " ".join(cmd[1:]),
        "exit_code": out.returncode,
        "seconds": round(time.perf_counter() - start, 1),
    }
    if junit.is_file():
        suite = ET.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        for key in ("tests", "failures", "errors", "skipped"):
            result[key] = int(suite.get(key, 0))
        result["passed"] = (
            result["tests"] - result["failures"] - result["errors"] - result["skipped"]
        )
        failed = []
        for case in suite.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(f"{case.get('classname')}::{case.get('name')}")
        result["failed"] = failed
        result["skipped_reasons"] = sorted(
            {(s.get("message") or "")[:120] for s in suite.iter("skipped")}
        )
    result["tail"] = out.stdout[-1500:]
    print(
        f"[gpu_suite] cuda tests: {result.get('passed')} passed, {result.get('failures')} failed, "
        f"{result.get('errors')} errors, {result.get('skipped')} skipped",
        flush=True,
    )
    return result


def matmul_peak() -> dict[str, float]:
    """Measured TFLOP/s of an 8192^3 product in bf16 and in fp32 (TF32 off)."""
    out = {}
    n = 8192
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        a = torch.randn(n, n, device="cuda", dtype=dtype)
        b = torch.randn(n, n, device="cuda", dtype=dtype)
        for _ in range(3):
            a @ b
        sync()
        start = time.perf_counter()
        reps = 10
        for _ in range(reps):
            a @ b
        sync()
        out[name] = 2 * n**3 * reps / (time.perf_counter() - start) / 1e12
        del a, b
    torch.cuda.empty_cache()
    print(
        f"[gpu_suite] matmul peak: bf16 {out['bf16']:.0f} TFLOP/s, fp32 {out['fp32']:.0f} TFLOP/s",
        flush=True,
    )
    return out


def step_flops(model, forward, x, t, cond, target) -> float:
    """FLOPs of one forward + backward (torch's FlopCounterMode: matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        F.mse_loss(forward(model, x, t, cond).float(), target).backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def make_train_step(model, forward, x, t, cond, target, autocast_dtype, *, working_weights=False, device="cuda"):
    """One train step's closure (``unet_train_step.autocast_train_step``, fused AdamW) with the
    forward under autocast to ``autocast_dtype`` (None: float32); ``working_weights``: on
    ldmkit's bf16 working weights, as ``trainer.bf16_weights=true`` trains."""
    from unet_train_step import autocast_train_step

    from ldmkit import precision as _precision

    precision = next(n for n, d in _precision.DTYPES.items() if d == (autocast_dtype or torch.float32))
    return autocast_train_step(model, forward, x, t, cond, target, precision, fused=True,
                               working_weights=working_weights, device=device)


def timed(step, n: int) -> float:
    sync()
    start = time.perf_counter()
    for _ in range(n):
        step()
    sync()
    return (time.perf_counter() - start) / n


def peak_memory(step) -> float:
    sync()
    torch.cuda.reset_peak_memory_stats()
    step()
    sync()
    return torch.cuda.max_memory_allocated() / 2**30


def train_step_race(
    params: dict[str, Any], batch: tuple[int, int, int, int], rounds: int, peak: dict
) -> dict:
    """ldmkit's UNet vs diffusers' with the same weights, per mode; interleaved rounds."""
    from unet_train_step import diffusers_forward, reference_diffusers_unet

    from ldmkit import precision as _precision
    from ldmkit_unet import UNetModel

    torch.manual_seed(0)
    ours = UNetModel(**params)
    with torch.no_grad():
        for p in ours.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    reference = reference_diffusers_unet(ours, params)
    ours.cuda().train()
    reference.cuda().train()
    b, h, w, tokens = batch
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(b, params["in_channels"], h, w, generator=gen).cuda()
    t = torch.randint(0, 1000, (b,), generator=gen).cuda()
    cond = {"crossattn": torch.randn(b, tokens, params["context_dim"], generator=gen).cuda()}
    target = torch.randn(b, params["out_channels"], h, w, generator=gen).cuda()
    with torch.no_grad():
        diff = (ours(x, t, cond) - diffusers_forward(reference, x, t, cond)).abs().max().item()
    flops = step_flops(ours, lambda m, *a: m(*a), x, t, cond, target)
    entry: dict[str, Any] = {
        "params_m": round(sum(p.numel() for p in ours.parameters()) / 1e6, 1),
        "batch": list(x.shape),
        "context": list(cond["crossattn"].shape),
        "forward_max_abs_diff_fp32": diff,
        "flops_per_step": flops,
        "modes": {},
    }
    for mode, (ours_precision, their_dtype) in MODES.items():
        resolved = _precision.resolve(ours_precision, "cuda")
        steps = {
            "ldmkit": make_train_step(
                ours,
                lambda m, *a: m(*a),
                x,
                t,
                cond,
                target,
                _precision.DTYPES[resolved] if resolved != "fp32" else None,
            ),
            "diffusers": make_train_step(
                reference, diffusers_forward, x, t, cond, target, their_dtype
            ),
        }
        if resolved == "bf16":  # trainer.bf16_weights=true (auto keeps it to CPUs until measured here)
            steps["ldmkit_bf16_weights"] = make_train_step(
                copy.deepcopy(ours), None, x, t, cond, target, torch.bfloat16, working_weights=True
            )
        for step in steps.values():
            for _ in range(3):
                step()
        memory = {name: peak_memory(step) for name, step in steps.items()}
        times: dict[str, list[float]] = {name: [] for name in steps}
        for r in range(rounds):
            for name in list(steps) if r % 2 == 0 else list(reversed(steps)):
                times[name].append(timed(steps[name], 3))
        med = {k: statistics.median(v) for k, v in times.items()}
        ratios = [d / o for o, d in zip(times["ldmkit"], times["diffusers"], strict=True)]
        peak_key = "bf16" if resolved == "bf16" else "fp32"
        entry["modes"][mode] = {
            "ldmkit_precision": resolved,
            "diffusers": str(their_dtype or "float32").replace("torch.", ""),
            "ldmkit_ms": med["ldmkit"] * 1e3,
            "diffusers_ms": med["diffusers"] * 1e3,
            "speedup_median_of_pairs": statistics.median(ratios),
            "speedup_range": [min(ratios), max(ratios)],
            "peak_memory_gib": memory,
            "ldmkit_mfu": flops / med["ldmkit"] / 1e12 / peak[peak_key],
        }
        if "ldmkit_bf16_weights" in med:
            gain = [a / w for a, w in zip(times["ldmkit"], times["ldmkit_bf16_weights"], strict=True)]
            entry["modes"][mode].update({
                "ldmkit_bf16_weights_ms": med["ldmkit_bf16_weights"] * 1e3,
                "bf16_weights_speedup_over_autocast": statistics.median(gain),
                "bf16_weights_peak_memory_gib": memory["ldmkit_bf16_weights"],
            })
        del steps
        torch.cuda.empty_cache()
        print(
            f"[gpu_suite] train step {entry['params_m']}M {mode}: "
            f"{entry['modes'][mode]['speedup_median_of_pairs']:.2f}x",
            flush=True,
        )
    del ours, reference
    torch.cuda.empty_cache()
    return entry


def compile_race(params: dict[str, Any], batch: tuple[int, int, int, int], rounds: int) -> dict[str, Any]:
    """``compile=true`` (ldmkit.compiling, inductor, in place) vs eager, bf16 autocast: a train
    step and a guided-batch sampling forward; the first compiled call's time is the compile."""
    from ldmkit.compiling import compile_module
    from ldmkit_unet import UNetModel

    b, h, w, tokens = batch
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(b, params["in_channels"], h, w, generator=gen).cuda()
    t = torch.randint(0, 1000, (b,), generator=gen).cuda()
    cond = {"crossattn": torch.randn(b, tokens, params["context_dim"], generator=gen).cuda()}
    target = torch.randn(b, params["out_channels"], h, w, generator=gen).cuda()
    out: dict[str, Any] = {"batch": list(x.shape)}
    models = {}
    for name in ("eager", "compiled"):
        torch.manual_seed(0)
        models[name] = UNetModel(**params).cuda().train()
    start = time.perf_counter()
    compile_module(models["compiled"], True, device="cuda")
    train = {n: make_train_step(m, lambda m, *a: m(*a), x, t, cond, target, torch.bfloat16) for n, m in models.items()}
    train["compiled"]()  # compiles
    sync()
    out["train_compile_s"] = time.perf_counter() - start
    for step in train.values():
        for _ in range(3):
            step()
    times: dict[str, list[float]] = {n: [] for n in train}
    for r in range(rounds):
        for n in list(train) if r % 2 == 0 else list(reversed(train)):
            times[n].append(timed(train[n], 3))
    out["train_ms"] = {n: statistics.median(v) * 1e3 for n, v in times.items()}
    out["train_speedup"] = statistics.median(e / c for e, c in zip(times["eager"], times["compiled"], strict=True))

    def infer(model):
        def step():
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                model(x, t, cond)

        return step

    for m in models.values():
        m.eval()
    sample = {n: infer(m) for n, m in models.items()}
    start = time.perf_counter()
    sample["compiled"]()
    sync()
    out["inference_compile_s"] = time.perf_counter() - start
    for step in sample.values():
        for _ in range(3):
            step()
    times = {n: [] for n in sample}
    for r in range(rounds):
        for n in list(sample) if r % 2 == 0 else list(reversed(sample)):
            times[n].append(timed(sample[n], 5))
    out["inference_ms"] = {n: statistics.median(v) * 1e3 for n, v in times.items()}
    out["inference_speedup"] = statistics.median(
        e / c for e, c in zip(times["eager"], times["compiled"], strict=True)
    )
    print(
        f"[gpu_suite] compile: train {out['train_speedup']:.2f}x, inference {out['inference_speedup']:.2f}x",
        flush=True,
    )
    del models, train, sample
    torch.cuda.empty_cache()
    return out


def paper_unet(batch: int, peak: dict) -> dict[str, Any]:
    """The paper-size UNet alone: bf16 train step, peak memory, MFU; gradient checkpointing."""
    from ldmkit_unet import UNetModel

    out: dict[str, Any] = {"config": PAPER_UNET, "batch": batch, "latent": [4, 64, 64]}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = UNetModel(**PAPER_UNET, use_checkpoint=checkpointing).cuda().train()
        out["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 1)
        x = torch.randn(batch, 4, 64, 64, device="cuda")
        t = torch.randint(0, 1000, (batch,), device="cuda")
        cond = {"crossattn": torch.randn(batch, 77, 768, device="cuda")}
        target = torch.randn_like(x)
        step = make_train_step(model, lambda m, *a: m(*a), x, t, cond, target, torch.bfloat16)
        for _ in range(3):
            step()
        memory = peak_memory(step)
        seconds = statistics.median(timed(step, 3) for _ in range(5))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            flops = step_flops(model, lambda m, *a: m(*a), x, t, cond, target)
        key = "checkpointed" if checkpointing else "plain"
        out[key] = {
            "step_ms": seconds * 1e3,
            "peak_memory_gib": memory,
            "flops_per_step": flops,
            "mfu_bf16": flops / seconds / 1e12 / peak["bf16"],
            "images_per_s": batch / seconds,
        }
        print(
            f"[gpu_suite] paper UNet {out['params_m']}M {key}: {seconds * 1e3:.0f} ms/step, "
            f"{memory:.1f} GiB",
            flush=True,
        )
        del model, step
        torch.cuda.empty_cache()
    return out


def sampling_races(repeats: int) -> dict[str, Any]:
    import sampling_diffusers as sd

    args = argparse.Namespace(guidance=3.0, repeats=repeats, device="cuda")
    out = {}
    for case in sd.CASES:
        for mode in ("default", "bf16", "fp32"):
            entry = sd.run_case(case, args, mode)
            out[f"{case}/{mode}"] = entry
            print(
                f"[gpu_suite] sampling {case}/{mode}: {entry['speedup_median_of_pairs']:.2f}x",
                flush=True,
            )
    return out


def graph_races(repeats: int) -> dict[str, Any]:
    """Sampling of the CPU-size models, which are launch-bound on a GPU: ldmkit with
    ``compile="reduce-overhead"`` (inductor + CUDA graphs, on the low-precision weight copy)
    against diffusers eager, then against diffusers' UNet under the same
    ``torch.compile(mode="reduce-overhead")`` (the compile race); default precision (ldmkit
    ``auto`` = bf16 vs diffusers float32) and bf16 vs bf16. The first call's time (the
    compile and the graph capture) is ``compile_s``."""
    import sampling_diffusers as sd

    out = {}
    for case in sd.CASES:
        for mode in ("default", "bf16"):
            for theirs in (None, "reduce-overhead"):
                args = argparse.Namespace(
                    guidance=3.0, repeats=repeats, device="cuda", ldmkit_weights="copy",
                    ldmkit_compile="reduce-overhead", diffusers_compile=theirs, no_breakdown=True,
                )
                key = f"{case}/{mode}/ldmkit-graphs-vs-diffusers-{'graphs' if theirs else 'eager'}"
                try:
                    entry = sd.run_case(case, args, mode)
                except Exception as err:  # noqa: BLE001 - record and go on
                    out[key] = {"skipped": f"{type(err).__name__}: {err}"}
                    continue
                out[key] = entry
                print(f"[gpu_suite] sampling {key}: {entry['speedup_median_of_pairs']:.2f}x "
                      f"(compile s {entry['compile_s']})", flush=True)
            torch._dynamo.reset()
    return out


def markdown(results: dict[str, Any]) -> str:
    env = results["environment"]
    lines = [
        f"### GPU suite ({env['gpu']}, torch {env['torch']}, CUDA {env['cuda']}, "
        f"diffusers {env.get('diffusers')}, xformers {'yes' if env['xformers'] else 'no'})",
        "",
    ]
    tests = results.get("cuda_tests", {})
    lines += [
        f"CUDA-only tests (`pytest -m cuda`): {tests.get('passed')} passed, {tests.get('failures')} failed, "
        f"{tests.get('errors')} errors, {tests.get('skipped')} skipped in {tests.get('seconds')} s.",
        "",
    ]
    peak = results.get("matmul_peak_tflops", {})
    if peak:
        lines += [
            f"Measured matmul peak (8192^3): bf16 {peak['bf16']:.0f} TFLOP/s, fp32 {peak['fp32']:.0f} TFLOP/s.",
            "",
        ]
    for name, race in results.get("train_step", {}).items():
        if "modes" not in race:
            lines += [f"UNet train step {name}: skipped ({race.get('skipped')})", ""]
            continue
        lines += [
            f"UNet train step, {name} ({race['params_m']}M params, batch {race['batch']}), ldmkit vs diffusers:",
            "",
            "| mode | ldmkit | diffusers | ldmkit ms | diffusers ms | speedup (median of pairs) | peak GiB ldmkit / diffusers | ldmkit MFU |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for mode, m in race["modes"].items():
            lines.append(
                f"| {mode} | {m['ldmkit_precision']} | {m['diffusers']} | {m['ldmkit_ms']:.1f} | {m['diffusers_ms']:.1f} "
                f"| {m['speedup_median_of_pairs']:.2f}x ({m['speedup_range'][0]:.2f}-{m['speedup_range'][1]:.2f}) "
                f"| {m['peak_memory_gib']['ldmkit']:.2f} / {m['peak_memory_gib']['diffusers']:.2f} | {m['ldmkit_mfu']:.1%} |"
            )
        worked = {mode: m for mode, m in race["modes"].items() if "bf16_weights_speedup_over_autocast" in m}
        if worked:
            lines += ["", "ldmkit's bf16 working weights (`trainer.bf16_weights=true`) against its autocast step:", ""]
            lines += [f"- {mode}: {m['ldmkit_bf16_weights_ms']:.1f} ms, {m['bf16_weights_speedup_over_autocast']:.2f}x, "
                      f"peak {m['bf16_weights_peak_memory_gib']:.2f} GiB" for mode, m in worked.items()]
        lines.append("")
    sampling = results.get("sampling", {})
    if sampling and "skipped" not in sampling:
        lines += [
            "End-to-end sampling (50 DDIM steps, guidance 3, decode), ldmkit vs diffusers:",
            "",
            "| case / mode | ldmkit | diffusers | batch | ldmkit s | diffusers s | speedup | max abs diff |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for key, e in sampling.items():
            lines.append(
                f"| {key} | {e['ldmkit_precision']} | {e['diffusers_dtype']} | {e['batch']} | {e['ldmkit_s']:.3f} "
                f"| {e['diffusers_s']:.3f} | {e['speedup_median_of_pairs']:.2f}x | {e['max_abs_diff_images']:.1e} |"
            )
        lines.append("")
    paper = results.get("paper_unet", {})
    if "plain" in paper:
        lines += [
            f"Paper-size UNet ({paper['params_m']}M params, 64x64x4 latents, batch {paper['batch']}, bf16 autocast, fused AdamW):",
            "",
            "| | ms/step | images/s | peak GiB | MFU (bf16 peak) |",
            "|---|---|---|---|---|",
        ]
        for key in ("plain", "checkpointed"):
            p = paper[key]
            lines.append(
                f"| {key} | {p['step_ms']:.0f} | {p['images_per_s']:.1f} | {p['peak_memory_gib']:.1f} | {p['mfu_bf16']:.1%} |"
            )
        lines.append("")
    comp = results.get("compile", {})
    if "train_ms" in comp:
        lines += [
            f"`compile=true` (inductor, in place) vs eager, `small` UNet, bf16 autocast, batch {comp['batch']}:",
            "",
            "| | eager ms | compiled ms | speedup | compile s |",
            "|---|---|---|---|---|",
            f"| train step | {comp['train_ms']['eager']:.1f} | {comp['train_ms']['compiled']:.1f} "
            f"| {comp['train_speedup']:.2f}x | {comp['train_compile_s']:.0f} |",
            f"| sampling forward | {comp['inference_ms']['eager']:.1f} | {comp['inference_ms']['compiled']:.1f} "
            f"| {comp['inference_speedup']:.2f}x | {comp['inference_compile_s']:.0f} |",
            "",
        ]
    elif comp:
        lines += [f"`compile=true`: skipped ({comp.get('skipped')})", ""]
    graphs = results.get("graphs", {})
    if graphs and "skipped" not in graphs:
        lines += [
            "Sampling with CUDA graphs (`compile=reduce-overhead`), ldmkit vs diffusers eager / compiled alike:",
            "",
            "| case / mode / race | ldmkit s | diffusers s | speedup | compile s (ldmkit / diffusers) |",
            "|---|---|---|---|---|",
        ]
        for key, e in graphs.items():
            if "skipped" in e:
                lines.append(f"| {key} | skipped: {e['skipped'][:80]} | | | |")
                continue
            c = e.get("compile_s", {})
            lines.append(
                f"| {key} | {e['ldmkit_s']:.3f} | {e['diffusers_s']:.3f} | {e['speedup_median_of_pairs']:.2f}x "
                f"| {c.get('ldmkit', 0):.0f} / {c.get('diffusers', 0):.0f} |"
            )
        lines.append("")
    if results.get("budget_skipped"):
        lines += [f"Skipped for the time budget: {', '.join(results['budget_skipped'])}.", ""]
    lines.append(f"Suite time: {results.get('seconds')} s.")
    return "\n".join(lines)


def fsdp_memory(timeout: int) -> dict[str, Any]:
    """``benchmarks/fsdp_memory.py --cuda`` under ``torchrun``, one rank per visible GPU."""
    import tempfile

    here = Path(__file__).resolve().parent
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "fsdp_memory.json"
        done = subprocess.run(
            [str(Path(sys.executable).with_name("torchrun")), "--standalone",
             f"--nproc_per_node={torch.cuda.device_count()}", str(here / "fsdp_memory.py"), "--cuda",
             "--json", str(out)],
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        if done.returncode != 0 or not out.is_file():
            return {"skipped": f"exit {done.returncode}: {done.stderr.strip()[-500:]}"}
        return {"rows": json.loads(out.read_text())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument(
        "--skip", nargs="*", default=[],
        choices=["tests", "train", "sampling", "graphs", "paper", "compile", "fsdp"],
    )
    parser.add_argument(
        "--budget-s", type=float, default=540,
        help="a section that would start after this many seconds is skipped (and listed), so "
        "that one command ends within a 10-minute device call",
    )
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--paper-batch", type=int, default=8)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            f"gpu_suite: no CUDA device here (torch {torch.__version__}, built for CUDA "
            f"{torch.version.cuda}); nothing to run"
        )
        return 0
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 in every comparison
    torch.backends.cudnn.allow_tf32 = False
    started = time.perf_counter()
    results: dict[str, Any] = {"environment": environment()}
    print(f"[gpu_suite] {json.dumps(results['environment'])}", flush=True)

    def save() -> None:
        results["seconds"] = round(time.perf_counter() - started, 1)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
        if args.markdown:
            args.markdown.parent.mkdir(parents=True, exist_ok=True)
            args.markdown.write_text(markdown(results) + "\n")

    results["budget_skipped"] = []

    def wanted(section: str) -> bool:
        if section in args.skip:
            return False
        if time.perf_counter() - started > args.budget_s:
            results["budget_skipped"].append(section)
            print(f"[gpu_suite] {section}: skipped, past the {args.budget_s:.0f} s budget", flush=True)
            return False
        return True

    if wanted("tests"):
        results["cuda_tests"] = run_cuda_tests(timeout=240)
        save()
    results["matmul_peak_tflops"] = matmul_peak()
    have_diffusers = results["environment"]["diffusers"] is not None
    if wanted("train"):
        from unet_train_step import SIZES

        results["train_step"] = {}
        for name, params, batch in (
            ("small", SIZES["small"], (32, 32, 32, 8)),
            ("paper", PAPER_UNET, (8, 64, 64, 77)),
        ):
            try:
                results["train_step"][name] = (
                    train_step_race(params, batch, args.rounds, results["matmul_peak_tflops"])
                    if have_diffusers
                    else {"skipped": "diffusers is not installed"}
                )
            except Exception as err:  # noqa: BLE001 - record and go on with the rest of the suite
                results["train_step"][name] = {"skipped": f"{type(err).__name__}: {err}"}
            save()
    if wanted("sampling"):
        try:
            results["sampling"] = (
                sampling_races(args.rounds)
                if have_diffusers
                else {"skipped": "diffusers is not installed"}
            )
        except Exception as err:  # noqa: BLE001
            results["sampling"] = {"skipped": f"{type(err).__name__}: {err}"}
        save()
    if wanted("graphs"):
        try:
            results["graphs"] = graph_races(args.rounds) if have_diffusers else {"skipped": "diffusers is not installed"}
        except Exception as err:  # noqa: BLE001
            results["graphs"] = {"skipped": f"{type(err).__name__}: {err}"}
        save()
    if wanted("compile"):
        from unet_train_step import SIZES

        try:
            results["compile"] = compile_race(SIZES["small"], (32, 32, 32, 8), args.rounds)
        except Exception as err:  # noqa: BLE001 - inductor may be unavailable (no C compiler, no triton)
            results["compile"] = {"skipped": f"{type(err).__name__}: {err}"}
        save()
    if wanted("paper"):
        try:
            results["paper_unet"] = paper_unet(args.paper_batch, results["matmul_peak_tflops"])
        except Exception as err:  # noqa: BLE001
            results["paper_unet"] = {"skipped": f"{type(err).__name__}: {err}"}
    if wanted("fsdp"):
        results["fsdp_memory"] = fsdp_memory(timeout=600)
    save()
    print(markdown(results))
    tests = results.get("cuda_tests", {})
    return (
        1
        if tests.get("failures")
        or tests.get("errors")
        or tests.get("exit_code") not in (None, 0, 5)
        else 0
    )


if __name__ == "__main__":
    sys.exit(main())
