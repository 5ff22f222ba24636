"""KL-reg and VQ-reg against their formulas, computed independently."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from ldmkit_autoencoders.kl import DiagonalGaussianRegularizer, KLAutoencoder, gaussian_kl
from ldmkit_autoencoders.vq import VectorQuantizer, VQAutoencoder

TINY = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, norm_groups=4, resolution=32)


# -- KL ------------------------------------------------------------------------------------


def test_gaussian_kl_matches_torch_distributions():
    gen = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(3, 4, 5, 5, generator=gen), torch.randn(3, 4, 5, 5, generator=gen)
    expected = kl_divergence(Normal(mean, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).sum((1, 2, 3))
    torch.testing.assert_close(gaussian_kl(mean, logvar), expected, rtol=1e-5, atol=1e-5)


def test_kl_model_regularizer_is_weighted_closed_form_kl():
    torch.manual_seed(0)
    model = KLAutoencoder(latent_channels=3, kl_weight=0.25, **TINY)
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    _, reg, logs = model(x)
    mean, logvar = model.posterior(x)
    std = torch.exp(0.5 * logvar)
    # closed form: 0.5 * sum(mu^2 + sigma^2 - 1 - log sigma^2), summed per image, batch mean
    closed = (0.5 * (mean**2 + std**2 - 1 - torch.log(std**2))).sum((1, 2, 3)).mean()
    torch.testing.assert_close(reg, 0.25 * closed, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logs["kl"], closed.detach(), rtol=1e-5, atol=1e-6)


def test_kl_encode_sample_and_mode():
    model = KLAutoencoder(latent_channels=3, **TINY).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        mean, logvar = model.posterior(x)
        torch.manual_seed(7)
        z = model.encode(x)
        torch.manual_seed(7)
        noise = torch.randn_like(mean)
    torch.testing.assert_close(z, mean + torch.exp(0.5 * logvar) * noise)
    model.regularizer.encode_mode = "mode"
    with torch.no_grad():
        torch.testing.assert_close(model.encode(x), mean)


def test_kl_of_bf16_moments_is_computed_in_float32():
    # under CPU autocast the moments arrive in bf16 and nothing upcasts exp/sum there (CUDA's
    # autocast does): exp(logvar) - 1 - logvar near the prior cancelled to a few % error
    gen = torch.Generator().manual_seed(0)
    h = torch.cat([0.1 * torch.randn(4, 3, 8, 8, generator=gen), 0.05 * torch.randn(4, 3, 8, 8, generator=gen)], 1)
    h = h.bfloat16()
    _, reg, logs = DiagonalGaussianRegularizer(kl_weight=1.0)(h)
    exact = gaussian_kl(*DiagonalGaussianRegularizer.split(h.float())).mean()
    assert reg.dtype == torch.float32
    torch.testing.assert_close(reg, exact, rtol=1e-5, atol=0)
    torch.testing.assert_close(logs["kl"], exact, rtol=1e-5, atol=0)


@pytest.mark.parametrize("key", ["beta", "codebook_weight", "dead_code_threshold"])
def test_vq_weights_must_not_be_negative(key):
    # a negative commitment or codebook weight pushes the latents away from their codes
    with pytest.raises(ValueError, match=f"{key} must be >= 0, got -0.5"):
        VectorQuantizer(n_embed=4, embed_dim=2, **{key: -0.5})


def test_kl_logvar_is_clamped():
    reg = DiagonalGaussianRegularizer()
    h = torch.cat([torch.zeros(1, 2, 1, 1), torch.full((1, 2, 1, 1), 100.0)], dim=1)
    _, logvar = reg.split(h)
    assert float(logvar.max()) == 20.0


# -- VQ ------------------------------------------------------------------------------------


def _quantizer(n=10, d=3, **kw):
    torch.manual_seed(0)
    q = VectorQuantizer(n_embed=n, embed_dim=d, **kw)
    with torch.no_grad():
        q.embedding.weight.normal_()
    return q


def test_nearest_code_matches_brute_force():
    q = _quantizer()
    h = torch.randn(2, 3, 4, 5)
    flat = h.permute(0, 2, 3, 1).reshape(-1, 3)
    brute = torch.cdist(flat, q.embedding.weight).argmin(1).reshape(2, 4, 5)
    assert torch.equal(q.indices(h), brute)
    torch.testing.assert_close(q.quantize(h), q.embedding.weight[brute].permute(0, 3, 1, 2))


def test_codebook_and_commitment_terms_and_their_gradients():
    q = _quantizer(beta=0.25, codebook_weight=2.0)
    h = torch.randn(2, 3, 4, 4, requires_grad=True)
    _, loss, logs = q(h)
    z_q = q.quantize(h.detach())
    numel = h.numel()
    sq = ((h.detach() - z_q) ** 2).sum() / numel
    torch.testing.assert_close(logs["codebook_loss"], sq)
    torch.testing.assert_close(logs["commitment_loss"], sq)
    torch.testing.assert_close(loss, 2.0 * (sq + 0.25 * sq))
    loss.backward()
    # commitment only reaches the encoder: d/dh [2 * 0.25 * mean((h - sg e)^2)]
    torch.testing.assert_close(h.grad, 2.0 * 0.25 * 2 * (h.detach() - z_q) / numel)
    # codebook term only reaches the codes: d/de [2 * mean((sg h - e)^2)], summed over uses
    expected = torch.zeros_like(q.embedding.weight)
    index = q.indices(h.detach()).flatten()
    diffs = (z_q - h.detach()).permute(0, 2, 3, 1).reshape(-1, 3)
    expected.index_add_(0, index, 2.0 * 2 * diffs / numel)
    torch.testing.assert_close(q.embedding.weight.grad, expected)


def test_straight_through_gradient_is_identity():
    q = _quantizer()
    h = torch.randn(2, 3, 4, 4, requires_grad=True)
    z_st, _, _ = q(h)
    torch.testing.assert_close(z_st, q.quantize(h.detach()))  # forward: the codes
    weight = torch.randn_like(h)
    (z_st * weight).sum().backward()
    torch.testing.assert_close(h.grad, weight)  # backward: identity


def test_straight_through_gradient_reaches_the_encoder():
    torch.manual_seed(0)
    model = VQAutoencoder(latent_channels=3, n_embed=16, **TINY)
    rec, _, _ = model(torch.rand(2, 3, 16, 16) * 2 - 1)
    rec.abs().mean().backward()  # reconstruction only: no codebook/commitment path
    assert model.encoder.conv_in.weight.grad is not None
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0


def test_encode_is_pre_quantization_and_decode_quantizes():
    torch.manual_seed(0)
    model = VQAutoencoder(latent_channels=3, n_embed=16, **TINY).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        h = model.encode(x)
        codes = model.quantizer.quantize(h)
        assert not torch.allclose(h, codes)
        torch.testing.assert_close(model.decode(h), model.decode(codes))
        torch.testing.assert_close(model.decode(h), model(x)[0])
        torch.testing.assert_close(model.decode_indices(model.encode_indices(x)), model.decode(h))


def test_perplexity_and_usage():
    q = _quantizer(n=8, d=3)
    codes = q.embedding.weight.detach()
    # each of codes 0..3 used equally often: perplexity exactly 4, usage 4/8
    h = codes[torch.tensor([0, 1, 2, 3] * 4)].reshape(1, 4, 4, 3).permute(0, 3, 1, 2)
    _, _, logs = q(h)
    assert float(logs["perplexity"]) == pytest.approx(4.0, rel=1e-5)
    assert float(logs["codebook_usage"]) == pytest.approx(0.5)


def test_dead_codes_restart_onto_encoder_outputs():
    q = _quantizer(n=8, d=3, restart_dead_codes=True, dead_code_threshold=0.5, usage_decay=0.0)
    q.train()
    codes_before = q.embedding.weight.detach().clone()
    h = codes_before[0].reshape(1, 3, 1, 1).repeat(1, 1, 2, 2)  # only code 0 is hit
    _, _, logs = q(h)
    assert float(logs["dead_codes_restarted"]) == 7
    after = q.embedding.weight.detach()
    torch.testing.assert_close(after[0], codes_before[0])
    for i in range(1, 8):  # moved onto an encoder output (here all equal code 0)
        torch.testing.assert_close(after[i], codes_before[0])
    # metrics.csv shows every log_every-th step: the running total tells how many restarts
    # happened in between (it is not in the state dict: weights keep their keys)
    assert float(logs["dead_codes_restarted_total"]) == 7
    _, _, logs = q(h)
    assert float(logs["dead_codes_restarted"]) == 7 and float(logs["dead_codes_restarted_total"]) == 14
    assert set(q.state_dict()) == {"embedding.weight", "code_usage"}
    q.eval()
    _, _, logs = q(h)
    assert "dead_codes_restarted" not in logs  # never in evaluation


def test_code_counts_stay_exact_for_bf16_latents():
    """Under bf16 autocast the encoder's output is bf16; the code counts that feed the usage
    average and the logs are counted in float32 (a bf16 count is exact only up to 256)."""
    q = _quantizer(n=8, d=3, restart_dead_codes=True, dead_code_threshold=0.5, usage_decay=0.0)
    q.train()
    codes = q.embedding.weight.detach()
    index = torch.tensor([0] * 899 + [1])  # 899 is not a bf16 number (896 and 900 are)
    h = codes[index].reshape(1, 30, 30, 3).permute(0, 3, 1, 2).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as the trainer runs it in bf16
        assert bool((q.indices(h) == index.reshape(1, 30, 30)).all())
        _, _, logs = q(h)
    assert float(q.code_usage[0]) == 899.0 and float(q.code_usage[1]) == 1.0
    p = torch.tensor([899 / 900, 1 / 900], dtype=torch.float64)
    assert float(logs["perplexity"]) == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-6)
