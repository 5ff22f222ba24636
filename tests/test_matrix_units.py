"""The bf16 levers of issue 30: sampling on a low-precision copy of the denoiser's weights,
GroupNorm on bf16 activations without the float32 round trip, ``precision=auto`` telling AMX
from AVX512-BF16 from neither, and ``compile=auto``'s per-host rules (CPU flags faked)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F

import ldmkit
from ldmkit import compiling, precision
from ldmkit.nn import GroupNorm32

AMX = {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}  # Sapphire Rapids and later
AVX512_BF16 = {"avx2", "avx512f", "avx512_bf16"}  # Cooper Lake, Zen 4/5
AVX2 = {"avx2", "fma"}  # no bf16 units


# -- precision=auto per host -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("flags", "resolved", "units", "words"),
    [
        (AMX, "bf16", "amx", "AMX tiles"),
        (AVX512_BF16, "bf16", "avx512_bf16", "AVX512-BF16 without AMX"),
        (AVX2, "fp32", None, "no AVX512-BF16 or AMX"),
    ],
)
def test_auto_precision_names_the_kind_of_bf16_support(flags, resolved, units, words):
    assert precision.resolve("auto", "cpu", flags=flags) == resolved
    assert precision.cpu_bf16_units(flags) == units
    line = precision.reason("auto", resolved, "cpu", flags=flags)
    assert line.startswith(f"precision: {resolved} (auto: this CPU has ") and words in line
    # the three lines differ: a log tells the host kinds apart
    others = [precision.reason("auto", "bf16", "cpu", flags=f) for f in (AMX, AVX512_BF16, AVX2) if f != flags]
    assert line not in others


def test_explicit_flags_are_not_mixed_with_this_machines_probes():
    """flags=set() means a CPU with no flags (an ARM box), not "read this machine": the
    reason and the host kind must agree with resolve(), which says fp32 there."""
    assert precision.resolve("auto", "cpu", flags=set()) == "fp32"
    assert precision.cpu_bf16_units(set()) is None
    assert "no AVX512-BF16 or AMX" in precision.reason("auto", "fp32", "cpu", flags=set())
    assert compiling.host_kind("cpu", set()) == "cpu"


# -- compile=auto --------------------------------------------------------------------------
def test_host_kind_and_auto_compile_rules_per_host():
    assert compiling.host_kind("cpu", AMX) == "cpu-amx"
    assert compiling.host_kind("cpu", AVX512_BF16) == "cpu-avx512_bf16"
    assert compiling.host_kind("cpu", AVX2) == "cpu"
    assert compiling.host_kind("cuda") == "cuda"
    # every host kind has a rule for both purposes, with the measurement (or its absence) named
    for kind in ("cpu", "cpu-avx512_bf16", "cpu-amx", "cuda"):
        for purpose in ("train", "sample"):
            rule = compiling.AUTO_RULES[(kind, purpose)]
            # aot (a package kept on disk) is for sampling on a CPU only
            allowed = compiling.COMPILE_MODES
            if purpose == "sample" and kind.startswith("cpu"):
                allowed = (*allowed, "aot")
            assert rule.measured and (rule.mode is None or rule.mode in allowed)
            assert rule.mode is None or rule.min_work > 0  # a rule that compiles says when it pays
    # AVX2-only: never (measured 0.97x / 1.0x)
    for purpose in ("train", "sample"):
        mode, why = compiling.auto_compile("cpu", purpose, work=10**9, flags=AVX2)
        assert mode is None and "without AVX512-BF16/AMX" in why
    # a rule that compiles does so only with enough work to pay back the compile time
    for (kind, purpose), rule in compiling.AUTO_RULES.items():
        if rule.mode is None or not kind.startswith("cpu"):
            continue
        flags = {"cpu": AVX2, "cpu-avx512_bf16": AVX512_BF16, "cpu-amx": AMX}[kind]
        assert compiling.auto_compile("cpu", purpose, work=rule.min_work, flags=flags)[0] == rule.mode
        mode, why = compiling.auto_compile("cpu", purpose, work=rule.min_work - 1, flags=flags)
        assert mode is None and "too few to pay back" in why
        assert compiling.auto_compile("cpu", purpose, work=None, flags=flags)[0] == rule.mode
    with pytest.raises(ValueError, match="purpose"):
        compiling.auto_compile("cpu", "eval")


@pytest.mark.parametrize("flags", [AVX2, AVX512_BF16, AMX], ids=["avx2", "avx512_bf16", "amx"])
def test_compile_auto_follows_the_rule_of_this_host(monkeypatch, capsys, flags):
    """compile_module(setting="auto") on a faked host: compiles exactly when the rule says so
    for that much work, and prints the choice and its reason in one line."""
    monkeypatch.setattr("ldmkit.precision.cpu_flags", lambda: frozenset(flags))
    kind = compiling.host_kind("cpu")
    for work in (1, 10**9):
        unet = torch.nn.Linear(4, 4)
        expected, _ = compiling.auto_compile("cpu", "sample", work=work, flags=flags)
        done = compiling.compile_module(unet, "auto", device="cpu", backend="eager", purpose="sample", work=work)
        # "aot" is not compiled in place: the pipeline packages its sampling denoiser (tests/test_aot.py)
        assert done == (expected not in (None, "aot")) == compiling.is_compiled(unet)
        line = capsys.readouterr().err.strip()
        assert line.startswith(f"compile: {expected or 'off'} (auto: "), line
        assert line.count("\n") == 0
    assert kind in {"cpu", "cpu-avx512_bf16", "cpu-amx"}


# -- the low-precision weight copy ------------------------------------------------------------
def _pipe():
    torch.manual_seed(0)
    pipe = ldmkit.compose(
        [
            "denoiser=unet_tiny",
            "conditioner=class_label",
            "conditioner.embed_dim=16",
            "first_stage=kl_tiny",
            "image_size=16",
            "sampler=ddim",
            "sampler.steps=8",
        ]
    ).eval()
    with torch.no_grad():  # trained-looking weights: zero-initialised outputs would hide errors
        for p in pipe.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return pipe


def _snapshot(module):
    return {k: (v.clone(), v.dtype, v.data_ptr()) for k, v in module.state_dict().items()}


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_weight_copy_samples_like_autocast_and_leaves_the_master_weights(dtype):
    pipe = _pipe()
    before = _snapshot(pipe)
    batch = {"label": [0, 3, 5, 7]}
    ref = pipe.sample(batch, guidance_scale=3.0, seed=0, precision="fp32")
    pipe.low_precision_weights = False  # the old path: autocast over the float32 weights
    old = pipe.sample(batch, guidance_scale=3.0, seed=0, precision=dtype)
    pipe.low_precision_weights = True
    new = pipe.sample(batch, guidance_scale=3.0, seed=0, precision=dtype)
    low = pipe.sampling_denoiser(dtype)
    assert low is not pipe.denoiser
    assert {p.dtype for p in low.parameters()} == {precision.DTYPES[dtype]}
    assert not any(p.requires_grad for p in low.parameters())
    # the same samples as autocast, to the low precision's tolerance; both differ from float32
    assert new.dtype == torch.float32
    assert float((new - old).abs().max()) < 0.02
    assert 0 < float((new - ref).abs().mean()) < 0.02
    # the float32 master weights: same values, dtype and storage; the copy is not in state_dict
    after = _snapshot(pipe)
    assert after.keys() == before.keys()
    for k, (value, dt, ptr) in before.items():
        assert after[k][1] == dt and after[k][2] == ptr and torch.equal(after[k][0], value), k


def test_weight_copy_is_kept_until_a_weight_changes():
    pipe = _pipe()
    first = pipe.sampling_denoiser("bf16")
    assert pipe.sampling_denoiser("bf16") is first  # made once, not per call
    assert pipe.sampling_denoiser("fp32") is pipe.denoiser
    with torch.no_grad():
        next(pipe.denoiser.parameters()).mul_(2.0)  # an in-place update (optimizer step, load)
    second = pipe.sampling_denoiser("bf16")
    assert second is not first
    torch.testing.assert_close(
        next(second.parameters()).float(), next(pipe.denoiser.parameters()).bfloat16().float()
    )
    assert pipe.sampling_denoiser("fp16") is not second  # another dtype: another copy
    state = pipe.denoiser.state_dict()
    pipe.denoiser.load_state_dict({k: v * 0.5 if v.is_floating_point() else v for k, v in state.items()})
    assert pipe.sampling_denoiser("fp16") is not pipe.sampling_denoiser("bf16") is not second


def test_releasing_the_weight_copy_frees_it():
    import gc
    import weakref

    pipe = _pipe()
    copy = weakref.ref(pipe.sampling_denoiser("bf16"))
    assert copy() is pipe.sampling_denoiser("bf16")
    pipe.release_low_precision_copy()
    gc.collect()
    assert copy() is None  # nothing else holds it
    again = pipe.sampling_denoiser("bf16")
    assert next(again.parameters()).dtype == torch.bfloat16


_ONEDNN_BF16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


@pytest.mark.skipif(not _ONEDNN_BF16, reason="no oneDNN bf16 convolution on this CPU/build")
def test_packed_convolutions_sample_as_the_plain_copy_and_copy_and_save():
    """The bf16 copy's convolutions keep oneDNN-packed weights: the samples are those of
    F.conv2d on the same copy to bf16 round-off (oneDNN may block a few tiny shapes
    differently; batch sizes the packing never saw included), far closer than bf16 is to
    float32, and the copy's parameters and state_dict are the plain ones."""
    pipe = _pipe()
    batch = {"label": [0, 3, 5, 7]}
    packed_copy = pipe.sampling_denoiser("bf16")
    packed = [m for m in packed_copy.modules() if isinstance(m, precision.PackedConv2d)]
    convs = [m for m in pipe.denoiser.modules() if type(m) is torch.nn.Conv2d]
    assert len(packed) == len(convs) > 0
    new = pipe.sample(batch, guidance_scale=3.0, seed=0, precision="bf16")
    three = pipe.sample({"label": [1, 2, 4]}, guidance_scale=3.0, seed=1, precision="bf16")
    assert pipe.sampling_denoiser("bf16") is packed_copy  # still the same copy
    pipe.pack_cpu_weights = False
    plain_copy = pipe.sampling_denoiser("bf16")
    assert plain_copy is not packed_copy
    assert not any(isinstance(m, precision.PackedConv2d) for m in plain_copy.modules())
    fp32 = pipe.sample(batch, guidance_scale=3.0, seed=0, precision="fp32")
    bf16_error = float((new - fp32).abs().max())
    for packed_samples, labels, seed in ((new, [0, 3, 5, 7], 0), (three, [1, 2, 4], 1)):
        plain_samples = pipe.sample({"label": labels}, guidance_scale=3.0, seed=seed, precision="bf16")
        # measured on an AMX host: 0 and 6.7e-4, against 7.7e-3 between bf16 and float32
        assert float((packed_samples - plain_samples).abs().max()) < bf16_error / 4
    plain_state, packed_state = plain_copy.state_dict(), packed_copy.state_dict()
    assert plain_state.keys() == packed_state.keys()
    assert all(torch.equal(plain_state[k], packed_state[k]) for k in plain_state)
    # a pipeline holding a packed copy can still be copied and saved (oneDNN's packed tensors
    # have no storage: the copies pack again at their first call)
    pipe.pack_cpu_weights = True
    copied = copy.deepcopy(pipe)
    buffer = io.BytesIO()
    torch.save(pipe, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for other in (copied, loaded):
        assert torch.equal(other.sample(batch, guidance_scale=3.0, seed=0, precision="bf16"), new)


@pytest.mark.skipif(not _ONEDNN_BF16, reason="no oneDNN bf16 convolution on this CPU/build")
def test_the_copy_a_first_sample_call_makes_is_packed_and_the_pipeline_copies_and_saves():
    """The weight copy made inside ``sample()`` (which runs in inference mode): before, its
    weights were inference tensors, whose missing version counter made the first packing fail
    (no convolution was packed, silently) and left an opaque tensor on a plain Conv2d, so the
    pipeline could no longer be deep-copied or saved."""
    pipe = _pipe()
    batch = {"label": [0, 3, 5, 7]}
    first = pipe.sample(batch, guidance_scale=3.0, seed=0, precision="bf16")  # the copy is made here
    made = pipe.sampling_denoiser("bf16")
    convs = [m for m in made.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(isinstance(m, precision.PackedConv2d) for m in convs)
    assert not any(p.is_inference() for p in made.parameters())
    copied = copy.deepcopy(pipe)
    buffer = io.BytesIO()
    torch.save(pipe, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for other in (pipe, copied, loaded):
        assert torch.equal(other.sample(batch, guidance_scale=3.0, seed=0, precision="bf16"), first)
    with torch.inference_mode():  # a signature of an inference tensor: no version counter to read
        assert precision.tensor_signature(torch.ones(2))[2] is None


@pytest.mark.skipif(not _ONEDNN_BF16, reason="no oneDNN bf16 convolution on this CPU/build")
def test_a_packed_convolution_behaves_as_conv2d():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1).to(torch.bfloat16).requires_grad_(False)
    plain = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1).to(torch.bfloat16).requires_grad_(False)
    plain.load_state_dict(conv.state_dict())
    assert precision.pack_cpu_convolutions(conv) == 1 and isinstance(conv, precision.PackedConv2d)
    x = torch.randn(3, 8, 10, 10, dtype=torch.bfloat16)
    torch.testing.assert_close(conv(x), plain(x))  # bf16 tolerances: the last bit at most
    assert conv(x).is_contiguous()
    last = x.contiguous(memory_format=torch.channels_last)  # the input's memory format is kept
    out = conv(last)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, plain(last))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a float32 input is cast as autocast does
        torch.testing.assert_close(conv(x.float()), plain(x.float()))
    # autograd through the input takes the plain path, and its gradient is Conv2d's
    grads = []
    for module in (conv, plain):
        leaf = x.float().requires_grad_()
        module(leaf.bfloat16()).float().sum().backward()
        grads.append(leaf.grad)
    assert torch.equal(*grads)
    # traced by torch.compile: the plain path (inductor packs weights its own way)
    compiled = torch.compile(conv, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), plain(x))
    # a weight written in place is packed again; a module cast back to float32 runs as Conv2d
    with torch.no_grad():
        for module in (conv, plain):
            module.weight.mul_(-2.0)
    torch.testing.assert_close(conv(x), plain(x))
    conv.float(), plain.float()
    assert torch.equal(conv(x.float()), plain(x.float()))
    # what cannot be packed stays a Conv2d: float32, string padding, circular padding
    others = [
        torch.nn.Conv2d(8, 8, 3, padding=1),
        torch.nn.Conv2d(8, 8, 3, padding="same").bfloat16(),
        torch.nn.Conv2d(8, 8, 3, padding=1, padding_mode="circular").bfloat16(),
    ]
    assert sum(precision.pack_cpu_convolutions(m) for m in others) == 0
    assert all(type(m) is torch.nn.Conv2d for m in others)


