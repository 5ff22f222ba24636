"""The SpatialTransformer and its parts against the formulas of Rombach et al. 2022, Sec. 3.3."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ldmkit.nn import GEGLU, BasicTransformerBlock, CrossAttention, SpatialTransformer
from ldmkit.testing import perturb_parameters


def perturb(module, std=0.1, seed=0):
    perturb_parameters(module, std=std, seed=seed)


def test_geglu_is_value_times_gelu_of_gate():
    torch.manual_seed(0)
    layer = GEGLU(6, 5)
    x = torch.randn(3, 6, dtype=torch.float64)
    projected = x @ layer.proj.weight.double().T + layer.proj.bias.double()
    value, gate = projected[:, :5], projected[:, 5:]
    gelu = 0.5 * gate * (1 + torch.erf(gate / math.sqrt(2)))  # exact GELU
    torch.testing.assert_close(layer(x.float()).double(), value * gelu, atol=1e-6, rtol=1e-5)


def _cross_attention_reference(layer: CrossAttention, x, context):
    """softmax(Q K^T / sqrt(d)) V per head, in float64, with Q from x and K, V from context."""
    x, context = x.double(), context.double()
    q = x @ layer.to_q.weight.double().T
    k = context @ layer.to_k.weight.double().T
    v = context @ layer.to_v.weight.double().T
    d = q.shape[-1] // layer.heads
    heads = []
    for h in range(layer.heads):
        sl = slice(h * d, (h + 1) * d)
        weights = torch.softmax(q[..., sl] @ k[..., sl].transpose(-1, -2) / math.sqrt(d), dim=-1)
        heads.append(weights @ v[..., sl])
    out = torch.cat(heads, dim=-1)
    return out @ layer.to_out[0].weight.double().T + layer.to_out[0].bias.double()


def test_cross_attention_matches_formula():
    torch.manual_seed(0)
    layer = CrossAttention(16, context_dim=10, heads=2, dim_head=8)
    x, context = torch.randn(2, 12, 16), torch.randn(2, 5, 10)
    torch.testing.assert_close(layer(x, context).double(), _cross_attention_reference(layer, x, context),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tokens", [1, 2])
def test_cross_attention_to_one_token_matches_formula(tokens):
    """One context token (a class embedding) takes a shortcut (every query gets that token's
    value); it must still be the formula, with gradients to the value and output weights."""
    torch.manual_seed(0)
    layer = CrossAttention(16, context_dim=10, heads=2, dim_head=8)
    x, context = torch.randn(3, 12, 16), torch.randn(3, tokens, 10, requires_grad=True)
    reference = _cross_attention_reference(layer, x, context)
    with torch.no_grad():  # sampling takes the shortcut
        torch.testing.assert_close(layer(x, context).double(), reference, atol=1e-5, rtol=1e-5)
    out = layer(x, context)  # training does not: every parameter gets a gradient (DDP)
    assert out.shape == (3, 12, 16)
    torch.testing.assert_close(out.double(), reference, atol=1e-5, rtol=1e-5)
    out.square().sum().backward()
    assert all(p.grad is not None for p in layer.parameters()) and context.grad.abs().sum() > 0


def test_self_attention_when_no_context():
    torch.manual_seed(0)
    layer = CrossAttention(16, heads=4, dim_head=4)
    x = torch.randn(2, 9, 16)
    torch.testing.assert_close(layer(x).double(), _cross_attention_reference(layer, x, x), atol=1e-5, rtol=1e-5)


def test_transformer_block_is_prenorm_residual():
    torch.manual_seed(0)
    block = BasicTransformerBlock(16, heads=2, dim_head=8, context_dim=10)
    perturb(block)
    x, context = torch.randn(2, 6, 16), torch.randn(2, 3, 10)
    h = x + block.attn1(block.norm1(x))
    h = h + block.attn2(block.norm2(h), context)
    expected = h + block.ff.net[2](block.ff.net[0](block.norm3(h)))
    torch.testing.assert_close(block(x, context), expected)


def _spatial_transformer_reference(st: SpatialTransformer, x, context):
    """GroupNorm(eps 1e-6) -> 1x1 conv -> tokens -> blocks -> image -> 1x1 conv -> + x."""
    b, c, h, w = x.shape
    y = F.group_norm(x, 32, st.norm.weight, st.norm.bias, 1e-6)
    y = F.conv2d(y, st.proj_in.weight, st.proj_in.bias)
    tokens = y.reshape(b, -1, h * w).transpose(1, 2)
    for block in st.transformer_blocks:
        tokens = block(tokens, context)
    y = tokens.transpose(1, 2).reshape(b, -1, h, w)
    return x + F.conv2d(y, st.proj_out.weight, st.proj_out.bias)


@pytest.mark.parametrize("channels_last", [False, True])
def test_spatial_transformer_matches_conv_formulation(channels_last):
    torch.manual_seed(0)
    st = SpatialTransformer(64, heads=2, dim_head=16, depth=2, context_dim=12)
    perturb(st)
    x, context = torch.randn(2, 64, 5, 3), torch.randn(2, 4, 12)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    out = st(x, context)
    assert out.shape == x.shape
    torch.testing.assert_close(out, _spatial_transformer_reference(st, x, context), atol=1e-5, rtol=1e-5)


def test_spatial_transformer_starts_as_identity():
    st = SpatialTransformer(32, heads=1, dim_head=32)
    x = torch.randn(1, 32, 4, 4)
    torch.testing.assert_close(st(x), x)
