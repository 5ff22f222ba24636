"""End-to-end sampling, ldmkit vs diffusers, with the same weights (issue 9).

One process, float32, the same class-conditional latent diffusion model held twice:

* ldmkit: ``Pipeline.sample(batch, guidance_scale=g, steps=S)`` (conditioner, DDIM loop with
  batched classifier-free guidance, decode);
* diffusers: ``UNet2DConditionModel`` + ``AutoencoderKL`` (weights converted with diffusers'
  own LDM converters) + ``DDIMScheduler`` (the same scaled-linear betas, ``linspace`` spacing,
  ``set_alpha_to_one``), driven by the loop of diffusers' pipelines (``cat([latents] * 2)``,
  ``scheduler.step``, ``vae.decode(latents / scaling_factor)``), the same condition embeddings.

Both runs start from the same noise; the script first checks that the images agree (max
|diff| printed), then times interleaved pairs and reports the median ratio. It also splits
ldmkit's time into UNet, guidance batching, decode and per-step Python overhead.

    .venv/bin/pip install -e '.[bench]'          # diffusers: benchmark only
    .venv/bin/python benchmarks/sampling_diffusers.py --threads 2 --json benchmarks/results/sampling_diffusers.json

Not a test: numbers depend on the machine; run it alone on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _ldm_64(channels: int, mult: str) -> list[str]:
    """A paper-shaped LDM-4 on 64x64 RGB images (KL-f4: 3x16x16 latents), attention at 2 and 4."""
    return [
        "experiment=fmnist_ldm_kl_f4",
        "first_stage.checkpoint=null",
        "sampler.spacing=trailing",
        "image_size=64",
        "first_stage.in_channels=3",
        "first_stage.out_ch=3",
        "first_stage.resolution=64",
        f"denoiser.model_channels={channels}",
        f"denoiser.channel_mult={mult}",
        "denoiser.attention_resolutions=[2,4]",
        "denoiser.num_head_channels=32",
    ]


# case -> (overrides for ldmkit.compose, batch, steps)
CASES: dict[str, tuple[list[str], int, int]] = {
    # the class-conditional Fashion-MNIST LDM (32x32 -> 3x8x8 latents, the demo's model)
    "fmnist_ldm_kl_f4": (
        ["experiment=fmnist_ldm_kl_f4", "first_stage.checkpoint=null", "sampler.spacing=trailing"],
        16,
        50,
    ),
    # UNet 128 channels, 3 levels, cross-attention
    "ldm_kl_f4_64": (_ldm_64(128, "[1,2,2]"), 4, 25),
    # issue 30's case: 8 images of 64 px, UNet 64 channels [1, 2, 4], DDIM 50 with guidance 3
    "ldm_kl_f4_64_c64": (_ldm_64(64, "[1,2,4]"), 8, 50),
}
UNET_ONLY_KEYS = {"name", "prediction", "vector_dim", "use_checkpoint", "adm_in_channels"}


def perturb(module: torch.nn.Module, seed: int) -> None:
    """Trained-looking weights (zero-initialised output layers would hide differences)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)


def build_pair(overrides: list[str]) -> tuple[Any, dict[str, Any]]:
    from diffusers import DDIMScheduler
    from omegaconf import OmegaConf
    from unet_train_step import reference_diffusers_unet

    import ldmkit
    from ldmkit_autoencoders.diffusers_compat import to_diffusers

    torch.manual_seed(0)  # the same weights in every run: a compile=aot package made by one is found by the next
    pipe = ldmkit.compose(overrides).eval()
    perturb(pipe.denoiser, 1)
    perturb(pipe.first_stage, 2)
    perturb(pipe.conditioner, 3)
    params = OmegaConf.to_container(pipe.config.denoiser, resolve=True)
    params = {k: v for k, v in params.items() if k not in UNET_ONLY_KEYS}
    unet = reference_diffusers_unet(pipe.denoiser, params).eval()
    vae = to_diffusers(pipe.first_stage).eval()
    sched = pipe.config.schedule
    scheduler = DDIMScheduler(
        num_train_timesteps=sched.timesteps,
        beta_start=sched.linear_start,
        beta_end=sched.linear_end,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=True,
        timestep_spacing="trailing",
        steps_offset=0,
    )
    return pipe, {"unet": unet, "vae": vae, "scheduler": scheduler}


