"""The LDM paper's text transformer: BERT-sized token embeddings + pre-norm encoder layers.

Rombach et al. 2022 (Sec. 4.3.2, App. E.2) condition their text-to-image LDM on a
transformer trained jointly with the UNet: token + absolute position embeddings, ``depth``
blocks of pre-norm multi-head self-attention and pre-norm GELU feed-forward (each
residual), then a final LayerNorm. All ``max_seq_len`` positions, [PAD]s included and
unmasked, come out as the cross-attention context (``return_embeddings=True``).

Parameter names and shapes match ``TransformerWrapper(num_tokens, max_seq_len,
attn_layers=Encoder(dim, depth))`` of the paper's ``ldm/modules/x_transformer.py``
(``token_emb``, ``pos_emb.emb``, ``attn_layers.layers.N.{0,1}``, ``norm``,
``to_logits``), so ``cond_stage_model.transformer.*`` of their checkpoints loads by name.
Layer ``2i`` is ``[LayerNorm, SelfAttention]``, layer ``2i + 1`` ``[LayerNorm, FeedForward]``.
"""

from __future__ import annotations

from einops import rearrange
from torch import Tensor, nn

from ldmkit.nn.attention import attention

__all__ = ["FeedForward", "SelfAttention", "TextTransformer"]


class SelfAttention(nn.Module):
    """Multi-head self-attention with bias-free Q, K, V projections (x-transformers layout)."""

    def __init__(self, dim: int, *, heads: int = 8, dim_head: int = 64) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = (
            rearrange(proj(x), "b n (h d) -> b h n d", h=self.heads)
            for proj in (self.to_q, self.to_k, self.to_v)
        )
        return self.to_out(rearrange(attention(q, k, v), "b h n d -> b n (h d)"))


class FeedForward(nn.Module):
    """``Linear -> GELU -> Linear`` with a ``mult``-times wider hidden layer."""

    def __init__(self, dim: int, *, mult: int = 4) -> None:
        super().__init__()
        inner = dim * mult
        # nesting and the (inert) dropout slot keep the paper's names: net.0.0, net.2
        self.net = nn.Sequential(
            nn.Sequential(nn.Linear(dim, inner), nn.GELU()), nn.Dropout(0.0), nn.Linear(inner, dim)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class PositionEmbedding(nn.Module):
    """A learned embedding per position ``0 .. max_seq_len - 1``."""

    def __init__(self, dim: int, max_seq_len: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(max_seq_len, dim)
        nn.init.normal_(self.emb.weight, std=0.02)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.emb.weight[: tokens.shape[1]]


class EncoderLayers(nn.Module):
    """``depth`` x (pre-norm self-attention, pre-norm feed-forward), each with a residual."""

    def __init__(self, dim: int, depth: int, *, heads: int, dim_head: int, ff_mult: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList()
        for _ in range(depth):
            self.layers.append(
                nn.ModuleList([nn.LayerNorm(dim), SelfAttention(dim, heads=heads, dim_head=dim_head)])
            )
            self.layers.append(nn.ModuleList([nn.LayerNorm(dim), FeedForward(dim, mult=ff_mult)]))

    def forward(self, x: Tensor) -> Tensor:
        for norm, block in self.layers:
            x = x + block(norm(x))
        return x


class TextTransformer(nn.Module):
    """Token ids (B x n, n <= max_seq_len) -> final-normed hidden states (B x n x dim).

    ``to_logits`` (dim -> num_tokens) is kept only so that the paper's checkpoints load
    one-to-one; the conditioner never calls it, so it is frozen (``requires_grad`` off): a
    trainable parameter that gets no gradient stops DistributedDataParallel at the second step.
    """

    def __init__(
        self,
        num_tokens: int,
        max_seq_len: int,
        dim: int,
        depth: int,
        *,
        heads: int = 8,
        dim_head: int = 64,
        ff_mult: int = 4,
    ) -> None:
        super().__init__()
        for name, value in dict(num_tokens=num_tokens, max_seq_len=max_seq_len, dim=dim,
                                depth=depth, heads=heads, dim_head=dim_head, ff_mult=ff_mult).items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TextTransformer {name} must be a positive int, got {value!r}")
        self.num_tokens, self.max_seq_len, self.dim = num_tokens, max_seq_len, dim
        self.token_emb = nn.Embedding(num_tokens, dim)
        nn.init.normal_(self.token_emb.weight, std=0.02)
        self.pos_emb = PositionEmbedding(dim, max_seq_len)
        self.attn_layers = EncoderLayers(dim, depth, heads=heads, dim_head=dim_head, ff_mult=ff_mult)
        self.norm = nn.LayerNorm(dim)
        self.to_logits = nn.Linear(dim, num_tokens).requires_grad_(False)

    def forward(self, tokens: Tensor) -> Tensor:
        if tokens.ndim != 2 or tokens.shape[1] > self.max_seq_len:
            raise ValueError(
                f"TextTransformer takes B x n token ids with n <= {self.max_seq_len}, "
                f"got shape {tuple(tokens.shape)}"
            )
        x = self.token_emb(tokens) + self.pos_emb(tokens)
        return self.norm(self.attn_layers(x))
