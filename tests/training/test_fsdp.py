"""``trainer.strategy=fsdp`` under a real ``torchrun`` (gloo, CPU): stage 2 sharded by FSDP2
trains, writes sharded checkpoints through torch.distributed.checkpoint, resumes bitwise,
exports a normal ``pipeline/``, matches DDP, and resumes on another number of ranks with one
line saying exactness is lost."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ldmkit.data import prepare
from tests.data.conftest import make_image_folder
from tests.training.test_distributed_ldm import _environment

WORKER = textwrap.dedent('''
    import hashlib, json, sys
    from pathlib import Path
    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file
    from ldmkit.config import compose_config
    from ldmkit.training import distributed_process_group
    from ldmkit.training.fsdp import full_state
    from ldmkit.training.ldm import LDMTrainer

    shards, run_dir, out, *overrides = sys.argv[1:]
    cfg = compose_config([
        "stage=ldm", "trainer=ldm_tiny", "first_stage=identity", "denoiser=unet_tiny",
        "conditioner=class_label", "conditioner.num_classes=3", "conditioner.embed_dim=16",
        "data=image_folder", f"data.path={shards}", "data.resampled=false", "data.flip=false",
        "image_size=8", f"run_dir={run_dir}", "trainer.batch_size=2", "trainer.precision=fp32",
        "trainer.checkpoint_every=2", "trainer.sample_every=2", "trainer.val_every=2",
        "trainer.grad_clip=0.5", "trainer.ema.decay=0.9", *overrides,
    ])

    def digest(state):
        h = hashlib.sha256()
        for name, t in sorted(state.items()):
            h.update(name.encode()); h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    with distributed_process_group():
        rank = dist.get_rank()
        trainer = LDMTrainer(cfg)
        trainer.fit()
        weights, ema = full_state(trainer.trainable), full_state(trainer.ema)
        trainer.step_module.eval()
        with trainer._sampling_weights():  # the sharded model samples on every rank
            images = trainer.pipeline.sample({"label": torch.tensor([0, 2])}, steps=2, seed=3,
                                             image_size=8, guidance_scale=1.0, precision="fp32")
        if rank == 0:
            save_file({k: v.contiguous() for k, v in weights.items()}, str(Path(out, "weights.safetensors")))
            torch.save(images, Path(out, "images.pt"))
            result = {"world": dist.get_world_size(), "step": trainer.step, "weights": digest(weights),
                      "ema": digest(ema)}
            Path(out, "result.json").write_text(json.dumps(result))
''')


def _torchrun(tmp: Path, shards: Path, run: Path, out: Path, *overrides: str, ranks: int = 2):
    out.mkdir(parents=True, exist_ok=True)
    torchrun = Path(sys.executable).with_name("torchrun")
    done = subprocess.run(
        [str(torchrun), "--standalone", f"--nproc_per_node={ranks}", str(tmp / "worker.py"),
         str(shards), str(run), str(out), *overrides],
        capture_output=True, text=True, env=_environment(), timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((out / "result.json").read_text()), done.stderr


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Shards, the worker, and the uninterrupted 2-rank FSDP run of 4 steps."""
    tmp = tmp_path_factory.mktemp("fsdp")
    make_image_folder(tmp / "images", per_class=8, size=(8, 8))
    prepare("image_folder", tmp / "shards", path=str(tmp / "images"), shard_size=4, progress=False)
    (tmp / "worker.py").write_text(WORKER)
    result, _ = _torchrun(tmp, tmp / "shards", tmp / "fsdp", tmp / "out_fsdp",
                          "trainer.strategy=fsdp", "trainer.max_steps=4")  # fmt: skip
    return tmp, result