def diffusers_sample(
    theirs: dict[str, Any],
    pipe: Any,
    labels: torch.Tensor,
    noise: torch.Tensor,
    steps: int,
    guidance: float,
) -> torch.Tensor:
    """The denoising loop of diffusers' StableDiffusionPipeline, on diffusers' modules (in
    their dtype: a ``torch_dtype=torch.bfloat16`` pipeline holds bf16 weights and latents)."""
    unet, vae, scheduler = theirs["unet"], theirs["vae"], theirs["scheduler"]
    dtype = unet.dtype
    batch = {"label": labels}
    cond = pipe.conditioner(batch)["crossattn"]
    uncond = pipe.conditioner.unconditional(batch)["crossattn"]
    context = torch.cat([uncond, cond]).to(dtype)
    scheduler.set_timesteps(steps, device=noise.device)
    latents = noise.to(dtype) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        eps = unet(model_input, t, encoder_hidden_states=context, return_dict=False)[0]
        eps_u, eps_c = eps.chunk(2)
        eps = eps_u + guidance * (eps_c - eps_u)
        latents = scheduler.step(eps, t, latents, return_dict=False)[0]
    return vae.decode(latents / float(pipe.scale_factor), return_dict=False)[0].clamp(-1, 1).float()


def ldmkit_sample(
    pipe: Any, labels: torch.Tensor, noise: torch.Tensor, steps: int, guidance: float,
    precision: str = "fp32", compile: bool | str = False,
) -> torch.Tensor:
    return pipe.sample({"label": labels}, noise=noise, steps=steps, guidance_scale=guidance,
                       precision=precision, compile=compile)


