"""precision=auto|fp32|bf16|fp16: what auto picks (from CPU flags, faked here), that bf16 runs
each first-party model close to float32, and that the choice reaches training and sampling."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

import ldmkit
from ldmkit import precision
from ldmkit.config import compose_config
from ldmkit.errors import LdmkitError
from ldmkit.training import train


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({"avx512f", "avx512_bf16"}, "bf16"),  # Cooper Lake, Sapphire Rapids, Zen 4
        ({"avx512f", "amx_bf16", "amx_tile"}, "bf16"),  # AMX
        ({"avx2", "avx512f", "avx512_vnni"}, "fp32"),  # Skylake/Cascade Lake: no bf16 units
        (set(), "fp32"),  # no flags readable (an ARM box, a sandbox)
    ],
)
def test_auto_follows_the_cpu_flags(flags, expected):
    assert precision.resolve("auto", "cpu", flags=flags) == expected


def test_explicit_choices_and_aliases():
    assert precision.resolve("fp32", "cpu", flags={"avx512_bf16"}) == "fp32"
    assert precision.resolve("bfloat16", "cpu", flags=set()) == "bf16"
    assert precision.check("half") == "fp16"
    with pytest.raises(
        precision.PrecisionError, match=r"trainer\.precision='fp8'.*auto, fp32, bf16, fp16"
    ):
        precision.check("fp8", key="trainer.precision")


def test_auto_matches_this_machines_cpuinfo():
    flags = precision.cpu_flags()
    expected = "bf16" if {"avx512_bf16", "amx_bf16"} & flags else "fp32"
    if not flags:
        pytest.skip("/proc/cpuinfo has no flags here")
    assert precision.resolve("auto", "cpu") == expected
    assert expected in precision.reason("auto", expected, "cpu")


def test_autocast_context_and_grad_scaler():
    x = torch.randn(4, 8)
    w = torch.randn(8, 8)
    with precision.autocast("bf16", "cpu"):
        assert (x @ w).dtype == torch.bfloat16
        with precision.float32():
            assert (x @ w).dtype == torch.float32
    with precision.autocast("fp32", "cpu"):
        assert (x @ w).dtype == torch.float32
    with pytest.raises(precision.PrecisionError, match="resolved"):
        precision.autocast("auto", "cpu")
    assert precision.grad_scaler("fp16", "cpu").is_enabled()
    assert not precision.grad_scaler("bf16", "cpu").is_enabled()


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


# each first-party model in bf16 against itself in float32: bf16 keeps 8 bits of mantissa
# (relative step 2^-8 = 0.4%), so a network of a few dozen layers lands within a few percent
BF16_TOLERANCE = 0.05


@pytest.mark.parametrize(
    "overrides",
    [
        [
            "denoiser=unet_tiny",
            "conditioner=class_label",
            "conditioner.embed_dim=16",
            "first_stage=identity",
        ],
        ["denoiser=unet_tiny", "conditioner=none", "first_stage=kl_tiny"],
    ],
    ids=["unet+class_label", "unet+kl_tiny"],
)
def test_bf16_forward_of_first_party_models_is_close_to_fp32(overrides):
    torch.manual_seed(0)
    pipe = ldmkit.compose(overrides + ["image_size=16"]).eval()
    with torch.no_grad():  # trained-looking weights: zero-initialised outputs would hide errors
        for p in pipe.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(4, pipe.first_stage.image_channels, 16, 16, generator=gen) * 2 - 1
    torch.manual_seed(2)  # a KL encode samples its posterior: the same draw in both precisions
    z = pipe.first_stage.encode(images)
    t = torch.tensor([10, 200, 500, 900])
    cond = (
        pipe.conditioner({"label": torch.tensor([0, 1, 2, 3])})
        if pipe.conditioner.input_keys
        else {}
    )

    def run():
        out = {"eps": pipe.denoiser(z, t, cond), "decode": pipe.first_stage.decode(z)}
        torch.manual_seed(2)
        return {**out, "encode": pipe.first_stage.encode(images)}

    with torch.no_grad():
        ref = run()
        with precision.autocast("bf16", "cpu"):
            low = run()
    for name in ref:
        err = _relative_error(low[name], ref[name])
        assert err < BF16_TOLERANCE, f"{name}: bf16 relative error {err:.3g}"
    assert _relative_error(low["eps"], ref["eps"]) > 0, "bf16 autocast did not change anything"


def test_pipeline_sample_precisions_agree_and_bad_name_is_an_error():
    torch.manual_seed(0)
    pipe = ldmkit.compose(
        [
            "denoiser=unet_tiny",
            "conditioner=class_label",
            "conditioner.embed_dim=16",
            "first_stage=identity",
            "image_size=8",
            "sampler.steps=10",
        ]
    ).eval()
    with torch.no_grad():
        for p in pipe.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    batch = {"label": [0, 1, 2, 3]}
    a = pipe.sample(batch, guidance_scale=2.0, seed=0, precision="fp32")
    b = pipe.sample(batch, guidance_scale=2.0, seed=0, precision="bf16")
    assert a.dtype == b.dtype == torch.float32  # the decode and the sampler stay float32
    assert 0 < float((a - b).abs().mean()) < 0.02
    with pytest.raises(ValueError, match="precision='fp64'"):
        pipe.sample(batch, precision="fp64")


def test_training_records_the_resolved_precision(tmp_path):
    def data(split, epoch):
        gen = torch.Generator().manual_seed(epoch)
        return [
            {
                "image": torch.rand(4, 3, 8, 8, generator=gen) * 2 - 1,
                "label": torch.randint(0, 10, (4,), generator=gen),
            }
            for _ in range(2)
        ]

    cfg = compose_config(
        [
            "stage=ldm",
            "trainer=ldm_tiny",
            "first_stage=identity",
            "denoiser=unet_tiny",
            "conditioner=class_label",
            "conditioner.embed_dim=16",
            "image_size=8",
            f"run_dir={tmp_path / 'run'}",
            "trainer.tensorboard=false",
            "trainer.max_steps=2",
            "trainer.precision=auto",
        ]
    )
    run = train(cfg, data=data)
    recorded = OmegaConf.load(run / "config.yaml").trainer.precision
    assert recorded == precision.resolve("auto", "cpu")
    bad = cfg.copy()
    bad.trainer.precision = "fp8"
    bad.run_dir = str(tmp_path / "bad")
    with pytest.raises(LdmkitError, match="trainer.precision='fp8'"):
        train(bad, data=data)