@pytest.mark.slow
def test_fsdp_trains_writes_sharded_checkpoints_and_a_pipeline_that_samples_the_same(runs):
    from ldmkit.pipeline import Pipeline

    tmp, result = runs
    assert result["world"] == 2 and result["step"] == 4
    checkpoint = tmp / "fsdp" / "checkpoints" / "step_000000004"
    meta = json.loads((checkpoint / "meta.json").read_text())
    # each rank wrote its shard, rank 0 the metadata; no whole-model file
    assert {"sharded/.metadata", "sharded/__0_0.distcp", "sharded/__1_0.distcp"} <= set(meta["files"])
    assert not (checkpoint / "model.safetensors").exists()
    assert not [p for p in (tmp / "fsdp" / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    # the exported pipeline is a normal one, and samples what the sharded EMA model sampled
    pipe = Pipeline.load(tmp / "fsdp" / "pipeline")
    # (float32 on both sides: the comparison is of the weights, not of two bf16 paths)
    images = pipe.sample({"label": torch.tensor([0, 2])}, steps=2, seed=3, image_size=8, guidance_scale=1.0,
                         precision="fp32")
    torch.testing.assert_close(images, torch.load(tmp / "out_fsdp" / "images.pt"), rtol=1e-5, atol=1e-5)
    assert (tmp / "fsdp" / "images" / "ldm_step_000000004.png").is_file()  # grids sampled on both ranks


@pytest.mark.slow
def test_fsdp_resume_is_bitwise(runs):
    """The uninterrupted run's sharded checkpoint of step 2, its later steps gone (a run killed
    after step 2), resumed to step 4 ends bitwise where the uninterrupted run ended."""
    tmp, uninterrupted = runs
    run = tmp / "resumed"
    shutil.copytree(tmp / "fsdp", run)
    shutil.rmtree(run / "checkpoints" / "step_000000004")
    shutil.rmtree(run / "pipeline")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000000002"]
    assert (run / "checkpoints" / "step_000000002" / "sharded" / "__1_0.distcp").is_file()
    meta = run / "checkpoints" / "step_000000002" / "meta.json"
    written = (meta.stat().st_ino, meta.stat().st_mtime_ns)
    resumed, _ = _torchrun(tmp, tmp / "shards", run, tmp / "out_resumed", "trainer.strategy=fsdp",
                           "trainer.max_steps=4")  # fmt: skip
    assert resumed["step"] == 4
    # resumed, not trained again from step 0 (which would also end equal): step 2 was not rewritten
    assert (meta.stat().st_ino, meta.stat().st_mtime_ns) == written
    assert (resumed["weights"], resumed["ema"]) == (uninterrupted["weights"], uninterrupted["ema"])


@pytest.mark.slow
def test_fsdp_weights_equal_ddp_weights(runs):
    from safetensors.torch import load_file

    tmp, _ = runs
    _torchrun(tmp, tmp / "shards", tmp / "ddp", tmp / "out_ddp", "trainer.strategy=ddp", "trainer.max_steps=4")
    ddp, sharded = (load_file(tmp / f"out_{s}" / "weights.safetensors") for s in ("ddp", "fsdp"))
    assert ddp.keys() == sharded.keys()
    # DDP all-reduces, FSDP reduce-scatters: the sums differ in rounding, and AdamW turns a
    # near-zero gradient's rounding into a step of up to lr (1e-3) — seen: 2e-5 on biases
    # whose gradient GroupNorm cancels; a wrong gradient or shard moves weights by ~lr
    for name in ddp:
        torch.testing.assert_close(sharded[name], ddp[name], rtol=1e-5, atol=1e-4, msg=name)


@pytest.mark.slow
def test_resuming_on_one_rank_reshards_with_one_line(runs):
    tmp, _ = runs
    run = tmp / "one_rank"
    shutil.copytree(tmp / "fsdp", run)
    result, stderr = _torchrun(tmp, tmp / "shards", run, tmp / "out_one", "trainer.strategy=fsdp",
                               "trainer.max_steps=5", ranks=1)  # fmt: skip
    assert result == {**result, "world": 1, "step": 5}
    line = ("the checkpoint was written by 2 rank(s), this run has 1: random streams and data positions "
            "cannot be restored exactly; the sharded weights and optimizer states are resharded")  # fmt: skip
    assert stderr.count(line) == 1, stderr[-3000:]


def test_fsdp_without_torchrun_is_one_line(tmp_path):
    run = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-m", "ldmkit.cli", "train", "stage=ldm", "trainer=ldm_tiny", "first_stage=identity",
         "denoiser=unet_tiny", "image_size=8", f"run_dir={run}", "trainer.strategy=fsdp"],
        capture_output=True, text=True, env=_environment(), timeout=300,
    )  # fmt: skip
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1] == (
        "ldmkit train: error: trainer.strategy=fsdp shards the model across the processes torchrun starts: "
        "launch with `torchrun --nproc_per_node=N -m ldmkit.cli train ...` (N=1 included)"
    ), out.stderr
    assert not (run / "checkpoints").exists()


