"""An ahead-of-time compiled sampling denoiser (AOTInductor) against today's eager bf16 path:
the measurement behind ``compile=aot`` (:mod:`ldmkit.aot`, issue 30).

``compile=auto`` compiles sampling only from 3,644 denoiser calls in one process, because the
compile time (about 1 minute on 2 cores) is paid again in every process: an inductor cache
keeps the generated code, not the tracing and freezing (84 s cold, 52 s warm). An AOTInductor
package (``torch.export`` + ``torch._inductor.aoti_compile_and_package``) is compiled once and
loaded by later processes in well under a second. This measures, on issue 30's sampling case
(KL-f4, UNet 64 ch [1, 2, 4], 8 images of 64 px, guided batch 16, class labels), one thread:

* export and compile seconds, package load seconds;
* the packaged forward (bf16 weights folded in, ``freezing``) against the eager bf16 copy with
  packed convolution weights (what ``Pipeline.sample`` runs today), 7 interleaved rounds;
* both outputs' max difference to the float32 denoiser.

    .venv/bin/python benchmarks/aot_package.py --json benchmarks/results/aot_package_amx.json

Run it alone on a quiet machine; it prints the host's flags and measured peaks first.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from host import host_info, host_line, interleave, report
    from sampling_diffusers import CASES, build_pair

    from ldmkit import precision as _precision
    from ldmkit.aot import _Flat as FlatDenoiser  # positional tensors, as compile=aot exports it
    from ldmkit.aot import load_package

    host = host_info()
    print(host_line(host), flush=True)
    overrides, batch, _ = CASES["ldm_kl_f4_64_c64"]
    pipe, _ = build_pair(overrides)
    labels = torch.arange(batch) % 10
    side = int(pipe.config.image_size) // pipe.first_stage.downsample_factor
    noise = torch.randn(batch, pipe.first_stage.latent_channels, side, side, generator=torch.Generator().manual_seed(0))
    z, t = torch.cat([noise, noise]), torch.full((2 * batch,), 500)
    cond, null = pipe.conditioner({"label": labels}), pipe.conditioner.unconditional({"label": labels})
    context = torch.cat([null["crossattn"], cond["crossattn"]])

    pipe.pack_cpu_weights = False  # export the plain bf16 copy; inductor packs its own way
    plain = FlatDenoiser(pipe.sampling_denoiser("bf16"), ("crossattn",), torch.bfloat16).eval()
    start = time.perf_counter()
    with torch.no_grad():
        exported = torch.export.export(plain, (z, t, context))
    export_s = time.perf_counter() - start
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True  # as ldmkit.aot compiles: frozen, which needs gradients off
    with tempfile.TemporaryDirectory() as folder:
        package = str(Path(folder) / "denoiser.pt2")
        start = time.perf_counter()
        with torch.no_grad():
            torch._inductor.aoti_compile_and_package(exported, package_path=package)
        compile_s = time.perf_counter() - start
        start = time.perf_counter()
        loaded = load_package(package)  # ldmkit's loader: the weights in aligned memory
        load_s = time.perf_counter() - start
    print(f"export {export_s:.1f} s, AOTInductor compile {compile_s:.1f} s, load {load_s:.2f} s", flush=True)

    pipe.pack_cpu_weights = True  # today's path: the packed copy under autocast, as Pipeline.sample runs it
    eager = FlatDenoiser(pipe.sampling_denoiser("bf16"), ("crossattn",), torch.bfloat16).eval()

    def packed(*inputs: torch.Tensor) -> torch.Tensor:
        with _precision.autocast("bf16", "cpu"):
            return eager(*inputs)

    with torch.inference_mode():
        reference = pipe.denoiser(z, t, {"crossattn": context})
        errors = {"eager_packed": float((packed(z, t, context) - reference).abs().max()),
                  "aot_package": float((loaded(z, t, context) - reference).abs().max())}  # fmt: skip

    def calls(fn):  # one timed unit: 5 forwards
        def run() -> None:
            with torch.inference_mode():
                for _ in range(5):
                    fn(z, t, context)

        return run

    timed = interleave({"eager_packed": calls(packed), "aot_package": calls(loaded)}, args.rounds, "eager_packed")
    ms = {k: 1e3 * v["median_s"] / 5 for k, v in timed.items()}
    speedup = ms["eager_packed"] / ms["aot_package"]
    saved_s = (ms["eager_packed"] - ms["aot_package"]) / 1e3
    result = {
        "host": host, "export_s": round(export_s, 1), "compile_s": round(compile_s, 1), "load_s": round(load_s, 3),
        "forward_ms": {k: round(v, 1) for k, v in ms.items()}, "speedup": round(speedup, 3),
        "break_even_calls": round(compile_s / saved_s) if saved_s > 0 else None,
        "max_abs_error_vs_fp32": errors,
    }  # fmt: skip
    report(result, args.json)


if __name__ == "__main__":
    main()
