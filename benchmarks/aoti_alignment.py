"""Where AOTInductor's CPU loader puts a package's weights, and what it costs oneDNN's kernels:
the measurement behind ``ldmkit.aot.load_package`` (issue 30).

AOTInductor's CPU loader copies every constant of a package, oneDNN's packed convolution
weights included, into one ``std::malloc`` blob (``aoti_runtime/model_base.h``), which is only
16-byte aligned. ``load_package`` clones them into 64-byte-aligned memory instead. This script
compiles a stack of bf16 3x3 convolutions (``--dtype fp32``: float32), frozen as
``compile=aot`` does, and prints:

* each constant's address mod 64 as the plain loader leaves it (read back through the runner),
  and after ``load_package``;
* the forward time of the plain load, of ``load_package`` and of ``torch.compile`` (freezing),
  interleaved round by round, one thread, CPU time;
* whether the outputs are the same bits.

    .venv/bin/python benchmarks/aoti_alignment.py --json benchmarks/results/aoti_alignment_amx.json

Run it alone on a quiet machine; it prints the host's flags and measured peaks first.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def address(t: torch.Tensor) -> int:
    return torch.ops.mkldnn.data_ptr(t) if t.layout == torch._mkldnn else t.data_ptr()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    import torch._inductor.config as inductor_config
    from host import host_info, host_line, interleave, report

    from ldmkit.aot import load_package

    host = host_info()
    print(host_line(host), flush=True)
    torch.manual_seed(0)
    c = args.channels
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    model = nn.Sequential(*[nn.Conv2d(c, c, 3, padding=1) for _ in range(args.layers)]).to(dtype).eval()
    x = torch.randn(16, c, 8, 8).to(dtype)
    inductor_config.freezing = True
    with tempfile.TemporaryDirectory() as folder:
        package = Path(folder) / "convs.pt2"
        with torch.no_grad():
            exported = torch.export.export(model, (x,))
            torch._inductor.aoti_compile_and_package(exported, package_path=str(package))
        plain = torch._inductor.aoti_load_package(str(package))
        aligned = load_package(package)
        # the plain loader's placement, read back through a runner of the same library
        zipfile.ZipFile(package).extractall(Path(folder) / "x")
        library = next((Path(folder) / "x").rglob("*.wrapper.so"))
        runner = torch._C._aoti.AOTIModelContainerRunnerCpu(str(library), 1)
        placed = sorted({address(t) % 64 for t in runner.extract_constants_map(False).values() if t.numel()})
        del runner
    aligned_placed = sorted({address(t) % 64 for t in aligned.constants.values() if t.numel()})
    compiled = torch.compile(model)
    with torch.no_grad():
        compiled(x)
    fns = {"plain_load": plain, "load_package": aligned, "torch_compile": compiled}
    with torch.inference_mode():
        same_bits = torch.equal(plain(x), aligned(x))

    def calls(fn):  # one timed unit: --calls forwards
        def run() -> None:
            with torch.inference_mode():
                for _ in range(args.calls):
                    fn(x)

        return run

    timed = interleave({name: calls(fn) for name, fn in fns.items()}, args.rounds, "plain_load")
    ms = {k: round(1e3 * v["median_s"] / args.calls, 3) for k, v in timed.items()}
    result = {
        "host": host, "model": f"{args.layers} x conv{c} 3x3 {args.dtype}, batch 16, 8x8",
        "address_mod_64": {"plain_load": placed, "load_package": aligned_placed},
        "same_bits": same_bits, "forward_ms": ms,
        "speedup_load_package_vs_plain": round(ms["plain_load"] / ms["load_package"], 2),
    }  # fmt: skip
    report(result, args.json)


if __name__ == "__main__":
    main()
