"""CUDA-only paths: attention kernels in bf16 (SDPA's flash and memory-efficient backends,
xformers), training steps in bf16/fp16 autocast, sampling in bf16 against float32, and a
one-GPU NCCL ``torchrun``. Skipped without a GPU; ``benchmarks/gpu_suite.py`` runs them
(``pytest -m cuda``) where one exists."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ldmkit.config import compose_config
from ldmkit.nn.attention import (
    attention,
    xformers_available,
    xformers_cuda_problem,
    xformers_usable_on_cuda,
)
from ldmkit.pipeline import Pipeline
from ldmkit.training import train
from ldmkit.training.checkpoint import CheckpointManager, load_state, read_safetensors

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
ROOT = Path(__file__).resolve().parents[1]


def qkv(dtype, b=2, h=4, n=256, m=77, d=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, s, d, generator=gen).to("cuda", dtype) for s in (n, m, m)]


def exact(q, k, v):
    q, k, v = (x.double() for x in (q, k, v))
    return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1) @ v


@pytest.mark.parametrize("backend", ["sdpa", "math", "chunked", "xformers"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_attention_backends_on_cuda(backend, dtype):
    if backend == "xformers" and not xformers_usable_on_cuda():
        pytest.skip(xformers_cuda_problem() or "xformers unusable")
    q, k, v = qkv(dtype)
    out = attention(q, k, v, backend=backend, chunk_size=64)
    assert out.dtype == dtype and out.device.type == "cuda"
    tol = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]
    err = (out.double() - exact(q, k, v)).abs().max().item()
    assert err < tol, f"{backend} {dtype}: max error {err:.3g} > {tol}"


@pytest.mark.skipif(not xformers_available(), reason="xformers is not installed")
def test_xformers_without_cuda_kernels_falls_back_or_explains():
    """An xformers wheel without kernels for this torch/CUDA: ``auto`` uses SDPA, an explicit
    ``xformers`` names the problem (not a deep NotImplementedError from its dispatcher)."""
    from ldmkit.nn.attention import resolve_attention_backend

    q, k, v = qkv(torch.float16)
    problem = xformers_cuda_problem()
    assert resolve_attention_backend("auto", q) == ("sdpa" if problem else "xformers")
    if problem:
        with pytest.raises(ValueError, match="no usable CUDA kernel"):
            attention(q, k, v, backend="xformers")
    else:
        assert (attention(q, k, v, backend="xformers").double() - exact(q, k, v)).abs().max() < 4e-3


@pytest.mark.parametrize("kernel", ["FLASH_ATTENTION", "EFFICIENT_ATTENTION"])
def test_sdpa_fused_kernels_run_for_bf16(kernel):
    """The fused SDPA kernels accept ldmkit's layout in bf16 (with only that kernel allowed,
    SDPA raises instead of falling back to the math kernel)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = qkv(torch.bfloat16)
    with sdpa_kernel(getattr(SDPBackend, kernel)):
        out = attention(q, k, v, backend="sdpa")
    assert (out.double() - exact(q, k, v)).abs().max().item() < 2e-2


def _ldm_cfg(tmp_path, precision, *extra):
    return compose_config(
        [
            "stage=ldm",
            "trainer=ldm_tiny",
            "first_stage=identity",
            "denoiser=unet_tiny",
            "conditioner=class_label",
            "conditioner.embed_dim=16",
            "sampler=ddim",
            "image_size=8",
            f"run_dir={tmp_path / precision}",
            "trainer.device=cuda",
            f"trainer.precision={precision}",
            "trainer.tensorboard=false",
            *extra,
        ]
    )


