"""Every attention backend computes softmax(Q K^T / sqrt(d)) V; the switch behaves."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import ldmkit.nn.attention as attn_module
from ldmkit.nn import attention_backend, get_attention_backend, set_attention_backend
from ldmkit.nn.attention import (
    attention,
    naive_attention,
    resolve_attention_backend,
    xformers_available,
)

CPU_BACKENDS = ["auto", "sdpa", "math", "chunked"]


@pytest.fixture(autouse=True)
def restore_default_backend():
    yield
    attn_module._set_raw("auto", attn_module.DEFAULT_CHUNK_SIZE)


def reference_attention(q, k, v, scale=None):
    """Naive softmax attention in float64, one (batch, head) slice at a time."""
    q, k, v = q.double(), k.double(), v.double()
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=torch.float64)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            scores = q[b, h] @ k[b, h].T * scale
            weights = torch.exp(scores - scores.max(dim=-1, keepdim=True).values)
            out[b, h] = (weights / weights.sum(dim=-1, keepdim=True)) @ v[b, h]
    return out


def random_qkv(b=2, h=3, n=37, m=11, d=16, dv=None, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=gen)
    k = torch.randn(b, h, m, d, generator=gen)
    v = torch.randn(b, h, m, dv or d, generator=gen)
    return q.to(device), k.to(device), v.to(device)


def test_hand_computed_example():
    # one head, d=2: q=[1,0] against keys [1,0] and [0,1] -> weights softmax([1/sqrt2, 0])
    q = torch.tensor([[[[1.0, 0.0]]]])
    k = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    v = torch.tensor([[[[2.0, 0.0], [0.0, 4.0]]]])
    w = math.exp(1 / math.sqrt(2)) / (math.exp(1 / math.sqrt(2)) + 1)
    expected = torch.tensor([[[[2.0 * w, 4.0 * (1 - w)]]]])
    for backend in CPU_BACKENDS:
        torch.testing.assert_close(attention(q, k, v, backend=backend), expected)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(("n", "m", "dv"), [(37, 11, None), (64, 64, 8), (5, 200, 24)])
def test_backends_equal_naive_softmax_attention(backend, n, m, dv):
    q, k, v = random_qkv(n=n, m=m, dv=dv)
    out = attention(q, k, v, backend=backend, chunk_size=16)
    assert out.shape == (2, 3, n, dv or 16) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference_attention(q, k, v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_custom_scale(backend):
    q, k, v = random_qkv()
    out = attention(q, k, v, backend=backend, scale=0.3, chunk_size=8)
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, 0.3), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["math", "chunked"])
def test_gradients_match_sdpa(backend):
    grads = {}
    for name in ("sdpa", backend):
        q, k, v = (x.requires_grad_() for x in random_qkv(n=40, m=12))
        attention(q, k, v, backend=name, chunk_size=7).square().sum().backward()
        grads[name] = [q.grad, k.grad, v.grad]
    for a, b in zip(grads["sdpa"], grads[backend], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_strided_views_are_accepted():
    # the transformer passes head-split views of B x N x (h d) projections
    x = torch.randn(2, 10, 3 * 4 * 8)
    q, k, v = x.unflatten(-1, (3, 4, 8)).permute(2, 0, 3, 1, 4)
    assert not q.is_contiguous()
    for backend in CPU_BACKENDS:
        torch.testing.assert_close(attention(q, k, v, backend=backend).double(),
                                   reference_attention(q, k, v), atol=1e-5, rtol=1e-5)


def test_chunked_never_attends_more_than_chunk_size_queries(monkeypatch):
    seen = []
    sdpa = F.scaled_dot_product_attention

    def recording_sdpa(q, *args, **kwargs):
        seen.append(q.shape[-2])
        return sdpa(q, *args, **kwargs)

    monkeypatch.setattr(attn_module.F, "scaled_dot_product_attention", recording_sdpa)
    q, k, v = random_qkv(n=100)
    attention(q, k, v, backend="chunked", chunk_size=32)
    assert seen == [32, 32, 32, 4]


def test_process_default_is_auto_and_settable(monkeypatch):
    assert get_attention_backend() == "auto"
    q, k, v = random_qkv()
    calls = []
    monkeypatch.setattr(attn_module, "naive_attention", lambda *a, **kw: calls.append(1) or q)
    set_attention_backend("math")
    assert get_attention_backend() == "math"
    attention(q, k, v)
    assert calls == [1]
    set_attention_backend("sdpa")
    attention(q, k, v)
    assert calls == [1]


def test_context_manager_restores_previous_backend():
    set_attention_backend("chunked", chunk_size=64)
    with attention_backend("math"):
        assert get_attention_backend() == "math"
    assert get_attention_backend() == "chunked"
    assert attn_module._default_chunk_size == 64


def test_auto_is_sdpa_on_cpu():
    q, _, _ = random_qkv()
    assert resolve_attention_backend("auto", q) == "sdpa"


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown attention backend 'flash'; expected one of auto, sdpa"):
        set_attention_backend("flash")
    q, k, v = random_qkv()
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        attention(q, k, v, backend="flash")
    assert get_attention_backend() == "auto"


def test_bad_chunk_size_and_shapes_are_errors():
    with pytest.raises(ValueError, match="chunk_size"):
        set_attention_backend("chunked", chunk_size=0)
    with pytest.raises(ValueError, match="B x heads x tokens x dim"):
        attention(torch.zeros(2, 5, 8), torch.zeros(2, 5, 8), torch.zeros(2, 5, 8))


@pytest.mark.skipif(xformers_available(), reason="xformers is installed")
def test_xformers_requested_but_missing_is_a_clear_error():
    with pytest.raises(ValueError, match="xformers is not installed"):
        set_attention_backend("xformers")
    q, k, v = random_qkv()
    with pytest.raises(ValueError, match="xformers is not installed"):
        attention(q, k, v, backend="xformers")


@pytest.mark.skipif(not xformers_available(), reason="needs xformers")
def test_xformers_on_cpu_tensors_is_a_clear_error():
    q, k, v = random_qkv()
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        attention(q, k, v, backend="xformers")


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("backend", [*CPU_BACKENDS, "xformers"])
def test_cuda_backends_equal_naive_softmax_attention(backend):
    if backend == "xformers" and not attn_module.xformers_usable_on_cuda():
        pytest.skip(attn_module.xformers_cuda_problem() or "needs xformers")
    q, k, v = random_qkv(n=300, m=77, d=64, device="cuda")
    # TF32 matmuls would be a different function; compare true float32
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        out = attention(q, k, v, backend=backend, chunk_size=128)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    expected = reference_attention(q.cpu(), k.cpu(), v.cpu())
    torch.testing.assert_close(out.cpu().double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.cuda
@requires_cuda
def test_auto_picks_xformers_on_cuda_when_usable():
    q = torch.zeros(1, 1, 1, 8, device="cuda")
    assert resolve_attention_backend("auto", q) == ("xformers" if attn_module.xformers_usable_on_cuda() else "sdpa")


@pytest.mark.parametrize(("tokens", "expect_float32"), [(64, True), (256, True), (1024, False)])
def test_cpu_bf16_training_attention_runs_where_its_backward_is_fast(monkeypatch, tokens, expect_float32):
    """CPU SDPA in bf16 under autograd: small problems run in float32 (PyTorch's bf16 flash
    backward is slower there), large ones and inference stay bf16; the result keeps q's dtype
    and matches the float32 attention to bf16 precision, gradients included."""
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append(q.dtype)
        return real(q, k, v, **kw)

    monkeypatch.setattr(attn_module.F, "scaled_dot_product_attention", spy)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, tokens, 16, generator=gen).bfloat16().requires_grad_() for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q, k, v, backend="sdpa")
    assert out.dtype == torch.bfloat16
    assert seen == [torch.float32 if expect_float32 else torch.bfloat16]
    ref = naive_attention(q.float(), k.float(), v.float())
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    out.float().sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    seen.clear()
    with torch.no_grad():
        attention(q, k, v, backend="sdpa")
    assert seen == [torch.bfloat16]  # inference keeps bf16
