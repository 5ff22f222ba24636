"""``compile=aot``: the sampling denoiser compiled ahead of time (AOTInductor), kept on disk
and loaded by later pipelines (:mod:`ldmkit.aot`). One real compile of ``unet_tiny`` (about
30 s on 2 cores); the rest loads it or never compiles."""

from __future__ import annotations

import pytest
import torch

import ldmkit
from ldmkit.aot import PackagedDenoiser
from ldmkit.compiling import CompileSettingError, compile_module
from ldmkit.pipeline import Pipeline

pytest.importorskip("torch._inductor")

BATCH = {"label": [1, 4, 7]}


def _pipe() -> Pipeline:
    torch.manual_seed(0)
    pipe = ldmkit.compose(["denoiser=unet_tiny", "conditioner=class_label", "first_stage=kl_tiny", "image_size=16",
                           "sampler=ddim", "sampler.steps=4"]).eval()  # fmt: skip
    with torch.no_grad():  # zero-initialised output layers would make every sample the same
        generator = torch.Generator().manual_seed(5)
        for p in pipe.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return pipe


def test_a_package_is_compiled_once_then_loaded_by_later_pipelines(tmp_path, monkeypatch):
    monkeypatch.setenv("LDMKIT_AOT_CACHE", str(tmp_path / "cache"))
    pipe = _pipe()
    fp32 = pipe.sample(BATCH, seed=0, precision="fp32")
    eager = pipe.sample(BATCH, seed=0, precision="bf16")
    packaged = pipe.sample(BATCH, seed=0, precision="bf16", compile="aot")
    wrapper = pipe.__dict__["_aot_denoiser"][1]
    assert isinstance(wrapper, PackagedDenoiser) and (wrapper.compiled, wrapper.loaded) == (1, 0)
    # the compiled bf16 network: as close to float32 as the eager bf16 one (measured 0.0102 vs 0.0094)
    bf16_error = float((eager - fp32).abs().max())
    assert float((packaged - fp32).abs().max()) < 2 * bf16_error
    assert float((packaged - eager).abs().max()) < 2 * bf16_error
    assert torch.equal(pipe.sample(BATCH, seed=0, precision="bf16", compile="aot"), packaged)
    assert wrapper.compiled == 1  # the same signature: the package already loaded
    packages = list((tmp_path / "cache").glob("*.pt2"))
    assert len(packages) == 1 and not list((tmp_path / "cache").glob(".*"))  # no partial file left

    pipe.save(tmp_path / "saved")
    later = Pipeline.load(tmp_path / "saved")  # another pipeline with the same weights: loads
    assert torch.equal(later.sample(BATCH, seed=0, precision="bf16", compile="aot"), packaged)
    later_wrapper = later.__dict__["_aot_denoiser"][1]
    assert (later_wrapper.compiled, later_wrapper.loaded) == (0, 1)

    signature = next(iter(later_wrapper._runners))
    with torch.no_grad():
        next(later.denoiser.parameters()).add_(1e-2)  # new weights: a new copy, a new key
    changed = later._packaged(later.sampling_denoiser("bf16"))
    assert changed is not later_wrapper and changed.key(signature) != later_wrapper.key(signature)
    # float32 samples on the denoiser itself, the same module after an in-place change: a new
    # wrapper and key all the same (no package of the old weights is run on the new ones)
    fp32_wrapper = later._packaged(later.sampling_denoiser("fp32"))
    assert later._packaged(later.sampling_denoiser("fp32")) is fp32_wrapper
    old_key = fp32_wrapper.key(signature)
    with torch.no_grad():
        next(later.denoiser.parameters()).add_(1e-2)
    fresh = later._packaged(later.sampling_denoiser("fp32"))
    assert fresh is not fp32_wrapper and fresh.key(signature) != old_key


def test_a_denoiser_export_cannot_trace_samples_eagerly_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("LDMKIT_AOT_CACHE", str(tmp_path / "cache"))

    def refuse(*args, **kwargs):
        raise RuntimeError("data-dependent control flow")

    monkeypatch.setattr(torch.export, "export", refuse)
    pipe = _pipe()
    eager = pipe.sample(BATCH, seed=0, precision="bf16")
    with pytest.warns(UserWarning, match=r"compile=aot: UNetModel could not be compiled ahead of time "
                                         r"\(RuntimeError: data-dependent control flow\); it samples eagerly"):  # fmt: skip
        out = pipe.sample(BATCH, seed=0, precision="bf16", compile="aot")
    assert torch.equal(out, eager)
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


def test_aot_is_for_sampling():
    with pytest.raises(CompileSettingError, match=r"trainer.compile=aot compiles the sampling denoiser"):
        compile_module(torch.nn.Linear(2, 2), "aot", key="trainer.compile", purpose="train")
