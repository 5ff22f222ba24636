"""Issue 28's first target with 300 samples per model (30 per class, DDIM 50, guidance 3): a full
fine-tune retrained to 300 steps (runs/finetune/full300) against the from-scratch model at 900
steps (runs/finetune/scratch, from finetune_fashion_mnist.py). Run after that script:

    .venv/bin/python benchmarks/finetune_confirm.py
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, "benchmarks")
import finetune_fashion_mnist as ft

work = Path("runs/finetune")
run_dir = work / "full300"
base = work / "base"
cmd = [ft.LDMKIT, "train", *ft.RECIPE, "first_stage.checkpoint=runs/demo/kl_f4", "data.path=data/fashion_mnist",
       "data.channels=1", f"run_dir={run_dir}", "trainer.max_steps=300", "trainer.checkpoint_every=300",
       f"trainer.init_from={base / 'pipeline'}", "trainer.init_strict=false", "scale_factor=1.0"]
if not (run_dir / "pipeline").is_dir():
    ft.run(cmd, work / "log.txt")
classifier, stats = ft.real_features()
out = {name: ft.evaluate(work / name / "pipeline", 30, stats, classifier) for name in ("full300", "scratch")}
print(json.dumps(out, indent=1))
Path("benchmarks/results/finetune_confirm_300_samples.json").write_text(json.dumps(out, indent=2) + "\n")
