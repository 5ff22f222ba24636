"""bf16 working weights (``trainer.bf16_weights``, :mod:`ldmkit.training.working_weights`):
the fused step is torch's fused AdamW (same bits on this host's kernel, and an independent
float64 formula), the forward on the working copy is autocast's forward, training steps
follow the autocast path, accumulation sums in float32, a replaced parameter is refused, and
a stage-2 run on them resumes exactly."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ldmkit import precision
from ldmkit.training import working_weights
from ldmkit.training.working_weights import WorkingWeights, unsupported_reason
from tests.training import faults

LR, BETAS, WD, EPS = 1e-3, (0.9, 0.999), 0.01, 1e-8


def _scalars(step: int, grad_scale: float = 1.0) -> torch.Tensor:
    b1, b2 = BETAS
    return torch.tensor([grad_scale, 1 - LR * WD, 1 - b1, b2, 1 - b2, -(LR / (1 - b1**step)),
                         math.sqrt(1 - b2**step), EPS])


@pytest.mark.parametrize("n", [4096, 1003])  # whole vectors, and a tail
def test_fused_step_is_torch_fused_adamw_and_the_formula(n):
    gen = torch.Generator().manual_seed(n)
    master = torch.randn(n, generator=gen) * 0.05
    exp_avg = torch.randn(n, generator=gen) * 1e-4
    exp_avg_sq = torch.rand(n, generator=gen) * 1e-7
    grad = (torch.randn(n, generator=gen) * 1e-3).bfloat16()
    step, scale = 3, 0.5
    # torch's own fused AdamW on the float32 gradient (the autocast path's cast of the bf16 one, scaled)
    p, m, v = master.clone(), exp_avg.clone(), exp_avg_sq.clone()
    torch._fused_adamw_([p], [grad.float() * scale], [m], [v], [], [torch.tensor(float(step))], lr=LR,
                        beta1=BETAS[0], beta2=BETAS[1], weight_decay=WD, eps=EPS, amsgrad=False, maximize=False)
    ours = [master.clone(), exp_avg.clone(), exp_avg_sq.clone()]
    working = torch.empty(n, dtype=torch.bfloat16)
    working_weights._kernel()(*ours, grad, working, _scalars(step, scale))
    for got, want in zip(ours, (p, m, v), strict=True):
        torch.testing.assert_close(got, want, rtol=1.2e-7, atol=0)  # one float32 rounding at most
    assert torch.equal(working, ours[0].bfloat16())
    # AdamW (Loshchilov & Hutter) in float64, written out
    g = grad.double() * scale
    m64 = BETAS[0] * exp_avg.double() + (1 - BETAS[0]) * g
    v64 = BETAS[1] * exp_avg_sq.double() + (1 - BETAS[1]) * g * g
    m_hat, v_hat = m64 / (1 - BETAS[0] ** step), v64 / (1 - BETAS[1] ** step)
    p64 = master.double() * (1 - LR * WD) - LR * m_hat / (v_hat.sqrt() + EPS)
    torch.testing.assert_close(ours[0].double(), p64, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(ours[2].double(), v64, rtol=1e-5, atol=0)


class _Net(nn.Module):
    """Convolutions, a linear layer (on the working copy), GroupNorm and an embedding (not)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Conv2d(3, 16, 3, padding=1)
        self.norm = nn.GroupNorm(4, 16)
        self.emb = nn.Embedding(5, 16)
        self.proj = nn.Linear(16, 16)
        self.out = nn.Conv2d(16, 3, 3, padding=1)

    def forward(self, x, label, use_label=True):
        h = F.silu(self.norm(self.inp(x)))
        if use_label:
            h = h + self.proj(self.emb(label))[:, :, None, None]
        return self.out(h)


def _pair():
    torch.manual_seed(0)
    net = _Net()
    ref, ours = copy.deepcopy(net), copy.deepcopy(net)
    return (ref, torch.optim.AdamW(ref.parameters(), lr=LR, betas=BETAS, weight_decay=WD, fused=True),
            ours, torch.optim.AdamW(ours.parameters(), lr=LR, betas=BETAS, weight_decay=WD, fused=True))


def _batch(seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, 8, 8, generator=gen), torch.randint(0, 5, (4,), generator=gen), torch.randn(4, 3, 8, 8, generator=gen)


