"""Stage-2 step time with the latent cache vs encoding each batch on the fly.

Both variants train the same model (``first_stage=kl_f4_small``, ``denoiser=unet_tiny``,
class-conditional) on the same Fashion-MNIST shards; they alternate for ``--repeats``
rounds of ``--steps`` steps each, and the median seconds per step (data loading included)
are compared. The one-off cost of building the cache is reported separately.

    ldmkit data prepare fashion_mnist out=data/fashion_mnist
    .venv/bin/python benchmarks/ldm_latent_cache.py --steps 60 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def overrides(run_dir: Path, cache: bool, steps: int, batch: int, data: str) -> list[str]:
    return [
        "stage=ldm", "trainer=ldm", "first_stage=kl_f4_small", "first_stage.in_channels=1",
        "first_stage.out_ch=1", "data=fashion_mnist", f"data.path={data}", "data.channels=1",
        "denoiser=unet_tiny", "conditioner=class_label", "image_size=32", f"run_dir={run_dir}",
        f"trainer.max_steps={steps}", f"trainer.batch_size={batch}", f"trainer.latent_cache={str(cache).lower()}",
        "trainer.progress=false", "trainer.tensorboard=false", "trainer.sample_every=0",
        "trainer.val_every=0", "trainer.val_batches=0", "trainer.checkpoint_every=0", "trainer.log_every=0",
        "trainer.warmup_steps=0",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--data", default="data/fashion_mnist")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/ldm_latent_cache.json"))
    args = parser.parse_args()

    from ldmkit.config import compose_config
    from ldmkit.training.ldm import LDMTrainer

    root = Path(tempfile.mkdtemp(prefix="ldm_cache_bench_"))
    per_step = {"on the fly": [], "latent cache": []}
    cache_seconds = None
    try:
        # build the cache once (timed), outside the measured rounds
        cached_run = root / "cached"
        trainer = LDMTrainer(compose_config(overrides(cached_run, True, 1, args.batch, args.data)))
        started = time.perf_counter()
        trainer.fit()
        cache_seconds = time.perf_counter() - started
        for r in range(args.repeats):
            for name, cache in (("on the fly", False), ("latent cache", True)):
                run = root / f"{name.replace(' ', '_')}_{r}"
                if cache:  # reuse the built cache; the run itself starts fresh
                    shutil.copytree(cached_run / "latent_cache", run / "latent_cache")
                trainer = LDMTrainer(compose_config(overrides(run, cache, args.steps, args.batch, args.data)))
                trainer.fit()
                per_step[name].append(trainer.train_seconds / args.steps)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    medians = {k: statistics.median(v) for k, v in per_step.items()}
    result = {
        "steps": args.steps, "repeats": args.repeats, "batch": args.batch,
        "seconds_per_step": per_step, "median_seconds_per_step": medians,
        "speedup": medians["on the fly"] / medians["latent cache"],
        "cache_build_seconds_incl_1_step": cache_seconds,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
