"""compile=true (ldmkit.compiling): values, in-place compilation that keeps parameter names,
the trainers' and the sampler's wiring. Kernels are compiled with torch.compile's ``eager``
backend here (it traces the model through dynamo without generating code, seconds on a CPU);
one test runs inductor itself on a tiny UNet. The CUDA figures are in docs/performance.md."""

from __future__ import annotations

import pytest
import torch
import yaml

import ldmkit
from ldmkit.compiling import CompileSettingError, check_compile, compile_module, is_compiled
from ldmkit.pipeline import SampleArgumentError


@pytest.mark.parametrize(
    ("value", "mode"),
    [
        (False, None),
        (None, None),
        ("false", None),
        (True, "default"),
        ("true", "default"),
        ("reduce-overhead", "reduce-overhead"),
        ("max-autotune", "max-autotune"),
        ("auto", "auto"),
        ("AUTO", "auto"),
    ],
)
def test_values(value, mode):
    assert check_compile(value) == mode


@pytest.mark.parametrize("bad", ["fast", 3, "max_autotune"])
def test_bad_values_name_the_key(bad):
    with pytest.raises(CompileSettingError, match=r"trainer\.compile="):
        check_compile(bad, key="trainer.compile")


def tiny_unet():
    torch.manual_seed(0)
    return ldmkit.compose(
        overrides=["denoiser=unet_tiny", "first_stage=identity", "image_size=8"]
    ).denoiser.eval()


def test_compiled_in_place_keeps_names_and_outputs():
    unet = tiny_unet()
    names = list(unet.state_dict())
    x, t = torch.randn(2, unet.in_channels, 8, 8), torch.tensor([3, 700])
    with torch.no_grad():
        before = unet(x, t, {})
    assert compile_module(unet, True, backend="eager")
    assert is_compiled(unet) and list(unet.state_dict()) == names  # checkpoints unchanged
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, {}), before)
    assert not compile_module(tiny_unet(), False)


def test_inductor_on_cpu_warns_and_matches(monkeypatch):
    """The real inductor backend on a CPU without bf16 units (flags faked): allowed, with the
    note that it does not pay there, and numerically the same model."""
    monkeypatch.setattr("ldmkit.precision.cpu_flags", lambda: frozenset({"avx2", "fma"}))
    unet = tiny_unet()
    x, t = torch.randn(1, unet.in_channels, 8, 8), torch.tensor([500])
    with torch.no_grad():
        before = unet(x, t, {})
    with pytest.warns(UserWarning, match="without gain on such CPUs"):
        compile_module(unet, True, device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, {}), before, atol=1e-4, rtol=1e-4)


def test_pipeline_sample_compiles_the_denoiser(monkeypatch):
    pipe = ldmkit.compose(
        overrides=[
            "conditioner=class_label",
            "first_stage=identity",
            "image_size=8",
            "sampler=ddim",
            "sampler.steps=2",
        ]
    ).eval()
    reference = pipe.sample({"label": [1, 2]}, seed=0)
    import ldmkit.pipeline as pipeline_module

    real = pipeline_module.compile_module
    monkeypatch.setattr(
        pipeline_module,
        "compile_module",
        lambda m, s, **kw: real(m, s, **{**kw, "backend": "eager"}),
    )
    compiled = pipe.sample({"label": [1, 2]}, seed=0, compile=True)
    # precision=auto: in fp32 the denoiser itself is compiled; in bf16 its low-precision copy,
    # which is kept on the pipeline and stays compiled for the next call
    resolved = ldmkit.precision.resolve("auto", "cpu")
    assert is_compiled(pipe.sampling_denoiser(resolved))
    assert is_compiled(pipe.denoiser) == (resolved == "fp32")
    torch.testing.assert_close(compiled, reference)
    with pytest.raises(SampleArgumentError, match="compile='fast'"):
        pipe.sample({"label": [1]}, seed=0, compile="fast")


def _ldm_data(split, epoch):
    gen = torch.Generator().manual_seed(100 * epoch + (split == "train"))
    for _ in range(2):
        yield {
            "image": torch.rand(2, 3, 8, 8, generator=gen) * 2 - 1,
            "label": torch.randint(0, 10, (2,), generator=gen),
        }


def _ae_data(split, epoch):
    gen = torch.Generator().manual_seed(100 * epoch + (split == "train"))
    for _ in range(2):
        yield {"image": torch.rand(2, 3, 16, 16, generator=gen) * 2 - 1}


@pytest.mark.parametrize("stage", ["ldm", "autoencoder"])
def test_trainers_compile_in_place(tmp_path, monkeypatch, stage):
    """trainer.compile=true (eager backend): the stage's model is compiled, the run records the
    setting, and the exported weights carry the uncompiled names."""
    from ldmkit.config import compose_config
    from ldmkit.training import train

    calls = []
    original = torch.nn.Module.compile

    def spy(self, *args, **kwargs):
        calls.append((type(self).__name__, kwargs))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "compile", spy)
    threads = torch.get_num_threads()
    common = [
        f"run_dir={tmp_path / 'run'}",
        "trainer.compile=true",
        "trainer.compile_backend=eager",
        "trainer.tensorboard=false",
        "trainer.num_threads=1",
        "trainer.max_steps=2",
        "trainer.precision=fp32",
    ]
    if stage == "ldm":
        cfg = compose_config(
            [
                "stage=ldm",
                "trainer=ldm_tiny",
                "first_stage=identity",
                "denoiser=unet_tiny",
                "conditioner=class_label",
                "conditioner.embed_dim=16",
                "image_size=8",
                *common,
            ]
        )
        run = train(cfg, data=_ldm_data)
        assert calls == [("UNetModel", {"backend": "eager"})]
        from ldmkit.pipeline import Pipeline

        names = set(Pipeline.load(run / "pipeline").state_dict())
        assert names and not any("_orig_mod" in n for n in names)
    else:
        cfg = compose_config(
            ["stage=autoencoder", "first_stage=kl_tiny", "trainer=autoencoder_tiny", *common]
        )
        run = train(cfg, data=_ae_data)
        assert [c[0] for c in calls] == ["KLAutoencoder"]
    torch.set_num_threads(threads)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["trainer"]["compile"] is True