# --precision modes: (ldmkit's precision, diffusers' dtype)
MODES: dict[str, tuple[str, torch.dtype]] = {
    "fp32": ("fp32", torch.float32),  # same precision: both float32
    "bf16": ("bf16", torch.bfloat16),  # same precision: ldmkit bf16 autocast, diffusers bf16 weights
    "default": ("auto", torch.float32),  # each framework's default
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def breakdown(
    pipe: Any, labels: torch.Tensor, noise: torch.Tensor, steps: int, guidance: float, repeats: int,
    precision: str = "fp32",
) -> dict[str, float]:
    """Where ldmkit's time goes: one UNet call at the guided batch, decode, and the rest."""
    batch = {"label": labels}
    cond = pipe.conditioner(batch)
    both = {k: torch.cat([pipe.conditioner.unconditional(batch)[k], v]) for k, v in cond.items()}
    z2 = torch.cat([noise, noise])
    t2 = torch.full((z2.shape[0],), 500, dtype=torch.long)
    z = noise

    from ldmkit import precision as _precision

    device = noise.device
    t2 = t2.to(device)
    resolved = _precision.resolve(precision, device)

    def med(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    net = pipe.sampling_denoiser(resolved)  # the low-precision copy where the pipeline uses it

    def unet_call(*args):
        with _precision.autocast(resolved, device):
            return net(*args)

    with torch.inference_mode():
        unet = med(lambda: unet_call(z2, t2, both))
        unet_single = med(lambda: unet_call(z, t2[: z.shape[0]], cond))
        decode = med(lambda: pipe.decode(z))
        total = med(lambda: ldmkit_sample(pipe, labels, noise, steps, guidance, precision))
    return {
        "total_s": total,
        "unet_guided_batch_s_per_step": unet,
        "unet_cond_only_s_per_step": unet_single,
        "unet_share": unet * steps / total,
        "decode_share": decode / total,
        "other_s_per_step": (total - unet * steps - decode) / steps,
    }


def run_case(case: str, args: argparse.Namespace, mode: str = "fp32") -> dict[str, Any]:
    from ldmkit import precision as _precision

    overrides, batch, steps = CASES[case]
    device = torch.device(getattr(args, "device", "cpu"))
    pipe, theirs = build_pair(overrides)
    ours_precision, their_dtype = MODES[mode]
    # --ldmkit-weights autocast: the path before issue 30 (autocast over float32 weights)
    pipe.low_precision_weights = getattr(args, "ldmkit_weights", "copy") == "copy"
    ours_compile = getattr(args, "ldmkit_compile", None) or False
    their_compile = getattr(args, "diffusers_compile", None)
    pipe.to(device)
    theirs["unet"].to(device, their_dtype)
    theirs["vae"].to(device, their_dtype)
    compile_s = {}
    if ours_compile:  # the first call compiles (the denoiser, or its low-precision copy)
        start = time.perf_counter()
        with torch.inference_mode():
            ldmkit_sample(pipe, (torch.arange(batch) % 10).to(device), torch.randn(
                batch, pipe.first_stage.latent_channels, *(2 * [int(pipe.config.image_size) // pipe.first_stage.downsample_factor])
            ).to(device), steps, args.guidance, ours_precision, ours_compile)
        sync(device)
        compile_s["ldmkit"] = time.perf_counter() - start
    if their_compile:
        theirs["unet"] = torch.compile(theirs["unet"], **({} if their_compile == "default" else {"mode": their_compile}))
    labels = (torch.arange(batch) % 10).to(device)
    side = int(pipe.config.image_size) // pipe.first_stage.downsample_factor
    shape = (batch, pipe.first_stage.latent_channels, side, side)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.inference_mode():
        a = ldmkit_sample(pipe, labels, noise, steps, args.guidance, ours_precision, ours_compile)
        start = time.perf_counter()
        b = diffusers_sample(theirs, pipe, labels, noise, steps, args.guidance)
        sync(device)
        if their_compile:
            compile_s["diffusers"] = time.perf_counter() - start
    diff = (a - b).abs().max().item()
    times: dict[str, list[float]] = {"ldmkit": [], "diffusers": []}
    runners = {
        "ldmkit": lambda: ldmkit_sample(pipe, labels, noise, steps, args.guidance, ours_precision, ours_compile),
        "diffusers": lambda: diffusers_sample(theirs, pipe, labels, noise, steps, args.guidance),
    }
    with torch.inference_mode():
        for key in runners:  # warm-up (kernel selection, allocator)
            runners[key]()
        for i in range(args.repeats):
            order = ("ldmkit", "diffusers") if i % 2 == 0 else ("diffusers", "ldmkit")
            for key in order:
                sync(device)
                start = time.perf_counter()
                runners[key]()
                sync(device)
                times[key].append(time.perf_counter() - start)
    ratios = [d / o for o, d in zip(times["ldmkit"], times["diffusers"], strict=True)]
    entry = {
        "overrides": overrides,
        "mode": mode,
        "ldmkit_precision": _precision.resolve(ours_precision, device),
        "ldmkit_weights": "copy" if pipe.low_precision_weights else "autocast",
        "ldmkit_compile": ours_compile,
        "diffusers_compile": their_compile,
        "compile_s": compile_s,
        "diffusers_dtype": str(their_dtype).replace("torch.", ""),
        "device": str(device),
        "batch": batch,
        "steps": steps,
        "max_abs_diff_images": diff,
        "ldmkit_s": statistics.median(times["ldmkit"]),
        "diffusers_s": statistics.median(times["diffusers"]),
        "speedup_median_of_pairs": statistics.median(ratios),
        "speedup_range": [min(ratios), max(ratios)],
    }
    if not ours_compile and not getattr(args, "no_breakdown", False):
        entry["ldmkit_breakdown"] = breakdown(
            pipe, labels, noise, steps, args.guidance, max(3, args.repeats // 2), ours_precision
        )
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--modes", nargs="+", default=["fp32"], choices=list(MODES),
                        help="fp32: both float32 (the sampling issue's race); bf16: both bf16; "
                             "default: ldmkit precision=auto vs diffusers' float32 default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ldmkit-weights", choices=["copy", "autocast"], default="copy",
                        help="bf16/fp16: copy = the denoiser's weights cast once (ldmkit's default "
                             "since issue 30), autocast = autocast over the float32 weights (before)")
    parser.add_argument("--ldmkit-groupnorm", choices=["native", "roundtrip"], default="native",
                        help="GroupNorm on bf16 CPU activations: native (since issue 30) or the "
                             "float32 round trip (before)")
    parser.add_argument("--ldmkit-compile", default=None, help="compile setting for ldmkit (true, auto, a mode)")
    parser.add_argument("--diffusers-compile", default=None, help="torch.compile mode for diffusers' UNet")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the split of ldmkit's time")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from ldmkit.nn import GroupNorm32

    GroupNorm32.low_precision_on_cpu = args.ldmkit_groupnorm == "native"
    from host import host_info, host_line

    host = host_info(peaks=args.device == "cpu")
    print(host_line(host), flush=True)
    results: dict[str, Any] = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch": torch.__version__,
            "threads": args.threads,
            "host": host,
        },
        "guidance": args.guidance,
        "cases": {},
    }
    import diffusers

    results["machine"]["diffusers"] = diffusers.__version__
    for case in args.cases:
        for mode in args.modes:
            entry = run_case(case, args, mode)
            key = case if mode == "fp32" else f"{case}/{mode}"
            if mode != "fp32" and args.ldmkit_weights == "autocast":
                key += "/ldmkit-autocast"
            if mode != "fp32" and args.ldmkit_groupnorm == "roundtrip":
                key += "/groupnorm-roundtrip"
            if args.ldmkit_compile or args.diffusers_compile:
                key += f"/compile-{args.ldmkit_compile}-{args.diffusers_compile}"
            results["cases"][key] = entry
            print(key, json.dumps(entry, indent=1), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
