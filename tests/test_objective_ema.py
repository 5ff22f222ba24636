"""The diffusion objective and EMA against hand computations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ldmkit.diffusion import NoiseSchedule
from ldmkit.diffusion.objective import DiffusionObjective, scale_factor_from_latents
from ldmkit.ema import EMA


class Echo(nn.Module):
    """A 'denoiser' returning a fixed tensor, so the loss can be computed by hand."""

    def __init__(self, output):
        super().__init__()
        self.output = output

    def forward(self, z_t, t, cond):
        return self.output


@pytest.fixture
def case():
    gen = torch.Generator().manual_seed(0)
    z0, noise, out = (torch.randn(4, 2, 3, 3, generator=gen) for _ in range(3))
    t = torch.tensor([0, 100, 500, 999])
    return z0, noise, out, t


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_l2_loss_against_its_target(case, prediction):
    z0, noise, out, t = case
    schedule = NoiseSchedule()
    objective = DiffusionObjective(schedule, prediction=prediction)
    loss, logs = objective(Echo(out), z0, {}, t=t, noise=noise)
    a = schedule.alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
    target = {"eps": noise, "x0": z0, "v": a.sqrt() * noise - (1 - a).sqrt() * z0}[prediction]
    assert loss.item() == pytest.approx((out - target).square().mean().item(), rel=1e-5)
    assert logs["loss_simple"].item() == pytest.approx(loss.item(), rel=1e-6)


def test_l1_and_learned_logvar(case):
    z0, noise, out, t = case
    objective = DiffusionObjective(NoiseSchedule(), loss_type="l1", learn_logvar=True, logvar_init=0.5)
    loss, _ = objective(Echo(out), z0, {}, t=t, noise=noise)
    per_sample = (out - noise).abs().flatten(1).mean(1)
    expected = (per_sample / torch.exp(torch.tensor(0.5)) + 0.5).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert objective.logvar.grad is not None and objective.logvar.grad[t].abs().sum() > 0


def test_min_snr_weights(case):
    z0, noise, out, t = case
    schedule = NoiseSchedule()
    snr = schedule.alphas_cumprod[t] / (1 - schedule.alphas_cumprod[t])
    for prediction, weight in (("eps", snr.clamp(max=5) / snr), ("x0", snr.clamp(max=5)),
                               ("v", snr.clamp(max=5) / (snr + 1))):
        objective = DiffusionObjective(schedule, prediction=prediction, min_snr_gamma=5.0)
        torch.testing.assert_close(objective.snr_weight(t, z0), weight.float(), rtol=1e-5, atol=1e-6)


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="unknown loss type 'l3'"):
        DiffusionObjective(NoiseSchedule(), loss_type="l3")
    with pytest.raises(ValueError, match="unknown prediction 'score'"):
        DiffusionObjective(NoiseSchedule(), prediction="score")


def test_scale_by_std():
    latents = torch.randn(8, 4, 16, 16, generator=torch.Generator().manual_seed(0)) * 5.0
    factor = scale_factor_from_latents(latents)
    assert factor == pytest.approx(1 / latents.std().item(), rel=1e-6)
    assert (latents * factor).std().item() == pytest.approx(1.0, rel=1e-5)
    with pytest.raises(ValueError, match="std"):
        scale_factor_from_latents(torch.zeros(3, 3))


def test_ema_update_formula():
    model = nn.Linear(2, 2)
    ema = EMA(model, decay=0.9, warmup=False)
    before = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    expected = before + 0.1 * 1.0  # shadow - (1 - d)(shadow - param)
    torch.testing.assert_close(ema.shadow["weight"], expected)


def test_ema_warmup_decay_and_apply():
    model = nn.Linear(2, 2)
    ema = EMA(model, decay=0.9999)
    # CompVis LitEma counts the update being made: its first uses (1 + 1) / (10 + 1)
    assert ema.current_decay() == pytest.approx(2 / 11)
    before = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.shadow["weight"], before + (1 - 2 / 11))
    assert ema.current_decay() == pytest.approx(3 / 12)
    original = model.weight.detach().clone()
    with torch.no_grad():
        ema.shadow["weight"].fill_(3.0)
    with ema.applied_to(model):
        assert torch.all(model.weight == 3.0)
    torch.testing.assert_close(model.weight.detach(), original)
