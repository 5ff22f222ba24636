"""Train-step throughput of ldmkit's UNet vs diffusers' UNet2DConditionModel.

Both networks get the same architecture (the LDM UNet hyperparameters below, translated
to diffusers with diffusers' own LDM-config and LDM-checkpoint converters), the *same*
weights (ours, converted with ``convert_ldm_unet_checkpoint``, loaded strictly), the same
batch and the same AdamW. First the outputs are compared (max abs diff, float32), then
forward + backward + optimizer step is timed, alternating the two models round by round
so that drift in machine load hits both alike; the figure is the median per-step time.

    .venv/bin/pip install diffusers        # benchmark only; not an ldmkit dependency
    .venv/bin/python benchmarks/unet_train_step.py            # the RESULTS.md figure
    .venv/bin/python benchmarks/unet_train_step.py --rounds 3 --size tiny   # smoke run

``reference_diffusers_unet`` is also used by plugins/ldmkit-unet/tests/make_reference.py
to produce the test fixture of expected outputs.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

from ldmkit_unet import UNetModel

# UNet hyperparameters in the reference code's (CompVis) spelling
SIZES: dict[str, dict[str, Any]] = {
    # an LDM at CPU scale: f=8 latents of 128 px images, 3 levels, attention at ds 2 and 4
    "small": dict(
        in_channels=4,
        out_channels=4,
        model_channels=64,
        channel_mult=[1, 2, 4],
        num_res_blocks=2,
        attention_resolutions=[2, 4],
        num_head_channels=32,
        num_heads=-1,
        transformer_depth=1,
        context_dim=128,
    ),
    # the unet_tiny config of the test suite
    "tiny": dict(
        in_channels=4,
        out_channels=4,
        model_channels=32,
        channel_mult=[1, 2],
        num_res_blocks=1,
        attention_resolutions=[2],
        num_head_channels=16,
        num_heads=-1,
        transformer_depth=1,
        context_dim=64,
    ),
}
BATCH = {"small": (4, 16, 16, 8), "tiny": (8, 16, 16, 8)}  # batch, h, w, context tokens


def diffusers_config(params: dict[str, Any]) -> dict[str, Any]:
    """diffusers' UNet2DConditionModel config for CompVis UNetModel ``params``."""
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm

    params = {"num_classes": None, "transformer_depth": 1, "context_dim": None, **params}
    unet_params = {k: v for k, v in params.items() if k != "num_classes" or v is not None}
    original = {
        "model": {
            "params": {
                "unet_config": {"params": unet_params},
                "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}},
            }
        }
    }
    config = create_unet_diffusers_config_from_ldm(original, {}, image_size=256)
    channels = config["block_out_channels"]
    if params.get("num_head_channels", -1) not in (-1, None):
        # diffusers' `attention_head_dim` is (for this model) the number of heads
        config["attention_head_dim"] = [c // params["num_head_channels"] for c in channels]
    if params.get("use_scale_shift_norm"):
        config["resnet_time_scale_shift"] = "scale_shift"
    if params.get("dropout"):
        config["dropout"] = params["dropout"]
    return config


def reference_diffusers_unet(ours: UNetModel, params: dict[str, Any]):
    """A diffusers UNet2DConditionModel holding ``ours``'s weights (strict load)."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    config = diffusers_config(params)
    ldm_checkpoint = {f"model.diffusion_model.{k}": v for k, v in ours.state_dict().items()}
    converted = convert_ldm_unet_checkpoint(ldm_checkpoint, config)
    missing = [k for k, v in converted.items() if v is None]
    if missing or len(converted) != len(ldm_checkpoint):
        raise AssertionError(
            f"diffusers' LDM converter took {len(converted)} of our {len(ldm_checkpoint)} "
            f"tensors; unresolved: {missing[:5]}"
        )
    reference = UNet2DConditionModel(**config)
    reference.load_state_dict(converted, strict=True)
    return reference


def diffusers_forward(reference, x, t, cond):
    labels = None
    if "vector" in cond:  # one-hot rows -> class indices, as diffusers takes them
        labels = cond["vector"].argmax(dim=1)
    return reference(
        x, t, encoder_hidden_states=cond.get("crossattn"), class_labels=labels, return_dict=False
    )[0]


def make_models(size: str, seed: int = 0):
    params = SIZES[size]
    torch.manual_seed(seed)
    ours = UNetModel(**params)
    # zero-initialised output layers would make both models trivially agree
    with torch.no_grad():
        for p in ours.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    reference = reference_diffusers_unet(ours, params)
    return ours, reference


def make_batch(size: str, seed: int = 1, batch: int | None = None):
    default_batch, height, width, tokens = BATCH[size]
    batch = batch or default_batch
    params = SIZES[size]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, params["in_channels"], height, width, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    cond = {"crossattn": torch.randn(batch, tokens, params["context_dim"], generator=gen)}
    target = torch.randn(batch, params["out_channels"], height, width, generator=gen)
    return x, t, cond, target


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def autocast_train_step(model, forward, x, t, cond, target, precision: str = "fp32", fused: bool = True,
                        working_weights: bool = False, device: str = "cpu"):
    """The trainers' step on one model: AdamW, the forward under ``precision``'s autocast (on
    ``device``), the float32 MSE (as in DiffusionObjective), backward, step. ``working_weights``:
    as ldmkit's LDM trainer does under bf16 (``trainer.bf16_weights``), the convolution and
    linear layers run on a bf16 copy that one fused AdamW step writes
    (``ldmkit.training.working_weights``; ``forward`` is then not used, and ``model``'s trained
    weights become views of one flat buffer: give it a model of its own)."""
    from ldmkit import precision as _precision

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, **({"fused": True} if fused else {}))
    weights = None
    if working_weights:
        from ldmkit.training.working_weights import WorkingWeights

        weights = WorkingWeights(model, optimizer)
        forward_on = lambda m, *a: weights.forward(*a)  # noqa: E731 - the same signature as forward
    else:
        forward_on = forward

    def step():
        optimizer.zero_grad(set_to_none=True)
        with _precision.autocast(precision, device):
            out = forward_on(model, x, t, cond)
        F.mse_loss(out.float(), target).backward()
        if weights is not None:
            weights.gather()
            weights.step()
        optimizer.step()

    return step


def timed_steps(step, steps: int, clock=time.perf_counter) -> float:
    start = clock()
    for _ in range(steps):
        step()
    return (clock() - start) / steps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--batch", type=int, default=None,
                        help="samples per step (default: the size's own, 4 for small): the optimizer's and the "
                        "weight casts' cost per step does not grow with it, the matrix products' does")
    parser.add_argument("--rounds", type=int, default=15, help="alternating timing rounds")
    parser.add_argument("--steps", type=int, default=2, help="train steps per model per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--round-warmup", type=int, default=1,
                        help="untimed steps of a model before each of its timed rounds: the two "
                             "models alternate in one process and evict each other's caches, "
                             "which a real training run (one model) never sees")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall: elapsed time; cpu: this process's CPU time, robust to other load on a "
        "shared machine (meaningful with --threads 1)",
    )
    parser.add_argument(
        "--optimizer",
        choices=["adamw", "adamw-fused", "defaults"],
        default="adamw",
        help="torch.optim.AdamW as constructed by default, or with fused=True (one kernel "
        "for all parameters; much cheaper on CPU), for both; defaults: each framework's own "
        "(ldmkit's LDM trainer: fused=True; diffusers' training examples: torch.optim.AdamW())",
    )
    parser.add_argument(
        "--mode",
        choices=["fp32", "bf16", "default"],
        default="fp32",
        help="fp32: both float32; bf16: both under bf16 autocast; default: ldmkit's "
        "trainer.precision=auto (bf16 autocast on CUDA and bf16-capable CPUs) vs diffusers' float32",
    )
    parser.add_argument(
        "--groupnorm",
        choices=["native", "roundtrip"],
        default="native",
        help="ldmkit's GroupNorm on bf16 activations: native = PyTorch's CPU kernel on them "
        "(float32 statistics inside; the default since issue 30), roundtrip = cast to float32 and back (before)",
    )
    parser.add_argument(
        "--bf16-weights",
        choices=["auto", "off"],
        default="auto",
        help="ldmkit's step under bf16: auto = as its LDM trainer runs it on a CPU (trainer.bf16_weights=auto: "
        "the bf16 working weights and their fused AdamW step), off = autocast's per-step casts (before)",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from ldmkit.nn import GroupNorm32

    GroupNorm32.low_precision_on_cpu = args.groupnorm == "native"
    from host import host_info, host_line

    host = host_info()
    print(host_line(host), flush=True)

    ours, reference = make_models(args.size)
    x, t, cond, target = make_batch(args.size, batch=args.batch)
    with torch.no_grad():
        diff = (ours(x, t, cond) - diffusers_forward(reference, x, t, cond)).abs().max().item()
    n_params = sum(p.numel() for p in ours.parameters())
    print(f"size={args.size} params={n_params / 1e6:.2f}M batch={tuple(x.shape)} "
          f"context={tuple(cond['crossattn'].shape)}")
    print(f"max |ours - diffusers| forward, float32, shared weights: {diff:.2e}")

    from ldmkit import precision as _precision

    ours_precision = _precision.resolve({"fp32": "fp32", "bf16": "bf16", "default": "auto"}[args.mode], "cpu")
    theirs_precision = "bf16" if args.mode == "bf16" else "fp32"
    print(f"mode {args.mode}: ldmkit {ours_precision}, diffusers {theirs_precision}")

    working = ours_precision == "bf16" and args.bf16_weights == "auto"
    print(f"ldmkit bf16 working weights: {'on' if working else 'off'}")

    def train_step(model, forward, precision="fp32", ours=False):
        use_fused = args.optimizer == "adamw-fused" or (args.optimizer == "defaults" and ours)
        return autocast_train_step(model, forward, x, t, cond, target, precision, fused=use_fused,
                                   working_weights=ours and working)

    ours.train()
    reference.train()
    steps = {
        "ldmkit": train_step(ours, lambda m, *a: m(*a), ours_precision, ours=True),
        "diffusers": train_step(reference, diffusers_forward, theirs_precision),
    }
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_index in range(args.rounds):
        order = list(steps) if round_index % 2 == 0 else list(reversed(steps))
        for name in order:
            for _ in range(args.round_warmup):
                steps[name]()
            times[name].append(timed_steps(steps[name], args.steps, CLOCKS[args.clock]))

    median = {name: statistics.median(values) for name, values in times.items()}
    ratio = median["diffusers"] / median["ldmkit"]
    import diffusers

    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, "
          f"{torch.get_num_threads()} threads, {args.clock} clock, {args.optimizer}, "
          f"{platform.processor() or platform.machine()}")
    for name, value in median.items():
        print(f"{name:>9}: {value * 1e3:8.1f} ms/step (median of {args.rounds} rounds x "
              f"{args.steps} steps), {1 / value:6.2f} steps/s")
    print(f"throughput ratio ldmkit/diffusers: {ratio:.3f}")
    pairs = [d / o for o, d in zip(times["ldmkit"], times["diffusers"], strict=True)]
    print(f"median of pairs: {statistics.median(pairs):.3f} (range {min(pairs):.3f}-{max(pairs):.3f})")

    # MFU: the step's matmul/conv FLOPs (torch's counter) over the measured matmul peak
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, _precision.autocast(ours_precision, "cpu"):
        F.mse_loss(ours(x, t, cond).float(), target).backward()
    flops = counter.get_total_flops()
    peak = {name: value * 1e9 for name, value in host["gemm_gflops_1024"].items()}
    print(f"matmul peak here ({torch.get_num_threads()} threads, 1024^3): fp32 {peak['fp32'] / 1e9:.0f} GFLOP/s, "
          f"bf16 {peak['bf16'] / 1e9:.0f} GFLOP/s")
    print(f"ldmkit step: {flops / 1e9:.2f} GFLOP, MFU {flops / median['ldmkit'] / peak[ours_precision]:.1%} "
          f"of the {ours_precision} peak, {flops / median['ldmkit'] / peak['bf16']:.1%} of the bf16 peak")
    print(f"diffusers step: MFU {flops / median['diffusers'] / peak[theirs_precision]:.1%} of the "
          f"{theirs_precision} peak")


if __name__ == "__main__":
    main()
