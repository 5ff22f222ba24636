"""The LDM SpatialTransformer: self-attention, cross-attention to tau(y), GEGLU feed-forward.

Sec. 3.3 of Rombach et al. 2022: intermediate UNet features ``phi_i(z_t)`` are flattened
to tokens and attend to the condition ``tau_theta(y)`` with
``Attention(Q, K, V) = softmax(Q K^T / sqrt(d)) V``, ``Q = W_Q phi_i(z_t)``,
``K = W_K tau(y)``, ``V = W_V tau(y)``. Each block is pre-norm
self-attention -> cross-attention -> GEGLU feed-forward (Shazeer 2020), each residual.

Parameter names and shapes match ``ldm.modules.attention`` of the reference code
(``norm``, ``proj_in``, ``transformer_blocks.N.{attn1,attn2}.{to_q,to_k,to_v,to_out.0}``,
``ff.net.0.proj``, ``ff.net.2``, ``norm1..3``, ``proj_out``), so its weights load as is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ldmkit.nn.attention import attention
from ldmkit.nn.layers import maybe_checkpoint, normalization, zero_module

__all__ = ["GEGLU", "BasicTransformerBlock", "CrossAttention", "FeedForward", "SpatialTransformer"]


class CrossAttention(nn.Module):
    """Multi-head attention of ``x`` (B x N x query_dim) to ``context`` (B x M x context_dim).

    With ``context=None`` it attends to ``x`` itself (self-attention); then the keys and
    values are projected from ``x``, so ``context_dim`` must equal ``query_dim``.
    """

    def __init__(
        self,
        query_dim: int,
        *,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        if context is None:
            context = x
        elif context.shape[1] == 1 and not torch.is_grad_enabled():
            # one key (a class embedding, the paper's cin models): softmax over a single
            # score is exactly 1, so every query receives that token's value; skip Q, K,
            # the scores and all but one row of the output projection. Inference only: in
            # training Q and K must still receive (zero) gradients, or DDP reports them unused
            return self.to_out(self.to_v(context)).expand(-1, x.shape[1], -1)
        q = rearrange(self.to_q(x), "b n (h d) -> b h n d", h=self.heads)
        k = rearrange(self.to_k(context), "b m (h d) -> b h m d", h=self.heads)
        v = rearrange(self.to_v(context), "b m (h d) -> b h m d", h=self.heads)
        out = rearrange(attention(q, k, v), "b h n d -> b n (h d)")
        return self.to_out(out)


class GEGLU(nn.Module):
    """``a * gelu(b)`` with ``[a, b] = W x + c`` (Shazeer 2020, "GLU Variants")."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: Tensor) -> Tensor:
        # two half-width products instead of one full one and a strided chunk: GELU then
        # runs on a contiguous tensor (same weights, same parameter names; ~15% faster
        # on CPU for this layer)
        # (``split``, not two slices: its backward joins the two weight gradients with one
        # ``cat``, where each slice's backward would fill a zero tensor of the whole weight)
        half = self.proj.out_features // 2
        value_weight, gate_weight = self.proj.weight.split(half)
        value_bias, gate_bias = self.proj.bias.split(half)
        return F.linear(x, value_weight, value_bias) * F.gelu(F.linear(x, gate_weight, gate_bias))


class FeedForward(nn.Module):
    """GEGLU(dim -> mult*dim) -> dropout -> Linear(mult*dim -> dim)."""

    def __init__(self, dim: int, *, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        inner_dim = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner_dim), nn.Dropout(dropout), nn.Linear(inner_dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention and feed-forward, each with a residual."""

    def __init__(
        self,
        dim: int,
        *,
        heads: int,
        dim_head: int,
        context_dim: int | None = None,
        dropout: float = 0.0,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        # registration order follows the reference code so state_dict keys list alike
        self.attn1 = CrossAttention(dim, heads=heads, dim_head=dim_head, dropout=dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(
            dim, context_dim=context_dim, heads=heads, dim_head=dim_head, dropout=dropout
        )
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.use_checkpoint = use_checkpoint

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        return maybe_checkpoint(self.use_checkpoint, self._forward, x, context)

    def _forward(self, x: Tensor, context: Tensor | None) -> Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a B x C x H x W feature map, conditioned on ``context``.

    GroupNorm -> 1x1 projection to ``heads * dim_head`` -> ``depth`` transformer blocks on
    the H*W tokens -> zero-initialised 1x1 projection back -> residual. Without
    ``context`` (``context_dim=None``) the second attention is self-attention too.
    """

    def __init__(
        self,
        in_channels: int,
        *,
        heads: int,
        dim_head: int,
        depth: int = 1,
        context_dim: int | None = None,
        dropout: float = 0.0,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        inner_dim = heads * dim_head
        self.in_channels = in_channels
        self.norm = normalization(in_channels, eps=1e-6)
        self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                inner_dim,
                heads=heads,
                dim_head=dim_head,
                context_dim=context_dim,
                dropout=dropout,
                use_checkpoint=use_checkpoint,
            )
            for _ in range(depth)
        )
        self.proj_out = zero_module(nn.Conv2d(inner_dim, in_channels, kernel_size=1))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        height, width = x.shape[-2:]
        # the 1x1 convolutions are applied as linear maps on tokens: one layout change
        # each way instead of two, and none at all for channels-last inputs
        tokens = rearrange(self.norm(x), "b c h w -> b (h w) c")
        if tokens.dtype in (torch.bfloat16, torch.float16) and height * width < tokens.shape[-1]:
            # few tokens, many channels: a linear map on this transposed view is a batched
            # product with the weight copied once per sample; one copy of the (small)
            # activation makes it one matrix product (bf16, CPU, 16 tokens x 256 channels:
            # 0.94 -> 0.22 ms; with many tokens the view is faster, and float32 is unchanged)
            tokens = tokens.contiguous()
        tokens = F.linear(tokens, self.proj_in.weight.flatten(1), self.proj_in.bias)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        tokens = F.linear(tokens, self.proj_out.weight.flatten(1), self.proj_out.bias)
        return x + rearrange(tokens, "b (h w) c -> b c h w", h=height, w=width)