def test_fp32_sampling_is_the_old_path_bit_for_bit():
    """In float32 nothing of the levers applies: the same bits as autocast-free sampling on the
    float32 weights with GroupNorm's old round trip switched back on."""
    pipe = _pipe()
    batch = {"label": [1, 2, 3]}
    new = pipe.sample(batch, guidance_scale=2.0, seed=4, precision="fp32")
    pipe.low_precision_weights = False
    GroupNorm32.low_precision_on_cpu = False
    try:
        old = pipe.sample(batch, guidance_scale=2.0, seed=4, precision="fp32")
    finally:
        GroupNorm32.low_precision_on_cpu = True
    assert torch.equal(new, old)


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_seeds_stay_batch_size_independent(dtype):
    pipe = _pipe()
    batch = {"label": [0, 1, 2, 3]}
    whole = pipe.sample(batch, guidance_scale=3.0, seed=9, precision=dtype)
    chunks = pipe.sample(batch, guidance_scale=3.0, seed=9, precision=dtype, batch_size=2)
    # per-sample generators: sample i of seed s is the same drawn alone or in a batch; the
    # kernels' blocking per batch size leaves round-off of the precision's order at most
    tolerance = 1e-5 if dtype == "fp32" else 1e-3  # measured here: 0 in both
    assert float((whole - chunks).abs().max()) < tolerance
    alone = pipe.sample({"label": [2, 3]}, guidance_scale=3.0, seed=11, precision=dtype)  # samples 2-3
    assert float((whole[2:] - alone).abs().max()) < tolerance
    assert float((whole[:2] - alone).abs().max()) > 0.05  # other seeds and labels do differ