def _data(split, epoch):
    gen = torch.Generator().manual_seed(100 * epoch + (split == "train"))
    for _ in range(4):
        yield {
            "image": torch.rand(4, 3, 8, 8, generator=gen) * 2 - 1,
            "label": torch.randint(0, 10, (4,), generator=gen),
        }


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32", "auto"])
def test_ldm_training_steps_on_cuda(tmp_path, precision):
    run = train(_ldm_cfg(tmp_path, precision), data=_data)
    latest = CheckpointManager(run / "checkpoints").latest()
    weights = read_safetensors(latest.model_file)
    assert all(torch.isfinite(w).all() for w in weights.values())
    state = load_state(latest)
    saved = (run / "config.yaml").read_text()
    resolved = "bf16" if precision == "auto" else precision
    assert f"precision: {resolved}" in saved  # the run's config records the resolved choice
    # fp16 scales the loss (and checkpoints the scale); bf16/fp32 need no scaler
    assert (state["grad_scaler"] is not None) == (precision == "fp16")
    images = Pipeline.load(run / "pipeline", device="cuda").sample(
        {"label": [1, 2]}, guidance_scale=2.0, seed=0, steps=2, precision=resolved
    )
    assert images.shape == (2, 3, 8, 8) and torch.isfinite(images).all()


def test_autoencoder_training_steps_on_cuda_bf16(tmp_path):
    cfg = compose_config(
        [
            "stage=autoencoder",
            "first_stage=kl_tiny",
            "trainer=autoencoder_tiny",
            f"run_dir={tmp_path / 'ae'}",
            "trainer.tensorboard=false",
            "trainer.device=cuda",
            "trainer.precision=bf16",
        ]
    )
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(8, 3, 16, 16, generator=gen) * 2 - 1

    def data(split, epoch):
        return [{"image": images[i : i + 4]} for i in (0, 4)]

    run = train(cfg, data=data)
    weights = read_safetensors(CheckpointManager(run / "checkpoints").latest().model_file)
    assert weights and all(torch.isfinite(w).all() for w in weights.values())


def test_bf16_sampling_matches_fp32_on_cuda():
    pipe = Pipeline.load(_trained_tiny_pipeline(), device="cuda").eval()
    batch = {"label": list(range(8))}
    a = pipe.sample(batch, guidance_scale=3.0, seed=0, steps=10, precision="fp32")
    b = pipe.sample(batch, guidance_scale=3.0, seed=0, steps=10, precision="bf16")
    assert (a - b).abs().mean().item() < 2e-2, "bf16 sampling drifted from float32"


_TRAINED: list[Path] = []


def _trained_tiny_pipeline() -> Path:
    if not _TRAINED:
        import tempfile

        tmp = Path(tempfile.mkdtemp())
        _TRAINED.append(train(_ldm_cfg(tmp, "fp32"), data=_data) / "pipeline")
    return _TRAINED[0]


WORKER = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch
    import torch.distributed as dist
    from ldmkit.config import compose_config
    from ldmkit.training import distributed_process_group
    from ldmkit.training.ldm import LDMTrainer

    run_dir, out = sys.argv[1:3]
    cfg = compose_config([
        "stage=ldm", "trainer=ldm_tiny", "first_stage=identity", "denoiser=unet_tiny",
        "conditioner=class_label", "conditioner.embed_dim=16", "image_size=8",
        f"run_dir={run_dir}", "trainer.max_steps=4", "trainer.tensorboard=false",
    ])

    def data(split, epoch):
        gen = torch.Generator().manual_seed(epoch)
        for _ in range(4):
            yield {"image": torch.rand(2, 3, 8, 8, generator=gen) * 2 - 1,
                   "label": torch.randint(0, 10, (2,), generator=gen)}

    with distributed_process_group():
        x = torch.ones(1, device="cuda") * (dist.get_rank() + 1)
        dist.all_reduce(x)
        trainer = LDMTrainer(cfg, data=data)
        trainer.fit()
        Path(out).write_text(json.dumps({
            "backend": dist.get_backend(), "world": dist.get_world_size(), "sum": float(x),
            "device": str(trainer.device), "step": trainer.step,
        }))
""")


def test_torchrun_nccl_one_gpu(tmp_path):
    (tmp_path / "worker.py").write_text(WORKER)
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(
        [
            *torchrun,
            "--standalone",
            "--nproc_per_node=1",
            str(tmp_path / "worker.py"),
            str(tmp_path / "run"),
            str(tmp_path / "result.json"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result == {"backend": "nccl", "world": 1, "sum": 1.0, "device": "cuda:0", "step": 4}
