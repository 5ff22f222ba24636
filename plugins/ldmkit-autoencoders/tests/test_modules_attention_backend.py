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


def test_chunked_backend_is_really_used(monkeypatch):
    import ldmkit.nn.attention as backends

    calls = []
    original = backends._chunked_attention

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(backends, "_chunked_attention", spy)
    block = AttnBlock(16, norm_groups=8).eval()
    with torch.no_grad(), attention_backend("chunked", chunk_size=5):
        block(torch.randn(1, 16, 6, 6))
    assert calls == [torch.Size([1, 1, 36, 16])]
