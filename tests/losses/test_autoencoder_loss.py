"""The first stage's loss against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ldmkit.losses import AutoencoderLoss, adaptive_weight, hinge_d_loss, vanilla_d_loss
from ldmkit.losses.discriminator import PatchDiscriminator


def _loss(**kw):
    kw.setdefault("perceptual_weight", 0.0)
    kw.setdefault("disc_ndf", 8)
    kw.setdefault("disc_num_layers", 2)
    torch.manual_seed(0)
    return AutoencoderLoss(**kw)


def _images(seed=0, shape=(2, 3, 16, 16)):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=gen) * 2 - 1


def test_adaptive_weight_by_hand():
    w = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    a, b = torch.tensor([0.5, 1.0, 2.0]), torch.tensor([3.0, 0.0, 4.0])
    nll = (a * w**2).sum()  # grad 2 a w = [1, -4, 12], norm sqrt(161)
    g = (b * w).sum()  # grad b, norm 5
    weight = adaptive_weight(nll, g, w, disc_weight=0.5)
    assert float(weight) == pytest.approx(0.5 * math.sqrt(161) / (5 + 1e-4), rel=1e-6)
    assert not weight.requires_grad
    # no adversarial gradient at all: clamped to 1e4, times disc_weight
    assert float(adaptive_weight(nll, (0 * w).sum(), w, disc_weight=0.5)) == pytest.approx(0.5e4)


def test_generator_loss_uses_the_adaptive_weight_at_the_last_layer():
    loss = _loss(disc_start=0, disc_weight=0.8, reduction="mean", learn_logvar=False)
    x = _images(0)
    last = torch.randn(3, 3, 1, 1, requires_grad=True)  # a 1x1 "decoder last layer"
    inner = _images(1)
    rec = F.conv2d(inner, last)
    total, logs = loss.generator_loss(x, rec, torch.tensor(0.0), global_step=0, last_layer=last)
    # independent recomputation from the definition
    nll = (x - rec).abs().mean()
    g = -loss.discriminator(rec).mean()
    grad_nll = torch.autograd.grad(nll, last, retain_graph=True)[0]
    grad_g = torch.autograd.grad(g, last, retain_graph=True)[0]
    expected_weight = 0.8 * grad_nll.norm() / (grad_g.norm() + 1e-4)
    torch.testing.assert_close(logs["d_weight"], expected_weight.detach())
    torch.testing.assert_close(total, nll + expected_weight.detach() * g)


def test_disc_start_switches_the_adversarial_term_on():
    loss = _loss(disc_start=5)
    x, rec = _images(0), _images(1).requires_grad_()
    reg = torch.tensor(0.1)
    assert not loss.gan_active(4) and loss.gan_active(5)
    before, logs4 = loss.generator_loss(x, rec, reg, global_step=4, last_layer=rec)
    assert "g_loss" not in logs4
    torch.testing.assert_close(before, (x - rec).abs().mean() + reg)
    d4, _ = loss.discriminator_loss(x, rec, global_step=4)
    assert float(d4) == 0.0 and not d4.requires_grad  # no discriminator pass, no update
    after, logs5 = loss.generator_loss(x, rec, reg, global_step=5, last_layer=rec)
    assert "g_loss" in logs5
    torch.testing.assert_close(after, before + logs5["d_weight"] * logs5["g_loss"])
    d5, _ = loss.discriminator_loss(x, rec, global_step=5)
    d5.backward()
    assert all(p.grad is not None for p in loss.discriminator.parameters())


def test_disc_factor_zero_keeps_gan_off():
    assert not _loss(disc_start=0, disc_factor=0.0).gan_active(10**6)


def test_nll_with_logvar_and_sum_reduction():
    loss = _loss(logvar_init=0.7, reduction="sum", pixel_weight=2.0)
    x, rec = _images(0), _images(1)
    total, logs = loss.generator_loss(x, rec, torch.tensor(0.5), global_step=0)
    per_pixel = 2.0 * (x - rec).abs() / math.exp(0.7) + 0.7
    expected = per_pixel.sum() / x.shape[0] + 0.5
    torch.testing.assert_close(total, expected)
    assert loss.generator_parameters() == []  # the paper's optimizer leaves logvar out
    learned = _loss(learn_logvar=True)
    assert learned.generator_parameters() == [learned.logvar]


def test_discriminator_losses_by_hand():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.5])
    # hinge: 0.5 (mean relu(1 - real) + mean relu(1 + fake))
    assert float(hinge_d_loss(real, fake)) == pytest.approx(0.5 * ((0 + 0.5 + 2) / 3 + (0 + 1 + 2.5) / 3))
    softplus = lambda v: math.log1p(math.exp(v))  # noqa: E731
    expected = 0.5 * (sum(softplus(-r) for r in real.tolist()) / 3 + sum(softplus(f) for f in fake.tolist()) / 3)
    assert float(vanilla_d_loss(real, fake)) == pytest.approx(expected, rel=1e-6)


def test_patch_discriminator_layers_and_output():
    # 4x4 stride-2 convs halve 32 `layers` times, then two 4x4 stride-1 convs take 1 each
    for layers, size in ((1, 14), (2, 6), (3, 2)):
        d = PatchDiscriminator(in_channels=1, ndf=4, num_layers=layers)
        convs = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
        assert len(convs) == layers + 2
        assert d(torch.zeros(2, 1, 32, 32)).shape == (2, 1, size, size)


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="unknown disc_loss 'wgan'"):
        _loss(disc_loss="wgan")
    with pytest.raises(ValueError, match="unknown reduction 'avg'"):
        _loss(reduction="avg")
    # a negative (or NaN) weight would make a term one to maximize: refused, not trained
    for key, value in (("disc_factor", -1.0), ("regularization_weight", math.nan), ("pixel_weight", -2)):
        with pytest.raises(ValueError, match=f"{key} must be >= 0, got {value}"):
            _loss(**{key: value})
    with pytest.raises(ValueError, match="logvar_init must be a finite number, got inf"):
        _loss(logvar_init=math.inf)
    with pytest.raises(ValueError, match="do not match"):
        _loss().generator_loss(_images(0), _images(1, (2, 3, 8, 8)), torch.tensor(0.0), global_step=0)
