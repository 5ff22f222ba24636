"""``compile=aot``: the sampling denoiser compiled ahead of time (AOTInductor), kept on disk
and loaded by later pipelines (:mod:`ldmkit.aot`). One real compile of ``unet_tiny`` (about
30 s on 2 cores); the rest loads it or never compiles."""

from __future__ import annotations

import os

import pytest
import torch

import ldmkit
from ldmkit.aot import AOTError, PackagedDenoiser, cache_limit, prune_cache
from ldmkit.compiling import (
    AUTO_RULES,
    AutoCompileRule,
    CompileSettingError,
    compile_module,
    host_kind,
)
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


def test_a_package_is_compiled_once_then_loaded_by_later_pipelines(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("LDMKIT_AOT_CACHE", str(tmp_path / "cache"))
    pipe = _pipe()
    fp32 = pipe.sample(BATCH, seed=0, precision="fp32")
    eager = pipe.sample(BATCH, seed=0, precision="bf16")
    capfd.readouterr()
    with monkeypatch.context() as patch:  # a rule that packages from 1 call: compile=auto makes the package
        patch.setitem(AUTO_RULES, (host_kind("cpu"), "sample"), AutoCompileRule("aot", 1, "a test's rule"))
        packaged = pipe.sample(BATCH, seed=0, precision="bf16", compile="auto")
    err = capfd.readouterr().err
    assert err.index("compile: aot (auto: a test's rule)") < err.index("compile=aot: compiling UNetModel")
    wrapper = pipe.__dict__["_aot_denoiser"][1]
    assert isinstance(wrapper, PackagedDenoiser) and (wrapper.compiled, wrapper.loaded) == (1, 0)
    assert torch.equal(pipe.sample(BATCH, seed=0, precision="bf16", compile="aot"), packaged)
    assert pipe.__dict__["_aot_denoiser"][1] is wrapper  # compile=aot: the same wrapper, nothing compiled
    # the compiled bf16 network: as close to float32 as the eager bf16 one (measured 0.0102 vs 0.0094)
    bf16_error = float((eager - fp32).abs().max())
    assert float((packaged - fp32).abs().max()) < 2 * bf16_error
    assert float((packaged - eager).abs().max()) < 2 * bf16_error
    assert torch.equal(pipe.sample(BATCH, seed=0, precision="bf16", compile="aot"), packaged)
    assert wrapper.compiled == 1  # the same signature: the package already loaded
    # its batch dimension is dynamic: chunks of 2 and 1 run the same package
    chunked = pipe.sample(BATCH, seed=0, precision="bf16", compile="aot", batch_size=2)
    assert (wrapper.compiled, len(wrapper._loaded), len(wrapper._runners)) == (1, 1, 3)
    # as batch-size independent as eager bf16 sampling (float32 rounding: 6.7e-7 on both)
    eager_chunked = pipe.sample(BATCH, seed=0, precision="bf16", batch_size=2)
    assert float((chunked - packaged).abs().max()) < max(1e-5, 4 * float((eager_chunked - eager).abs().max()))
    packages = list((tmp_path / "cache").glob("*.pt2"))
    assert len(packages) == 1 and not list((tmp_path / "cache").glob(".*"))  # no partial file left

    pipe.save(tmp_path / "saved")
    later = Pipeline.load(tmp_path / "saved")  # another pipeline with the same weights: loads
    assert torch.equal(later.sample(BATCH, seed=0, precision="bf16", compile="aot"), packaged)
    later_wrapper = later.__dict__["_aot_denoiser"][1]
    assert (later_wrapper.compiled, later_wrapper.loaded) == (0, 1)

    # compile=auto on a CPU runs a package already in the cache (one line says so) and compiles none
    capfd.readouterr()
    assert torch.equal(later.sample(BATCH, seed=0, precision="bf16", compile="auto"), packaged)
    auto_wrapper = later.__dict__["_aot_denoiser"][1]
    assert auto_wrapper is not later_wrapper and (auto_wrapper.compiled, auto_wrapper.loaded) == (0, 1)
    err = capfd.readouterr().err
    assert err.count("compile: ") == 1 and f"compile: aot (auto: a package for these inputs is in the cache: {packages[0]})" in err
    # ... and inputs of another shape (a larger image) sample eagerly under auto's own rule, with its line
    eager_large = later.sample(BATCH, seed=0, precision="bf16", size=32)
    capfd.readouterr()
    assert torch.equal(later.sample(BATCH, seed=0, precision="bf16", size=32, compile="auto"), eager_large)
    assert (auto_wrapper.compiled, auto_wrapper.loaded) == (0, 1) and len(list((tmp_path / "cache").glob("*.pt2"))) == 1
    assert "compile: off (auto: " in capfd.readouterr().err

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


@pytest.mark.parametrize("mode", ["auto", "aot"])
def test_an_unreadable_cached_package_is_set_aside_naming_it(tmp_path, monkeypatch, mode):
    """A package cut short (a full disk, a partial copy of a cache) fails to load: the first
    call says which file, moves it aside, and samples (auto: eagerly; aot: compiling anew),
    instead of every later sampling call failing on it."""
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("LDMKIT_AOT_CACHE", str(cache))
    monkeypatch.setattr(PackagedDenoiser, "key", lambda self, signature: "k")
    (cache / "denoiser-k.pt2").write_bytes(b"PK\x03\x04 cut short")
    attempts = []

    def no_compile(self, path, *args):  # the real compile is test_a_package_is_compiled_once...'s
        attempts.append(path)
        raise RuntimeError("not in this test")

    monkeypatch.setattr(PackagedDenoiser, "_compile", no_compile)
    pipe = _pipe()
    eager = pipe.sample(BATCH, seed=0, precision="bf16")
    with pytest.warns(UserWarning) as caught:
        out = pipe.sample(BATCH, seed=0, precision="bf16", compile=mode)
    assert torch.equal(out, eager)
    messages = [str(w.message) for w in caught]
    then = "compiling it again" if mode == "aot" else "these inputs sample eagerly"
    assert any(f"the cached package {cache / 'denoiser-k.pt2'} cannot be loaded (RuntimeError: " in m
               and f"moved aside to denoiser-k.pt2.unreadable; {then}" in m for m in messages), messages
    assert not (cache / "denoiser-k.pt2").exists() and (cache / "denoiser-k.pt2.unreadable").is_file()
    assert len(attempts) == (2 if mode == "aot" else 0)  # aot: the dynamic package, then the static one
    assert torch.equal(pipe.sample(BATCH, seed=0, precision="bf16", compile=mode), eager)  # no second warning needed


def test_prune_cache_removes_the_least_recently_used_packages_first(tmp_path):
    sizes = {"denoiser-a.pt2": 300, "denoiser-b.pt2": 200, "denoiser-c.pt2.unreadable": 100,
             "denoiser-d.pt2": 400, "notes.txt": 10_000}  # fmt: skip
    for age, (name, size) in enumerate(sizes.items()):  # a is the oldest, d the newest
        (tmp_path / name).write_bytes(b"x" * size)
        os.utime(tmp_path / name, (1_000_000 + age, 1_000_000 + age))
    # 1,000 bytes of packages for a limit of 600: a (the oldest) goes, b is kept (just used), c goes
    removed = prune_cache(tmp_path, 600, keep=[tmp_path / "denoiser-b.pt2"])
    assert [p.name for p in removed] == ["denoiser-a.pt2", "denoiser-c.pt2.unreadable"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["denoiser-b.pt2", "denoiser-d.pt2", "notes.txt"]
    assert prune_cache(tmp_path, 600) == []  # within the limit: nothing goes
    assert [p.name for p in prune_cache(tmp_path, 0, keep=[tmp_path / "denoiser-d.pt2"])] == ["denoiser-b.pt2"]


def test_cache_limit_reads_its_variable(monkeypatch):
    monkeypatch.delenv("LDMKIT_AOT_CACHE_GB", raising=False)
    assert cache_limit() == 20 * 2**30
    monkeypatch.setenv("LDMKIT_AOT_CACHE_GB", "0.5")
    assert cache_limit() == 2**29
    monkeypatch.setenv("LDMKIT_AOT_CACHE_GB", "0")
    assert cache_limit() is None
    for bad in ("-1", "lots", "nan", "inf"):
        monkeypatch.setenv("LDMKIT_AOT_CACHE_GB", bad)
        with pytest.raises(AOTError, match=rf"LDMKIT_AOT_CACHE_GB='{bad}': expected a number of gigabytes >= 0"):
            cache_limit()


def test_a_compile_keeps_the_cache_under_its_limit_and_a_load_marks_its_package_used(tmp_path, monkeypatch, capfd):
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("LDMKIT_AOT_CACHE", str(cache))
    monkeypatch.setenv("LDMKIT_AOT_CACHE_GB", str(2500 / 2**30))  # 2,500 bytes
    for name in ("denoiser-old.pt2", "denoiser-older.pt2"):
        (cache / name).write_bytes(b"x" * 1000)
    os.utime(cache / "denoiser-older.pt2", (1_000_000, 1_000_000))
    os.utime(cache / "denoiser-old.pt2", (2_000_000, 2_000_000))

    def compile_stub(self, path, *args):  # the real compile is test_a_package_is_compiled_once...'s
        path.write_bytes(b"x" * 1000)
        return path

    monkeypatch.setattr(PackagedDenoiser, "_compile", compile_stub)
    monkeypatch.setattr("ldmkit.aot.load_package", lambda path: lambda z_t, *rest: torch.zeros_like(z_t))
    pipe = _pipe()
    capfd.readouterr()
    pipe.sample(BATCH, seed=0, precision="bf16", compile="aot")
    new = [p for p in cache.glob("*.pt2") if p.name not in ("denoiser-old.pt2", "denoiser-older.pt2")]
    assert len(new) == 1 and sorted(p.name for p in cache.iterdir()) == sorted(["denoiser-old.pt2", new[0].name])
    assert (f"compile=aot: the cache {cache} keeps at most LDMKIT_AOT_CACHE_GB={2500 / 2**30:g} GB: removed 1 "
            "package(s) used least recently") in capfd.readouterr().err
    # a later pipeline loading the package marks it used: it outlives packages made before it was loaded
    os.utime(new[0], (1_500_000, 1_500_000))
    _pipe().sample(BATCH, seed=0, precision="bf16", compile="aot")
    assert new[0].stat().st_mtime > (cache / "denoiser-old.pt2").stat().st_mtime
    # a bad limit is said before any compile, naming the variable
    monkeypatch.setenv("LDMKIT_AOT_CACHE_GB", "lots")
    new[0].unlink()
    with pytest.raises(AOTError, match="LDMKIT_AOT_CACHE_GB='lots'"):
        _pipe().sample(BATCH, seed=0, precision="bf16", compile="aot")


def test_aot_is_for_sampling():
    with pytest.raises(CompileSettingError, match=r"trainer.compile=aot compiles the sampling denoiser"):
        compile_module(torch.nn.Linear(2, 2), "aot", key="trainer.compile", purpose="train")


def test_auto_with_an_empty_cache_stays_eager_without_hashing_the_weights(tmp_path, monkeypatch, capfd):
    """compile=auto on a CPU looks for packages, but an empty (or absent) cache costs no digest
    of the weights and compiles nothing: the samples are the eager ones, auto's line is printed."""
    import ldmkit.aot

    monkeypatch.setenv("LDMKIT_AOT_CACHE", str(tmp_path / "absent"))

    def no_digest(module):
        raise AssertionError("the weights were hashed for an empty cache")

    monkeypatch.setattr(ldmkit.aot, "_weights_digest", no_digest)
    pipe = _pipe()
    eager = pipe.sample(BATCH, seed=0, precision="bf16")
    capfd.readouterr()
    assert torch.equal(pipe.sample(BATCH, seed=0, precision="bf16", compile="auto"), eager)
    err = capfd.readouterr().err
    assert err.count("compile: ") == 1 and "compile: off (auto: " in err
    wrapper = pipe.__dict__["_aot_denoiser"][1]
    assert (wrapper.compiled, wrapper.loaded) == (0, 0) and not (tmp_path / "absent").exists()
    assert torch.equal(pipe.sample(BATCH, seed=0, precision="bf16", compile="auto"), eager)
    assert capfd.readouterr().err.count("compile: off (auto: ") == 1  # one line per sampling call


class _Convs(torch.nn.Module):
    """A denoiser-shaped module of two convolutions (what freezing packs for oneDNN)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, z_t, t, cond):
        return self.b(torch.nn.functional.silu(self.a(z_t))) + t.float().view(-1, 1, 1, 1)


MKLDNN = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="freezing packs convolutions for oneDNN only")


@pytest.fixture(scope="module")
def convs_package(tmp_path_factory):
    """(module, z, t, out, package): ``_Convs`` compiled once by a caller with gradients on (the
    case the freezing fix is about), its output from the wrapper, and the package file."""
    cache = tmp_path_factory.mktemp("convs")
    torch.manual_seed(0)
    net = _Convs().eval()
    z, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 5])
    assert torch.is_grad_enabled()
    out = PackagedDenoiser(net, cache=cache)(z, t, {})
    (package,) = cache.glob("*.pt2")
    return net, z, t, out, package


@MKLDNN
def test_a_package_is_frozen_even_when_compiled_with_gradients_on(convs_package):
    """Inductor freezes (weights folded in and packed for oneDNN) only with gradients off; a
    package compiled from a caller with them on must be the same frozen one (before the fix it
    called aten's plain convolution: 1.2x slower on the AMX host), and give the module's output."""
    import zipfile

    net, z, t, out, package = convs_package
    with torch.no_grad():
        assert torch.allclose(out, net(z, t, {}), atol=1e-5)
    with zipfile.ZipFile(package) as archive:
        source = "".join(archive.read(n).decode() for n in archive.namelist() if n.endswith("wrapper.cpp"))
    assert "mkldnn__convolution_pointwise" in source and "aoti_torch_cpu_convolution(" not in source


@MKLDNN
def test_load_package_moves_the_weights_into_aligned_memory(convs_package):
    """AOTInductor's CPU loader copies the weights into one malloc'd blob (16-byte aligned), where
    oneDNN's AMX kernels ran about 2x slower; ``load_package`` runs the package on 64-byte-aligned
    clones of them (the packed oneDNN weights included) with the same output bits."""
    from ldmkit.aot import load_package

    _, z, t, _, package = convs_package
    plain, aligned = torch._inductor.aoti_load_package(str(package)), load_package(package)
    with torch.inference_mode():
        assert torch.equal(aligned(z, t), plain(z, t))
        assert torch.equal(aligned(z[:1], t[:1]), plain(z[:1], t[:1]))  # the dynamic batch too
        assert torch.equal(aligned(z.transpose(2, 3), t), plain(z.transpose(2, 3).contiguous(), t))  # any strides
    constants = aligned.constants
    assert any(c.layout == torch._mkldnn for c in constants.values())  # the packed convolution weights

    def address(c: torch.Tensor) -> int:
        return torch.ops.mkldnn.data_ptr(c) if c.layout == torch._mkldnn else c.data_ptr()

    # (the loader's own copies sat at 48 mod 64 on the AMX host, for blobs of 0.6 and 11 MB)
    assert all(address(c) % 64 == 0 for c in constants.values() if c.numel())