# -- low-precision GroupNorm ---------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_groupnorm_low_precision_matches_the_float32_round_trip(dtype):
    torch.manual_seed(0)
    norm = GroupNorm32(8, 64)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3)
        norm.bias.normal_(0.0, 0.3)
    x = (torch.randn(4, 64, 8, 8) * 3 + 1).to(dtype)
    grad = torch.randn(4, 64, 8, 8, generator=torch.Generator().manual_seed(1)).to(dtype)

    def run(low):
        GroupNorm32.low_precision_on_cpu = low
        try:
            xx = x.clone().requires_grad_(True)
            norm.zero_grad()
            out = norm(xx)
            out.backward(grad)
            return out.detach(), xx.grad, norm.weight.grad.clone(), norm.bias.grad.clone()
        finally:
            GroupNorm32.low_precision_on_cpu = True

    new, old = run(True), run(False)
    assert new[0].dtype == dtype and new[1].dtype == dtype and new[2].dtype == torch.float32
    step = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10  # one rounding step of the output near 1
    out_scale = float(old[0].float().abs().max())
    assert float((new[0].float() - old[0].float()).abs().max()) <= 2 * step * out_scale
    for a, b in zip(new[1:], old[1:], strict=True):
        rel = float((a.float() - b.float()).norm() / b.float().norm())
        assert rel < 1e-2, rel
    # and against the formula in float64: statistics per (sample, group), not per channel
    x64 = x.double().reshape(4, 8, -1)
    ref = ((x64 - x64.mean(-1, keepdim=True)) / (x64.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()).reshape(
        4, 64, 8, 8
    ) * norm.weight.double()[:, None, None] + norm.bias.double()[:, None, None]
    assert float((new[0].double() - ref).abs().max()) <= 2 * step * float(ref.abs().max())


def test_groupnorm_keeps_the_round_trip_for_channels_last():
    norm = GroupNorm32(4, 16)
    x = torch.randn(2, 16, 4, 4).bfloat16().contiguous(memory_format=torch.channels_last)
    out = norm(x)
    expected = F.group_norm(x.float(), 4, norm.weight, norm.bias, norm.eps).bfloat16()
    assert torch.equal(out, expected)


def test_a_denoiser_that_cannot_take_low_precision_weights_falls_back_with_a_warning():
    """A third-party forward with a dtype clash on bf16 weights (layer_norm of a float32
    activation with the module's own weight): one warning naming it, then autocast over the
    float32 weights, the same result as with the copy switched off, and no second attempt."""
    from ldmkit.interfaces import Denoiser

    class Clashing(Denoiser):
        prediction = "eps"

        def __init__(self, channels):
            super().__init__()
            self.in_channels = self.out_channels = channels
            self.scale = torch.nn.Parameter(torch.ones(channels))
            self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)

        def forward(self, z_t, t, cond):
            h = self.conv(z_t).float().permute(0, 2, 3, 1)
            return F.layer_norm(h, h.shape[-1:], self.scale).permute(0, 3, 1, 2)  # float32 h, bf16 weight

    pipe = _pipe()
    channels = pipe.first_stage.latent_channels
    pipe.denoiser = Clashing(channels)
    with pytest.warns(UserWarning, match=r"denoiser Clashing does not run on bf16 weights"):
        a = pipe.sample({"label": [1, 2]}, seed=0, precision="bf16", guidance_scale=1.0)
    assert pipe.sampling_denoiser("bf16") is pipe.denoiser  # no second attempt
    pipe.low_precision_weights = False
    b = pipe.sample({"label": [1, 2]}, seed=0, precision="bf16", guidance_scale=1.0)
    assert torch.equal(a, b)
    Clashing.supports_low_precision_weights = False  # the opt-out, declared by the plugin
    pipe2 = _pipe()
    pipe2.denoiser = Clashing(channels)
    assert pipe2.sampling_denoiser("bf16") is pipe2.denoiser


def test_an_error_that_is_not_a_dtype_clash_is_raised_as_it_is():
    from ldmkit.interfaces import Denoiser

    class Broken(Denoiser):
        prediction = "eps"

        def __init__(self, channels):
            super().__init__()
            self.in_channels = self.out_channels = channels
            self.conv = torch.nn.Conv2d(channels, channels, 1)

        def forward(self, z_t, t, cond):
            raise RuntimeError("the plugin's own failure")

    pipe = _pipe()
    pipe.denoiser = Broken(pipe.first_stage.latent_channels)
    with pytest.raises(RuntimeError, match="the plugin's own failure"):
        pipe.sample({"label": [1]}, seed=0, precision="bf16", guidance_scale=1.0)
    assert pipe.sampling_denoiser("bf16") is not pipe.denoiser  # no fallback recorded