def test_mixed_precision_policy_follows_trainer_precision():
    from ldmkit.training.fsdp import mixed_precision

    bf16 = mixed_precision("bf16")
    assert (bf16.param_dtype, bf16.reduce_dtype, bf16.output_dtype) == (torch.bfloat16, torch.float32, torch.float32)
    fp32 = mixed_precision("fp32")
    assert (fp32.param_dtype, fp32.reduce_dtype, fp32.output_dtype) == (None, torch.float32, None)


@pytest.mark.slow
def test_fsdp_accumulated_micro_batches_equal_one_batch(runs):
    """K=2 micro-batches of 1 per rank (FSDP2 units keep their gradients local until the last
    one: ``set_requires_gradient_sync(False)``) train like the fixture's batches of 2."""
    from safetensors.torch import load_file

    tmp, _ = runs
    _torchrun(tmp, tmp / "shards", tmp / "accumulated", tmp / "out_accumulated", "trainer.strategy=fsdp",
              "trainer.max_steps=4", "trainer.batch_size=1", "trainer.accumulate_grad_batches=2")  # fmt: skip
    whole, accumulated = (load_file(tmp / f"out_{s}" / "weights.safetensors") for s in ("fsdp", "accumulated"))
    for name in whole:  # the same tolerance as FSDP vs DDP, for the same reason
        torch.testing.assert_close(accumulated[name], whole[name], rtol=1e-5, atol=1e-4, msg=name)


@pytest.mark.slow
def test_fsdp_keeps_frozen_parameters_frozen(runs):
    """``trainer.frozen`` under FSDP: the frozen blocks sit in the same sharded units as the
    trained ones; after training they are bit for bit what DDP (whose frozen weights are the
    initial ones, tests/test_freezing.py) left, while the rest trains as under DDP."""
    from safetensors.torch import load_file

    tmp, _ = runs
    frozen = "trainer.frozen=[denoiser.input_blocks]"
    for strategy in ("ddp", "fsdp"):
        _torchrun(tmp, tmp / "shards", tmp / f"frozen_{strategy}", tmp / f"out_frozen_{strategy}",
                  f"trainer.strategy={strategy}", "trainer.max_steps=2", frozen)  # fmt: skip
    ddp, sharded = (load_file(tmp / f"out_frozen_{s}" / "weights.safetensors") for s in ("ddp", "fsdp"))
    assert ddp.keys() == sharded.keys()
    still = [name for name in ddp if ".input_blocks." in name]
    assert still and len(still) < len(ddp)
    for name in ddp:
        if name in still:
            assert torch.equal(sharded[name], ddp[name]), f"{name} moved under FSDP"
        else:
            torch.testing.assert_close(sharded[name], ddp[name], rtol=1e-5, atol=1e-4, msg=name)
    trained = load_file(tmp / "out_fsdp" / "weights.safetensors")  # the fixture's run, nothing frozen
    assert any(not torch.equal(trained[name], sharded[name]) for name in still)  # they would have moved