def test_training_on_the_working_weights_follows_autocast():
    ref, ref_opt, ours, opt = _pair()
    weights = WorkingWeights(ours, opt)
    assert sorted(weights.names) == ["inp.bias", "inp.weight", "out.bias", "out.weight", "proj.bias", "proj.weight"]
    params = dict(ours.named_parameters())
    for step in range(3):
        x, label, target = _batch(step)
        with precision.autocast("bf16", "cpu"):
            want = ref(x, label)
            got = weights.forward(x, label)
        # the working copy is the masters rounded to bf16, what autocast casts them to
        assert torch.equal(got, want), f"step {step}: forward"
        F.mse_loss(want.float(), target).backward()
        ref_grads = {name: p.grad.clone() for name, p in ref.named_parameters()}
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        F.mse_loss(got.float(), target).backward()
        for name in weights.names:  # the working weights' gradients: autocast's, before its cast
            assert params[name].grad is None
            assert torch.equal(weights.shadows[name].grad.float(), ref_grads[name]), name
        weights.gather()
        weights.step()
        opt.step()  # the norm and the embedding
        opt.zero_grad(set_to_none=True)
        for name, p in ref.named_parameters():
            torch.testing.assert_close(params[name], p, rtol=1e-6, atol=1e-9, msg=f"step {step}: {name}")
            assert params[name].dtype == torch.float32
    # the masters are still the module's parameters; the state keeps AdamW's layout and loads
    # into a plain AdamW
    assert set(ours.state_dict()) == set(ref.state_dict())
    state = opt.state_dict()
    fresh = torch.optim.AdamW(ref.parameters(), lr=LR, betas=BETAS, weight_decay=WD, fused=True)
    fresh.load_state_dict(state)
    for key, want in ref_opt.state_dict()["state"].items():
        got = state["state"][key]
        assert float(got["step"]) == float(want["step"]) == 3.0
        torch.testing.assert_close(got["exp_avg_sq"], want["exp_avg_sq"], rtol=1e-5, atol=1e-12)


def test_frozen_layers_run_on_a_copy_made_once_and_made_again_when_written():
    """A LoRA's base or a frozen encoder: no gradient, no optimizer state, a bf16 copy that
    autocast would have made at every step; an in-place write or a replaced tensor refreshes it."""
    ref, _, ours, _ = _pair()
    for net in (ref, ours):
        net.inp.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=LR, fused=True)
    weights = WorkingWeights(ours, opt)
    assert weights.frozen_names == ["inp.bias", "inp.weight"] and "inp.weight" not in weights.names
    assert "2 frozen ones" in weights.describe()
    x, label, _ = _batch(0)

    def same_output():
        with precision.autocast("bf16", "cpu"):
            return torch.equal(weights.forward(x, label), ref(x, label))

    assert same_output()
    with torch.no_grad():
        for net in (ref, ours):
            net.inp.weight.mul_(2)  # in place: the version counter moves
    assert same_output()
    for net in (ref, ours):
        net.inp.bias.data = net.inp.bias.data + 1  # a new tensor
    assert same_output()
    with precision.autocast("bf16", "cpu"):
        weights.forward(x, label).float().sum().backward()
    assert ours.inp.weight.grad is None and weights.shadows["inp.weight"].grad is None


def test_a_layer_without_a_gradient_is_not_stepped_as_adamw_skips_it():
    """A branch some steps do not take (``ddp_find_unused_parameters``'s case): AdamW leaves a
    parameter without a gradient alone, step count included; so do the working weights, and
    the two stay together over steps that take it and steps that do not."""
    ref, ref_opt, ours, opt = _pair()
    weights = WorkingWeights(ours, opt)
    params = dict(ours.named_parameters())
    for step, use_label in enumerate((True, False, False, True)):
        x, label, target = _batch(step)
        with precision.autocast("bf16", "cpu"):
            want = ref(x, label, use_label)
            got = weights.forward(x, label, use_label)
        assert torch.equal(got, want)
        F.mse_loss(want.float(), target).backward()
        F.mse_loss(got.float(), target).backward()
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        weights.gather()
        weights.step()
        opt.step()
        opt.zero_grad(set_to_none=True)
        for name, p in ref.named_parameters():
            torch.testing.assert_close(params[name], p, rtol=1e-6, atol=1e-9, msg=f"step {step}: {name}")
    assert float(opt.state[ours.proj.weight]["step"]) == 2.0 and float(opt.state[ours.inp.weight]["step"]) == 4.0
    assert float(ref_opt.state[ref.proj.weight]["step"]) == 2.0


def test_accumulated_micro_batches_sum_in_float32():
    _, _, ours, opt = _pair()
    weights = WorkingWeights(ours, opt)
    total = {}
    for seed in (1, 2, 3):
        x, label, target = _batch(seed)
        with precision.autocast("bf16", "cpu"):
            out = weights.forward(x, label)
        F.mse_loss(out.float(), target).backward()
        for name, shadow in weights.shadows.items():
            total[name] = total.get(name, 0) + shadow.grad.float()
        weights.gather()
    flat = torch.cat([total[name].reshape(-1) for name in weights.names])
    assert weights._gradient().dtype == torch.float32 and torch.equal(weights._gradient(), flat)
    torch.testing.assert_close(weights.grad_norm(), torch.linalg.vector_norm(flat))


def test_a_replaced_parameter_is_refused_by_name():
    _, _, ours, opt = _pair()
    weights = WorkingWeights(ours, opt)
    ours.proj.weight.data = ours.proj.weight.data.clone()
    with pytest.raises(RuntimeError, match=r"proj\.weight .*replaced"):
        weights.step()


