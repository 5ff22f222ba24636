"""Shared layers against their formulas."""

from __future__ import annotations

import math

import pytest
import torch

from ldmkit.nn import GroupNorm32, maybe_checkpoint, normalization, timestep_embedding, zero_module


@pytest.mark.parametrize("dim", [8, 7])
def test_timestep_embedding_is_the_sinusoid_formula(dim):
    t = torch.tensor([0, 1, 250, 999])
    emb = timestep_embedding(t, dim)
    half = dim // 2
    assert emb.shape == (4, dim) and emb.dtype == torch.float32
    for row, step in enumerate(t.tolist()):
        for i in range(half):
            angle = step * math.exp(-math.log(10000) * i / half)
            assert emb[row, i].item() == pytest.approx(math.cos(angle), abs=1e-4)
            assert emb[row, half + i].item() == pytest.approx(math.sin(angle), abs=1e-4)
        if dim % 2:
            assert emb[row, -1] == 0


def test_timestep_embedding_takes_fractional_steps():
    emb = timestep_embedding(torch.tensor([0.5]), 4, max_period=100.0)
    # frequencies 1 and 100^(-1/2) = 0.1
    expected = torch.tensor([[math.cos(0.5), math.cos(0.05), math.sin(0.5), math.sin(0.05)]])
    torch.testing.assert_close(emb, expected)


def _group_norm_reference(x, groups, weight, bias, eps):
    b, c = x.shape[:2]
    g = x.double().reshape(b, groups, -1)
    normed = (g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True) + eps)
    shape = (1, c) + (1,) * (x.ndim - 2)
    return normed.reshape(x.shape) * weight.double().reshape(shape) + bias.double().reshape(shape)


def test_group_norm32_is_group_norm_computed_in_float32():
    torch.manual_seed(0)
    norm = normalization(64)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    # a large offset: float16 statistics would lose the variance (errors of order 1); float32
    # ones keep it to about 2e-6 (the spacing of float32 at 30) / 0.05 (the spread) = 4e-5 of
    # the normalised value, up to 2e-4 at 3 sigma x weight 1.5 (1e-4 failed one draw in many)
    x = torch.randn(2, 64, 4, 4, generator=torch.Generator().manual_seed(0)) * 0.05 + 30
    expected = _group_norm_reference(x, 32, norm.weight, norm.bias, 1e-5)
    torch.testing.assert_close(norm(x).double(), expected, atol=3e-4, rtol=1e-4)
    x_half = x.half()
    out_half = norm(x_half)
    assert out_half.dtype == torch.float16
    expected_half = _group_norm_reference(x_half, 32, norm.weight, norm.bias, 1e-5)
    torch.testing.assert_close(out_half.double(), expected_half, atol=1e-2, rtol=1e-3)


def test_normalization_checks_group_divisibility():
    assert isinstance(normalization(32), GroupNorm32)
    with pytest.raises(ValueError, match="divisible by 32 groups, got 48 channels"):
        normalization(48)


def test_zero_module():
    conv = zero_module(torch.nn.Conv2d(3, 4, 3))
    assert all(p.abs().sum() == 0 for p in conv.parameters())


def test_maybe_checkpoint_recomputes_only_when_enabled_and_training():
    calls = []
    lin = torch.nn.Linear(3, 3)

    def fn(x):
        calls.append(1)
        return lin(x).tanh()

    x = torch.randn(4, 3, requires_grad=True)
    maybe_checkpoint(True, fn, x).sum().backward()
    assert len(calls) == 2
    grad_checkpointed = (x.grad.clone(), lin.weight.grad.clone())
    x.grad, lin.weight.grad = None, None
    calls.clear()
    maybe_checkpoint(False, fn, x).sum().backward()
    assert len(calls) == 1
    torch.testing.assert_close(grad_checkpointed, (x.grad, lin.weight.grad))
    calls.clear()
    with torch.no_grad():
        maybe_checkpoint(True, fn, x)
    assert len(calls) == 1
