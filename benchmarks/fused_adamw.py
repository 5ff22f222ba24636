"""The bf16 working weights' fused AdamW step against what it replaces, on one thread.

    python benchmarks/fused_adamw.py [--numel 24218628] [--rounds 7] [--json PATH]

Over ``--numel`` values (default: the trained convolution/linear values of issue 30's UNet,
``small``), interleaved:

* ``autocast``: what a bf16 autocast step spends per parameter outside the network: the cast
  of every float32 weight to bf16 (the forward), the cast of every bf16 gradient back to
  float32 (the backward), then ``torch.optim.AdamW(fused=True)``; per tensor as a model has
  them (the shapes of ``--numel``'s UNet);
* ``adamw``: ``AdamW(fused=True)`` alone on float32 gradients;
* ``working``: ``ldmkit.training.working_weights``' step: gathering the bf16 gradients into
  the flat buffer, then its one ``torch.compile``'d loop that updates the float32 weights and
  moments and writes the bf16 copy.

Prints the host line (flags, measured peaks) and the medians; ``--json`` writes them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", help="the UNet of unet_train_step.py whose layers to use")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from host import host_info, host_line, interleave
    from unet_train_step import make_models

    from ldmkit.training.working_weights import MATRIX_LAYERS, WorkingWeights

    host = host_info()
    print(host_line(host), flush=True)
    model, _ = make_models(args.size)
    model.train()
    matrix = [p for m in model.modules() if isinstance(m, MATRIX_LAYERS) for p in m.parameters(recurse=False)]
    numel = sum(p.numel() for p in matrix)
    print(f"{len(matrix)} convolution/linear tensors, {numel / 1e6:.2f}M values")
    gen = torch.Generator().manual_seed(0)
    grads16 = [(torch.randn(p.shape, generator=gen) * 1e-3).bfloat16() for p in matrix]

    # autocast's side: casts per tensor, then fused AdamW on float32 gradients
    plain = [nn.Parameter(p.detach().clone()) for p in matrix]
    adamw = torch.optim.AdamW(plain, lr=1e-4, fused=True)

    def autocast_side():
        working = [p.detach().to(torch.bfloat16) for p in plain]  # the forward's casts
        for p, g in zip(plain, grads16, strict=True):
            p.grad = g.float()  # the backward's casts
        adamw.step()
        return working

    other = [nn.Parameter(p.detach().clone()) for p in matrix]
    for p, g in zip(other, grads16, strict=True):
        p.grad = g.float()
    adamw_only = torch.optim.AdamW(other, lr=1e-4, fused=True)

    holder = nn.ModuleList([nn.Linear(1, 1, bias=False) for _ in matrix])
    for layer, p in zip(holder, matrix, strict=True):
        layer.weight = nn.Parameter(p.detach().clone())
    optimizer = torch.optim.AdamW(holder.parameters(), lr=1e-4, fused=True)
    weights = WorkingWeights(holder, optimizer)
    shadows = [weights.shadows[name] for name in weights.names]
    by_name = dict(zip([f"{i}.weight" for i in range(len(matrix))], grads16, strict=True))

    def working_side():
        for name, shadow in zip(weights.names, shadows, strict=True):
            shadow.grad = by_name[name]
        weights.gather()
        weights.step()

    working_side()  # compiles
    results = interleave({"autocast": autocast_side, "adamw": adamw_only.step, "working": working_side},
                         args.rounds, baseline="autocast")
    for name, r in results.items():
        print(f"{name:>9}: {r['median_s'] * 1e3:7.1f} ms  ({r['speedup_vs_autocast']:.2f}x autocast's, "
              f"range {r['range'][0]:.2f}-{r['range'][1]:.2f})")
    if args.json:
        args.json.write_text(json.dumps({"host": host, "numel": numel, "tensors": len(matrix), "results": results},
                                        indent=2) + "\n")


if __name__ == "__main__":
    main()