def test_what_it_cannot_serve_is_named():
    net = _Net()
    assert "SGD" in unsupported_reason(net, torch.optim.SGD(net.parameters(), lr=0.1))
    assert "amsgrad" in unsupported_reason(net, torch.optim.AdamW(net.parameters(), amsgrad=True))
    norm_only = nn.GroupNorm(2, 4)
    assert "no trained convolution" in unsupported_reason(norm_only, torch.optim.AdamW(norm_only.parameters()))
    with pytest.raises(ValueError, match="SGD"):
        WorkingWeights(net, torch.optim.SGD(net.parameters(), lr=0.1))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return faults.make_shards(tmp_path_factory.mktemp("data"))


def _run(shards, run_dir, *extra):
    args = faults.stage_args(2, shards, run_dir, "trainer.precision=bf16", "trainer.num_workers=0", *extra)
    assert faults.train_in_process(args) == 0


def test_a_bf16_run_on_working_weights_resumes_exactly_and_follows_autocast(shards, tmp_path, capsys):
    straight = tmp_path / "straight"
    _run(shards, straight, "trainer.bf16_weights=true", "trainer.progress=true")
    assert "bf16 working weights:" in capsys.readouterr().err
    step = faults.checkpoint_steps(straight)[-1]
    expected = faults.final_contents(straight, step)
    resumed = tmp_path / "resumed"
    for stop in (3, step):  # stopped at the first checkpoint, restarted with the same command
        _run(shards, resumed, "trainer.bf16_weights=true", f"trainer.max_steps={stop}")
    assert faults.differences(expected, faults.final_contents(resumed, step)) == []
    # the same run with autocast's casts (gradient clipping on, as by default): the same bits
    # in every weight and EMA average; the optimizer's moments to float rounding (torch's kernel
    # finishes each tensor's last few values in scalar code, ours runs over one flat buffer)
    autocast = tmp_path / "autocast"
    _run(shards, autocast, "trainer.bf16_weights=false")
    other = faults.final_contents(autocast, step)
    assert set(other) == set(expected)
    tensors = [k for k in expected if k.startswith(("model.safetensors:", "training.safetensors:"))]
    assert any(k.startswith("model.safetensors:denoiser.") for k in tensors)
    assert [k for k in tensors if not torch.equal(expected[k], other[k])] == []
    moments = [k for k in expected if k.endswith((".exp_avg", ".exp_avg_sq"))]
    assert moments
    for key in moments:
        torch.testing.assert_close(expected[key], other[key], rtol=1e-5, atol=1e-12, msg=key)


def test_accumulated_micro_batches_train_as_autocast_does(shards, tmp_path):
    """trainer.accumulate_grad_batches=2: the micro-batches' gradients summed in float32 and
    clipped as clip_grad_norm_ does; the weights end bitwise equal to autocast's."""
    contents = {}
    for on in ("true", "false"):
        run = tmp_path / on
        _run(shards, run, f"trainer.bf16_weights={on}", "trainer.accumulate_grad_batches=2", "trainer.batch_size=2",
             "trainer.max_steps=3", "trainer.checkpoint_every=3")
        contents[on] = faults.final_contents(run, 3)
    tensors = [k for k in contents["true"] if k.startswith(("model.safetensors:", "training.safetensors:"))]
    assert any(k.startswith("model.safetensors:denoiser.") for k in tensors)
    assert [k for k in tensors if not torch.equal(contents["true"][k], contents["false"][k])] == []


def test_true_where_it_cannot_serve_is_an_error_naming_the_reason(shards, tmp_path, capsys):
    args = faults.stage_args(2, shards, tmp_path / "run", "trainer.precision=bf16", "trainer.num_workers=0",
                             "trainer.bf16_weights=true", "trainer.compile=true", "trainer.compile_backend=eager")
    assert faults.train_in_process(args) != 0
    err = capsys.readouterr().err
    assert "trainer.bf16_weights=true" in err and "trainer.compile is on" in err, err[-2000:]


def test_a_layer_run_outside_autocast_is_an_error_naming_the_key(shards, tmp_path, capsys, monkeypatch):
    """A plugin that runs a layer in float32 on purpose (outside autocast) meets bf16 weights:
    the run stops at its first step with one line naming trainer.bf16_weights."""
    from ldmkit.training.ldm import DiffusionStep

    denoise = DiffusionStep._denoise

    def float32_denoise(self, z_t, t, cond):
        with precision.float32():
            return denoise(self, z_t.float(), t, cond)

    monkeypatch.setattr(DiffusionStep, "_denoise", float32_denoise)
    args = faults.stage_args(2, shards, tmp_path / "run", "trainer.precision=bf16", "trainer.num_workers=0",
                             "trainer.bf16_weights=auto")
    assert faults.train_in_process(args) != 0
    err = capsys.readouterr().err
    assert "forward on the bf16 working weights failed" in err and "trainer.bf16_weights=false" in err, err[-2000:]
