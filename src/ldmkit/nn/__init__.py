"""Neural building blocks shared by ldmkit's networks (and by third-party plugins).

* :mod:`ldmkit.nn.attention`: ``attention(q, k, v)`` with run-time kernels
  (SDPA, xformers, math, chunked) and the process-wide backend switch. The function
  is imported from the module (``from ldmkit.nn.attention import attention``) so that
  ``ldmkit.nn.attention`` always names the module.
* :mod:`ldmkit.nn.layers`: ``GroupNorm32``, ``normalization``, ``zero_module``,
  ``timestep_embedding``, ``maybe_checkpoint``.
* :mod:`ldmkit.nn.transformer`: the LDM ``SpatialTransformer`` and its parts
  (``CrossAttention``, ``GEGLU``, ``FeedForward``, ``BasicTransformerBlock``).

Owns the layers. Imports nothing else of ldmkit (torch only), so any plugin may use it.
"""

from ldmkit.nn.attention import (
    ATTENTION_BACKENDS,
    attention_backend,
    get_attention_backend,
    naive_attention,
    set_attention_backend,
    xformers_available,
)
from ldmkit.nn.layers import (
    GroupNorm32,
    maybe_checkpoint,
    normalization,
    timestep_embedding,
    zero_module,
)
from ldmkit.nn.transformer import (
    GEGLU,
    BasicTransformerBlock,
    CrossAttention,
    FeedForward,
    SpatialTransformer,
)

__all__ = [
    "ATTENTION_BACKENDS",
    "GEGLU",
    "BasicTransformerBlock",
    "CrossAttention",
    "FeedForward",
    "GroupNorm32",
    "SpatialTransformer",
    "attention_backend",
    "get_attention_backend",
    "maybe_checkpoint",
    "naive_attention",
    "normalization",
    "set_attention_backend",
    "timestep_embedding",
    "xformers_available",
    "zero_module",
]
