"""Memory of the first stage and of attention on large latents (issue 13 item 5).

Three measurements, each case in a fresh subprocess so that one case's allocations cannot
hide another's (peak resident memory, ``ru_maxrss``, minus the resident memory just before
the measured call; on CUDA ``torch.cuda.max_memory_allocated``):

1. **Tiled vs untiled decode** of the paper's KL-f8 first stage (``first_stage=kl_f8``: 128
   channels, ch_mult 1,2,4,4, mid-block attention; random weights, which do not change the
   memory) at 512, 1024 and 2048 pixels square, untiled and with ``tile=32`` latent pixels.
2. **Tiled vs untiled quality**: a trained first stage decodes the same latents whole and in
   tiles; PSNR of the tiled image against the untiled one. The images are mosaics of
   held-out Fashion-MNIST test images (the demo's KL-f4, ``--kl-f4 DIR``), 256x256, so that
   both fit.
3. **Attention at 128x128 latents** (16,384 tokens, one head of 64 channels as in the paper's
   first-stage mid-block, batch 1): SDPA, ``chunked`` (1,024 queries per slice) and the
   explicit ``math`` product, peak memory and time.

Usage::

    python benchmarks/memory.py --json benchmarks/results/memory.json \\
        --kl-f4 runs/demo/kl_f4 --data data/fashion_mnist
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- one case, in a child process ---------------------------------------------------------
def child(case: dict) -> dict:
    import torch

    torch.set_num_threads(case.get("threads", 2))
    device = torch.device(case.get("device", "cpu"))
    if case["kind"] == "decode":
        import ldmkit
        from ldmkit.tiling import tiled_decode

        fs = (
            ldmkit.compose(overrides=["first_stage=kl_f8", "conditioner=none"])
            .first_stage.eval()
            .to(device)
        )
        f = fs.downsample_factor
        h = case["size"] // f
        z = torch.randn(1, fs.latent_channels, h, h, device=device)
        fn = (
            fs.decode
            if case["tile"] is None
            else (lambda z: tiled_decode(fs.decode, z, factor=f, tile=case["tile"]))
        )
    else:
        from ldmkit.nn.attention import attention as attn
        from ldmkit.nn.attention import attention_backend

        n, d = case["tokens"], case["head_dim"]
        q, k, v = (torch.randn(1, 1, n, d, device=device) for _ in range(3))

        def fn(_):
            with attention_backend(case["backend"], chunk_size=1024):
                return attn(q, k, v)

        z = None
    with torch.inference_mode():
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = _rss_mib()
        start = time.perf_counter()
        out = fn(z)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        if device.type == "cuda":
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            peak = _peak_mib() - base
    return {
        **case,
        "peak_mib": round(peak, 1),
        "seconds": round(seconds, 3),
        "out_shape": list(out.shape),
    }


def run_case(case: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(case)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        return {
            **case,
            "error": proc.stderr.strip().splitlines()[-1]
            if proc.stderr.strip()
            else f"exit {proc.returncode}",
        }
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- tiled vs untiled quality -------------------------------------------------------------
def psnr_cases(kl_dir: Path, data: Path, tiles: list[int], size: int = 256) -> list[dict]:
    import torch

    from ldmkit.pipeline import Pipeline
    from ldmkit.tiling import tiled_decode

    pipe = Pipeline.load(kl_dir) if (kl_dir / "config.yaml").exists() else None
    if pipe is None:
        raise SystemExit(
            f"--kl-f4 {kl_dir}: expected a pipeline folder with config.yaml (e.g. runs/demo/ldm/pipeline)"
        )
    fs = pipe.first_stage.eval()
    images = _fashion_test_images(data, (size // 32) ** 2)
    mosaic = (
        images.reshape(size // 32, size // 32, 1, 32, 32)
        .permute(2, 0, 3, 1, 4)
        .reshape(1, 1, size, size)
    )
    x = mosaic * 2 - 1
    out = []
    with torch.inference_mode():
        z = fs.encode(x) if getattr(fs, "encode_mode", "mode") == "mode" else fs.posterior(x)[0]
        whole = fs.decode(z).clamp(-1, 1)
        rec_psnr = _psnr(whole, x)
        for tile in tiles:
            for overlap in (0, tile // 4, tile // 2):
                tiled = tiled_decode(
                    fs.decode, z, factor=fs.downsample_factor, tile=tile, overlap=overlap
                ).clamp(-1, 1)
                out.append(
                    {
                        "tile": tile,
                        "overlap": overlap,
                        "psnr_vs_untiled_db": round(_psnr(tiled, whole), 2),
                        "psnr_vs_input_db": round(_psnr(tiled, x), 2),
                        "untiled_psnr_vs_input_db": round(rec_psnr, 2),
                        "latent": list(z.shape[-2:]),
                    }
                )
    return out


def _psnr(a, b) -> float:
    import torch

    mse = (a - b).float().pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(4.0 / mse)).item()


def _fashion_test_images(data: Path, n: int):
    """The first ``n`` Fashion-MNIST *test* images (28x28 padded to 32x32), in [0, 1]."""
    import gzip

    import numpy as np
    import torch

    path = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
    if not path.exists():
        raise SystemExit(f"{path} is missing: apt install dataset-fashion-mnist")
    with gzip.open(path) as f:
        raw = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)[:n]
    x = torch.from_numpy(raw.astype(np.float32) / 255.0)
    return torch.nn.functional.pad(x, (2, 2, 2, 2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--tile", type=int, default=32)
    p.add_argument(
        "--kl-f4",
        type=Path,
        default=ROOT / "runs/demo/ldm/pipeline",
        help="a trained pipeline folder whose first stage decodes the PSNR mosaic",
    )
    p.add_argument("--data", type=Path, default=ROOT / "data/fashion_mnist")
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    common = {"device": args.device, "threads": args.threads}
    results: dict = {"decode": [], "attention": [], "tiled_psnr": []}
    for size in args.sizes:
        for tile in (None, args.tile):
            r = run_case({**common, "kind": "decode", "size": size, "tile": tile})
            print(json.dumps(r), flush=True)
            results["decode"].append(r)
    for backend in ("sdpa", "chunked", "math"):
        r = run_case(
            {**common, "kind": "attention", "backend": backend, "tokens": 128 * 128, "head_dim": 64}
        )
        print(json.dumps(r), flush=True)
        results["attention"].append(r)
    if args.kl_f4.exists():
        results["tiled_psnr"] = psnr_cases(args.kl_f4, args.data, [8, 16, 32])
        for r in results["tiled_psnr"]:
            print(json.dumps(r), flush=True)
    else:
        print(f"skipping the PSNR cases: {args.kl_f4} does not exist (run ./scripts/demo.sh)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
