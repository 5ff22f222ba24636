"""The mid-block attention goes through ldmkit's run-time attention backends."""

import torch

from ldmkit.nn.attention import attention_backend
from ldmkit_autoencoders.modules import AttnBlock


def test_attention_block_follows_the_backend_and_agrees():
    block = AttnBlock(16, norm_groups=8).eval()
    x = torch.randn(2, 16, 6, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with attention_backend("math"):
            reference = block(x)
        for backend in ("sdpa", "chunked"):
            with attention_backend(backend, chunk_size=5):
                torch.testing.assert_close(block(x), reference, atol=1e-5, rtol=1e-5)
