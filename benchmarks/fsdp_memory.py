"""Memory per rank of stage-2 training, DDP vs ``trainer.strategy=fsdp`` (issue 29 figure).

The paper's txt2img-1p4B (LDM-KL-8-G: 320-channel UNet + the 32-layer transformer text
encoder, trained jointly) and an SD-v1-size UNet (its CLIP ViT-L/14 text encoder frozen) are
built on the meta device from the stored translations (``src/ldmkit/interop/presets/``; SD-v1's
CLIP text model from its published shape, as ``clip_text`` loads it). For each number of
ranks N, a fake process group of N ranks lets :func:`ldmkit.training.fsdp.shard` — the very
sharding training uses — shard them; the numbers are the sizes of rank 0's shards (the
largest: FSDP2 pads dim 0 to a multiple of N), nothing is allocated.

Per rank, fp32 master weights: parameters 4 B + gradients 4 B + AdamW's two moments 8 B per
element (DDP: every element; FSDP: rank 0's shard). Beside it: ldmkit's EMA (4 B, sharded like
the parameters under FSDP), the frozen parts every rank holds whole (first stage, a frozen text
encoder; fp32), and FSDP's transient all-gather of the largest unit in bf16. DDP's gradient
buckets (another 4 B per trainable element by default) and activations are not counted.

    python benchmarks/fsdp_memory.py --json benchmarks/results/fsdp_memory.json

``benchmarks/gpu_suite.py`` measures the same on CUDA (``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

GIB = 2**30
MODELS = ("txt2img-1p4B", "sd-v1")
# CLIP ViT-L/14's text tower (Stable Diffusion v1's frozen encoder)
CLIP_L14_TEXT = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                 "num_hidden_layers": 12, "max_position_embeddings": 77, "vocab_size": 49408}  # fmt: skip


def build(name: str) -> dict[str, nn.Module]:
    """First stage, denoiser and conditioner of preset ``name`` on the meta device; a frozen
    conditioner has ``requires_grad`` off."""
    return build_on(name, "meta")


def build_on(name: str, device: str) -> dict[str, nn.Module]:
    """:func:`build` on ``device``."""
    from ldmkit.assembly import create_component
    from ldmkit.interop.compvis import load_preset
    from ldmkit.plugins import get_plugin_manager

    registry = get_plugin_manager().registry
    groups = load_preset(name).groups
    with torch.device(device):
        parts = {kind: create_component(registry, kind, groups[kind]) for kind in ("first_stage", "denoiser")}
        if groups["conditioner"]["name"] == "clip_text":  # frozen, from a local CLIP folder
            from transformers import CLIPTextConfig, CLIPTextModel

            parts["conditioner"] = CLIPTextModel(CLIPTextConfig(**CLIP_L14_TEXT)).requires_grad_(False)
        else:  # the paper's transformer encoder trains with the UNet
            parts["conditioner"] = create_component(registry, "conditioner", groups["conditioner"])
    parts["first_stage"].requires_grad_(False)
    return parts


def _numel(params) -> int:
    return sum(p.numel() for p in params)


def _managed(unit: nn.Module, units: list[nn.Module]) -> int:
    """The parameters ``unit`` all-gathers: its own, less those of the units inside it."""
    inner = {id(p) for c in unit.modules() if c is not unit and c in units for p in c.parameters()}
    return _numel(p for p in unit.parameters() if id(p) not in inner)


def measure(name: str, ranks: list[int]) -> dict[str, Any]:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from ldmkit.training import fsdp

    parts = build(name)
    trainable = _numel(p for m in parts.values() for p in m.parameters() if p.requires_grad)
    frozen = _numel(p for m in parts.values() for p in m.parameters() if not p.requires_grad)
    row: dict[str, Any] = {
        "model": name, "trainable_params": trainable, "frozen_params": frozen,
        "ddp": {"state_gib": 16 * trainable / GIB, "ema_gib": 4 * trainable / GIB, "frozen_gib": 4 * frozen / GIB},
        "fsdp": {},
    }  # fmt: skip
    for n in ranks:
        dist.init_process_group("fake", rank=0, world_size=n, store=FakeStore())
        try:
            init_device_mesh("cpu", (n,))  # fully_shard's default mesh: all ranks
            parts = build(name)
            units = fsdp.shard(parts["denoiser"], parts["conditioner"], nn.Module(), "bf16")
            local = _numel(p.to_local() for m in parts.values() for p in m.parameters() if p.requires_grad)
            largest = max(_managed(u, units) for u in units)
        finally:
            dist.destroy_process_group()
        row["fsdp"][n] = {"state_gib": 16 * local / GIB, "ema_gib": 4 * local / GIB,
                          "frozen_gib": 4 * frozen / GIB, "allgather_gib": 2 * largest / GIB,
                          "largest_unit_params": largest}  # fmt: skip
    return row


def markdown(rows: list[dict[str, Any]], ranks: list[int]) -> str:
    head = "| model | trainable / frozen params | DDP (any N) | " + " | ".join(f"FSDP N={n}" for n in ranks) + " |"
    lines = [
        "Memory per rank, GiB: parameters + gradients + AdamW (fp32), then in brackets the total with ldmkit's "
        "EMA, the frozen parts (whole on every rank) and, for FSDP, the bf16 all-gather of the largest unit.",
        "",
        head,
        "|" + "---|" * (3 + len(ranks)),
    ]
    for r in rows:
        d = r["ddp"]
        cells = [f"{d['state_gib']:.2f} ({d['state_gib'] + d['ema_gib'] + d['frozen_gib']:.2f})"]
        for n in ranks:
            f = r["fsdp"][n]
            total = f["state_gib"] + f["ema_gib"] + f["frozen_gib"] + f["allgather_gib"]
            cells.append(f"{f['state_gib']:.2f} ({total:.2f})")
        lines.append(f"| {r['model']} | {r['trainable_params'] / 1e6:.0f}M / {r['frozen_params'] / 1e6:.0f}M | "
                     + " | ".join(cells) + " |")  # fmt: skip
    return "\n".join(lines)


def measure_cuda(name: str) -> dict[str, Any]:
    """Under ``torchrun`` on CUDA (NCCL): the denoiser and a trainable conditioner of ``name``
    built on the GPU, sharded as training shards them, one AdamW step on a batch of one;
    ``torch.cuda.memory_allocated`` after the step (parameters, gradients, moments: the state
    the table computes) next to the computed value for this number of ranks."""
    import os

    import torch.distributed as dist

    from ldmkit.training import distributed_process_group, fsdp

    world = int(os.environ.get("WORLD_SIZE", 1))
    computed = measure(name, [world])["fsdp"][world]["state_gib"]  # before the real process group
    with distributed_process_group():
        n = dist.get_world_size() if dist.is_initialized() else 1
        parts = {k: m.to("cuda") for k, m in build_on(name, "cuda").items() if k != "first_stage"}
        before = torch.cuda.memory_allocated()  # whole modules, before sharding frees them
        if dist.is_initialized():
            fsdp.shard(parts["denoiser"], parts["conditioner"], nn.Module(), "bf16")
        params = [p for m in parts.values() for p in m.parameters() if p.requires_grad]
        for p in params:  # the gradients a backward leaves, without the activations
            p.grad = torch.zeros_like(p)
        torch.optim.AdamW(params, lr=1e-4, fused=True).step()
        torch.cuda.synchronize()
        frozen = sum(p.numel() * p.element_size() for m in parts.values() for p in m.parameters() if not p.requires_grad)
        measured = (torch.cuda.memory_allocated() - frozen) / GIB
        return {"model": name, "ranks": n, "whole_model_gib": before / GIB,
                "measured_state_gib": measured, "computed_state_gib": computed}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--cuda", action="store_true", help="measure on CUDA (under torchrun: one rank per GPU)")
    args = parser.parse_args(argv)
    if args.cuda:
        if not torch.cuda.is_available():
            print("fsdp_memory --cuda: no CUDA device here; nothing to measure")
            return 0
        import os

        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        rows = [measure_cuda(name) for name in args.models]
        if args.json and int(os.environ.get("RANK", 0)) == 0:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(rows, indent=2))
        print(json.dumps(rows))
        return 0
    rows = [measure(name, args.ranks) for name in args.models]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))
    print(markdown(rows, args.ranks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
