"""Contract tests every implementation of an ldmkit interface must pass.

Subclass a mixin in a pytest class whose name starts with ``Test`` and implement the
factory method(s)::

    from ldmkit.testing import SamplerConformance

    class TestMySampler(SamplerConformance):
        def make_sampler(self):
            return MySampler(steps=20)

Expected values are computed independently of the component under test: samplers are
run on denoisers whose exact answer is known in closed form (a point mass, a Gaussian).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pytest
import torch
from torch import Tensor

from ldmkit.diffusion.schedule import NoiseSchedule
from ldmkit.interfaces import (
    CONDITION_ROLES,
    INPUT_KINDS,
    PREDICTIONS,
    Conditioner,
    Denoiser,
    FirstStage,
    MissingConditionError,
    Sampler,
)


def perturb_parameters(module: torch.nn.Module, std: float = 0.05, seed: int = 0) -> None:
    """Add N(0, std^2) noise to every parameter (in place): zero-initialized output layers (as in the paper's
    UNet) would otherwise hide whether the output depends on the inputs at all."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) * std)


def _differ(a: Tensor, b: Tensor, rel: float = 1e-4) -> bool:
    """Whether ``a`` and ``b`` differ by more than round-off (relative to their scale)."""
    a, b = a.detach(), b.detach()
    scale = max(float(a.abs().max()), float(b.abs().max()), 1e-12)
    return float((a - b).abs().max()) > rel * scale


def _check_not_trivial(out: Tensor, what: str) -> None:
    """``out`` is finite, not all zeros and not one value repeated within each sample."""
    assert torch.isfinite(out).all(), f"{what} is not finite"
    out = out.detach()
    assert out.abs().max() > 0, f"{what} is all zeros"
    for i, sample in enumerate(out):
        assert _differ(sample, sample.flatten()[0].expand_as(sample)), (
            f"{what} is one value repeated over sample {i}"
        )


def _check_declared(component: Any) -> None:
    """The component sets what its interface declares (``Component.declaration_problems``)."""
    problems = component.declaration_problems()
    assert not problems, f"{type(component).__name__}: {'; '.join(problems)}"


def _same_input(batch: Mapping[str, Any], i: int, j: int) -> bool:
    """Whether samples ``i`` and ``j`` of ``batch`` have equal entries under every key."""
    return all(_equal(_reorder(value, [i]), _reorder(value, [j])) for value in batch.values())


def _equal(a: Any, b: Any) -> bool:
    """Equality of batch entries: tensors and arrays elementwise, sequences item by item."""
    if hasattr(a, "shape") and hasattr(b, "shape"):  # tensors, numpy arrays
        return tuple(a.shape) == tuple(b.shape) and bool((a == b).all())
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _reorder(value: Any, order: list[int]) -> Any:
    """A batch entry with its samples in ``order`` (tensors, arrays, lists, tuples)."""
    if isinstance(value, Tensor):
        return value[order]
    if isinstance(value, list | tuple):
        return type(value)(value[i] for i in order)
    if hasattr(value, "__getitem__") and hasattr(value, "shape"):  # numpy
        return value[order]
    return value


# -- FirstStage ---------------------------------------------------------------------------


class FirstStageConformance:
    """Contract of :class:`ldmkit.interfaces.FirstStage`.

    An untrained first stage reconstructs nothing recognisable, so by default the suite checks
    what holds for any weights: the decoder's output depends on every channel of its latent and
    is not zero or constant, the encoder's latent depends on the image, each sample is encoded
    and decoded independently of the others, and ``decode(encode(x))`` follows ``x``. Set
    ``min_reconstruction_correlation`` (the Pearson correlation of ``decode(encode(x))`` with
    ``x``) when ``make_first_stage`` returns a trained or lossless one: 0.999 for an identity,
    about 0.9 for a pretrained KL-f8. Set ``deterministic_encode``
    when ``encode`` should not draw noise (a KL posterior's mean, ``encode_mode=mode``; VQ's
    pre-quantization latent): two encodes in eval mode under different RNG seeds must agree.
    """

    image_size: int = 16
    batch_size: int = 2
    min_reconstruction_correlation: float | None = None
    deterministic_encode: bool = False

    def make_first_stage(self) -> FirstStage:
        raise NotImplementedError("implement make_first_stage() in your test class")

    def _images(self, fs: FirstStage, seed: int = 0) -> Tensor:
        gen = torch.Generator().manual_seed(seed)
        shape = (self.batch_size, fs.image_channels, self.image_size, self.image_size)
        return torch.rand(shape, generator=gen) * 2 - 1

    def test_is_a_first_stage(self):
        fs = self.make_first_stage()
        assert isinstance(fs, FirstStage)
        _check_declared(fs)
        assert isinstance(fs.latent_channels, int) and fs.latent_channels > 0
        f = fs.downsample_factor
        assert isinstance(f, int) and f >= 1 and f & (f - 1) == 0, f"f={f} is not a power of 2"

    def test_encode_decode_shapes(self):
        fs = self.make_first_stage().eval()
        x = self._images(fs)
        with torch.no_grad():
            z = fs.encode(x)
            f = fs.downsample_factor
            assert z.shape == (self.batch_size, fs.latent_channels, self.image_size // f, self.image_size // f)
            assert fs.latent_shape(self.image_size, self.image_size) == tuple(z.shape[1:])
            rec = fs.decode(z)
        assert rec.shape == x.shape
        assert torch.isfinite(rec).all()

    def test_forward_returns_reconstruction_regularizer_logs(self):
        fs = self.make_first_stage().train()
        x = self._images(fs)
        rec, reg, logs = fs(x)
        assert rec.shape == x.shape
        assert reg.ndim == 0 and torch.isfinite(reg)
        assert isinstance(logs, Mapping)
        params = [p for p in fs.parameters() if p.requires_grad]
        if params:
            ((rec - x).abs().mean() + reg).backward()
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)

    def _latents(self, fs: FirstStage, seed: int) -> Tensor:
        gen = torch.Generator().manual_seed(seed)
        shape = (self.batch_size, *fs.latent_shape(self.image_size, self.image_size))
        return torch.randn(shape, generator=gen)

    def test_decoder_depends_on_its_latent(self):
        """``decode(z)`` is not zero or constant and changes with each channel of ``z``."""
        fs = self.make_first_stage().eval()
        z, other = self._latents(fs, 0), self._latents(fs, 1)
        with torch.no_grad():
            a, b = fs.decode(z), fs.decode(other)
            _check_not_trivial(a, "decode(z)")
            assert _differ(a, b), "decode(z) is the same for two different latents: the latent is ignored"
            for channel in range(fs.latent_channels):
                changed = z.clone()
                changed[:, channel] = other[:, channel]
                assert _differ(a, fs.decode(changed)), (
                    f"decode(z) ignores latent channel {channel} of {fs.latent_channels}"
                )

    def _seeded(self, fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        """``fn(x)`` with the global RNG seeded: a KL encoder that samples its posterior
        draws the same noise for both images, so only the images can make them differ."""
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(0)
            return fn(x)

    def test_encoder_depends_on_its_image(self):
        fs = self.make_first_stage().eval()
        a, b = self._seeded(fs.encode, self._images(fs, 0)), self._seeded(fs.encode, self._images(fs, 1))
        _check_not_trivial(a, "encode(x)")
        assert _differ(a, b), "encode(x) is the same for two different images: the image is ignored"

    def test_samples_are_independent(self):
        """The last sample's latent depends on its own image, and its decoded image on its
        own latent, alone: new images or latents for the other samples leave them as they
        were (an encoder that reads ``x[0]`` for the batch, or a decoder that normalizes over
        the batch, fails here)."""
        fs = self.make_first_stage().eval()

        def others_replaced(mine: Tensor, others: Tensor) -> Tensor:
            return torch.cat([others[:-1], mine[-1:]])

        for what, fn, x, other in (
            ("encode", fs.encode, self._images(fs, 0), self._images(fs, 1)),
            ("decode", fs.decode, self._latents(fs, 0), self._latents(fs, 1)),
        ):
            a, b = self._seeded(fn, x)[-1], self._seeded(fn, others_replaced(x, other))[-1]
            torch.testing.assert_close(
                a, b, atol=1e-5, rtol=1e-5,
                msg=lambda m, what=what: f"{what}: sample {self.batch_size - 1}'s output changed with the other samples' inputs: {m}",
            )  # fmt: skip

    def test_reconstruction_is_not_trivial(self):
        """``decode(encode(x))`` is not zero or constant and changes with ``x``; with
        ``min_reconstruction_correlation`` set it must also correlate with ``x``."""
        fs = self.make_first_stage().eval()
        x, other = self._images(fs, 0), self._images(fs, 1)
        rec = self._seeded(lambda v: fs.decode(fs.encode(v)), x)
        rec_other = self._seeded(lambda v: fs.decode(fs.encode(v)), other)
        _check_not_trivial(rec, "decode(encode(x))")
        assert _differ(rec, rec_other), "decode(encode(x)) is the same for two different images"
        if self.min_reconstruction_correlation is not None:
            assert rec.shape == x.shape, "min_reconstruction_correlation needs as many channels out as in"
            corr = float(torch.corrcoef(torch.stack([rec.flatten(), x.flatten()]).double())[0, 1])
            assert corr >= self.min_reconstruction_correlation, (
                f"decode(encode(x)) correlates {corr:.4f} with x, below "
                f"min_reconstruction_correlation = {self.min_reconstruction_correlation}"
            )

    def test_encode_is_deterministic(self):
        if not self.deterministic_encode:
            pytest.skip("deterministic_encode is not set: encode may sample")
        fs = self.make_first_stage().eval()
        x = self._images(fs)
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            runs = []
            for seed in (0, 1):
                torch.manual_seed(seed)
                runs.append(fs.encode(x))
        assert torch.equal(runs[0], runs[1]), (
            "encode(x) differs between two calls under different RNG seeds, but the test class "
            "sets deterministic_encode = True"
        )

    def test_latent_shape_rejects_indivisible_sizes(self):
        fs = self.make_first_stage()
        if fs.downsample_factor == 1:
            pytest.skip("f = 1 divides every size")
        with pytest.raises(ValueError, match="downsample factor"):
            fs.latent_shape(self.image_size + 1, self.image_size)


# -- Denoiser -----------------------------------------------------------------------------


class DenoiserConformance:
    """Contract of :class:`ldmkit.interfaces.Denoiser`."""

    latent_size: int = 8
    batch_size: int = 2
    context_tokens: int = 3

    def make_denoiser(self) -> Denoiser:
        raise NotImplementedError("implement make_denoiser() in your test class")

    def make_condition(self, denoiser: Denoiser, batch_size: int, seed: int = 0) -> dict[str, Tensor]:
        """A random condition matching the denoiser's declared dims."""
        gen = torch.Generator().manual_seed(seed)
        cond: dict[str, Tensor] = {}
        if denoiser.context_dim:
            cond["crossattn"] = torch.randn(batch_size, self.context_tokens, denoiser.context_dim, generator=gen)
        if denoiser.vector_dim:
            cond["vector"] = torch.randn(batch_size, denoiser.vector_dim, generator=gen)
        concat = denoiser.in_channels - denoiser.out_channels
        if concat > 0:
            cond["concat"] = torch.randn(batch_size, concat, self.latent_size, self.latent_size, generator=gen)
        return cond

    def _inputs(self, d: Denoiser, seed: int = 0) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        gen = torch.Generator().manual_seed(seed)
        z = torch.randn(self.batch_size, d.out_channels, self.latent_size, self.latent_size, generator=gen)
        t = torch.randint(0, 1000, (self.batch_size,), generator=gen)
        return z, t, self.make_condition(d, self.batch_size, seed)

    def test_is_a_denoiser(self):
        d = self.make_denoiser()
        assert isinstance(d, Denoiser)
        _check_declared(d)
        assert d.prediction in PREDICTIONS
        assert d.in_channels >= d.out_channels > 0

    def test_output_shape(self):
        d = self.make_denoiser().eval()
        z, t, cond = self._inputs(d)
        with torch.no_grad():
            out = d(z, t, cond)
        assert out.shape == z.shape and out.dtype == z.dtype
        assert torch.isfinite(out).all()

    def test_depends_on_timestep(self):
        d = self.make_denoiser().eval()
        perturb_parameters(d)
        z, t, cond = self._inputs(d)
        with torch.no_grad():
            a = d(z, torch.zeros_like(t), cond)
            b = d(z, torch.full_like(t, 999), cond)
        assert not torch.allclose(a, b), "the output does not depend on t"

    def test_depends_on_condition(self):
        d = self.make_denoiser().eval()
        z, t, cond = self._inputs(d)
        if not cond:
            pytest.skip("the denoiser takes no condition")
        perturb_parameters(d)
        other = self.make_condition(d, self.batch_size, seed=1)
        with torch.no_grad():
            for key in cond:
                changed = {**cond, key: other[key]}
                assert not torch.allclose(d(z, t, cond), d(z, t, changed)), f"ignores cond[{key!r}]"

    def test_samples_are_independent(self):
        """The last sample's output depends on its own latent, timestep and condition alone:
        new ones for the other samples leave it as it was (a denoiser that embeds ``t[0]`` for
        the whole batch, or attends across the batch, fails here)."""
        d = self.make_denoiser().eval()
        perturb_parameters(d)
        z, t, cond = self._inputs(d)
        other_z, other_t, other_cond = self._inputs(d, seed=1)

        def others_replaced(mine: Tensor, others: Tensor) -> Tensor:
            return torch.cat([others[:-1], mine[-1:]])

        z2, t2 = others_replaced(z, other_z), others_replaced(t, 999 - t)
        cond2 = {key: others_replaced(value, other_cond[key]) for key, value in cond.items()}
        with torch.no_grad():
            a, b = d(z, t, cond)[-1], d(z2, t2, cond2)[-1]
        torch.testing.assert_close(
            a, b, atol=1e-5, rtol=1e-5,
            msg=lambda m: f"sample {self.batch_size - 1}'s output changed with the other samples' z, t and condition: {m}",
        )  # fmt: skip

    def test_backward_reaches_parameters(self):
        d = self.make_denoiser().train()
        z, t, cond = self._inputs(d)
        # a regression loss against a random target: mean(out^2) has zero gradient for the
        # zero-initialized output layers of the paper's UNet
        target = torch.randn(z.shape, generator=torch.Generator().manual_seed(3))
        (d(z, t, cond) - target).square().mean().backward()
        grads = [p.grad for p in d.parameters() if p.requires_grad]
        assert grads and any(g is not None and g.abs().sum() > 0 for g in grads)


# -- Conditioner --------------------------------------------------------------------------


class ConditionerConformance:
    """Contract of :class:`ldmkit.interfaces.Conditioner`."""

    batch_size: int = 3

    def make_conditioner(self) -> Conditioner:
        raise NotImplementedError("implement make_conditioner() in your test class")

    def make_batch(self, n: int) -> dict[str, Any]:
        """The conditioner's inputs for ``n`` samples; samples 0 and 1 must differ."""
        raise NotImplementedError("implement make_batch(n) in your test class")

    def _check_shapes(self, c: Conditioner, out: Mapping[str, Tensor], n: int) -> None:
        assert set(out) <= set(CONDITION_ROLES), f"unknown roles {set(out) - set(CONDITION_ROLES)}"
        problems = c.condition_problems(out)
        assert not problems, f"{type(c).__name__}: {'; '.join(problems)}"
        for role, value in out.items():
            assert value.shape[0] == n, f"{role}: batch dim {value.shape[0]} != {n}"

    def test_is_a_conditioner(self):
        c = self.make_conditioner()
        assert isinstance(c, Conditioner)
        _check_declared(c)
        batch = self.make_batch(self.batch_size)
        missing = [k for k in c.input_keys if k not in batch]
        assert not missing, f"make_batch lacks the conditioner's input keys {missing}"

    def test_output_matches_declared_dims(self):
        c = self.make_conditioner()
        self._check_shapes(c, c(self.make_batch(self.batch_size)), self.batch_size)

    def test_unconditional_has_same_shapes(self):
        c = self.make_conditioner()
        batch = self.make_batch(self.batch_size)
        cond, uncond = c(batch), c.unconditional(batch)
        assert set(cond) == set(uncond)
        for role in cond:
            assert cond[role].shape == uncond[role].shape, role

    def test_input_kinds_are_known(self):
        c = self.make_conditioner()
        for key in c.input_keys:
            assert c.input_kind(key) in INPUT_KINDS, f"{key}: unknown kind {c.input_kind(key)!r}"
        assert set(c.input_kinds) <= set(c.input_keys), "input_kinds names keys the conditioner does not read"

    def _conditioned(self) -> tuple[Conditioner, dict[str, Any], dict[str, Tensor], dict[str, Tensor]]:
        """An eval-mode conditioner (no dropout layers), a batch, its condition and null
        condition; skips conditioners that read no input."""
        c = self.make_conditioner().eval()
        if not c.input_keys:
            pytest.skip("the conditioner reads no input")
        batch = self.make_batch(self.batch_size)
        with torch.no_grad():
            return c, batch, c(batch), c.unconditional(batch)

    def test_output_depends_on_the_input(self):
        """Any two samples of ``make_batch`` whose inputs differ get different conditions
        (samples 0 and 1 must differ: make it so), so a conditioner that ignores its input,
        or maps several inputs to one condition, fails here."""
        _, batch, cond, _ = self._conditioned()
        assert not _same_input(batch, 0, 1), "make_batch must give samples 0 and 1 different inputs"
        for i in range(self.batch_size):
            for j in range(i + 1, self.batch_size):
                assert _same_input(batch, i, j) or any(not torch.equal(v[i], v[j]) for v in cond.values()), (
                    f"samples {i} and {j} have different inputs but the same condition: the input is ignored"
                )

    def test_swapping_two_samples_swaps_their_conditions(self):
        """Each sample's condition follows its own input, not its place in the batch: a
        conditioner that varies only with the position fails here. Like the dropout check it
        needs an eval-mode conditioner to be deterministic (one that encodes images through a
        sampling KL first stage is not: bind a deterministic one in ``make_conditioner``)."""
        c, batch, cond, _ = self._conditioned()
        order = [1, 0, *range(2, self.batch_size)]
        swapped = {key: _reorder(value, order) for key, value in batch.items()}
        with torch.no_grad():
            out = c(swapped)
        for role in cond:
            torch.testing.assert_close(
                out[role], cond[role][order], atol=1e-5, rtol=1e-5,
                msg=lambda m, role=role: f"{role}: swapping samples 0 and 1 of the batch did not swap their conditions: {m}",
            )  # fmt: skip

    def test_each_sample_is_conditioned_on_its_own(self):
        """Sample i's condition is the one it gets alone, whatever else the batch holds: ``ldmkit
        sample`` promises that sample i is seed + i drawn alone (a conditioner that normalizes
        over the batch, or pads prompts to the batch's longest, fails here). Deterministic in
        eval mode, like the swap check."""
        c, batch, cond, _ = self._conditioned()
        for i in range(self.batch_size):
            with torch.no_grad():
                alone = c({key: _reorder(value, [i]) for key, value in batch.items()})
            for role in cond:
                # float32 kernels block by batch size: a 6-layer MiniLM on an AMX CPU, one
                # thread, gave 2.3e-5 at an entry of 0.11 between batch 1 and batch 4 (the swap
                # check above keeps the batch size and 1e-5); mixing samples moves entries by
                # their own scale
                torch.testing.assert_close(
                    alone[role], cond[role][i : i + 1], atol=1e-4, rtol=1e-4,
                    msg=lambda m, role=role, i=i: f"{role}: sample {i} alone gets another condition than in the batch: {m}",
                )  # fmt: skip

    def test_null_condition_differs_from_every_real_one(self):
        _, _, cond, uncond = self._conditioned()
        for i in range(self.batch_size):
            assert any(not torch.equal(cond[r][i], uncond[r][i]) for r in cond), (
                f"sample {i}: the null condition equals the real one, guidance would do nothing"
            )

    def test_dropout_substitutes_exactly_the_null_condition_per_sample(self):
        c, batch, cond, uncond = self._conditioned()
        with torch.no_grad():
            c.drop_rate = 1.0
            dropped = c.condition(batch, generator=torch.Generator().manual_seed(0))
            c.drop_rate = 0.0
            kept = c.condition(batch, generator=torch.Generator().manual_seed(0))
        for role in cond:
            torch.testing.assert_close(dropped[role], uncond[role], atol=0, rtol=0)
            torch.testing.assert_close(kept[role], cond[role], atol=0, rtol=0)

    def test_missing_key_names_the_conditioner_and_the_key(self):
        c = self.make_conditioner()
        for key in c.input_keys:
            batch = {k: v for k, v in self.make_batch(self.batch_size).items() if k != key}
            with pytest.raises(MissingConditionError, match=repr(key)):
                c(batch)

    def make_training_batch(self, n: int) -> dict[str, Any]:
        """A batch as training data gives it (``data_keys``); default: ``make_batch``."""
        return self.make_batch(n)

    def test_training_inputs_leave_the_batch_alone(self):
        c = self.make_conditioner()
        batch = self.make_training_batch(self.batch_size)
        before = dict(batch)
        inputs = c.training_inputs(batch, torch.Generator().manual_seed(0))
        assert dict(batch).keys() == before.keys() and all(batch[k] is before[k] for k in before)
        missing = [k for k in c.input_keys if k not in inputs]
        assert not missing, f"training data with only data_keys {c.data_keys} lacks input keys {missing}"


# -- Sampler ------------------------------------------------------------------------------


def point_mass_denoiser(schedule: NoiseSchedule, target: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    """The exact eps-prediction when all data equals ``target``:
    ``eps = (z_t - sqrt(a_t) x0) / sqrt(1 - a_t)``."""

    def denoise(z_t: Tensor, t: Tensor) -> Tensor:
        return schedule.predict_eps(z_t, t, target.expand_as(z_t))

    return denoise


def gaussian_denoiser(schedule: NoiseSchedule, mean: float, std: float) -> Callable[[Tensor, Tensor], Tensor]:
    """The exact E[eps | z_t] when every coordinate of the data is N(mean, std^2):
    ``sqrt(1 - a) (z_t - sqrt(a) mean) / (a std^2 + 1 - a)``."""

    def denoise(z_t: Tensor, t: Tensor) -> Tensor:
        a = schedule.alpha_bar(t, z_t)
        return (1 - a).sqrt() * (z_t - a.sqrt() * mean) / (a * std**2 + 1 - a)

    return denoise


def shared_value_denoiser(schedule: NoiseSchedule, mean: float, std: float) -> Callable[[Tensor, Tensor], Tensor]:
    """The exact E[eps | z_t] when each sample is one value c ~ N(mean, std^2) repeated over all
    of its D coordinates. The sample's mean m of z_t is sufficient for c:
    ``E[c | z_t] = mean + sqrt(a) std^2 (m - sqrt(a) mean) / (a std^2 + (1 - a) / D)``.
    Inpainting on such data must carry the known region's value into the generated region."""

    def denoise(z_t: Tensor, t: Tensor) -> Tensor:
        a = schedule.alpha_bar(t, z_t)
        m = z_t.flatten(1).mean(1).reshape(a.shape)
        c = mean + a.sqrt() * std**2 * (m - a.sqrt() * mean) / (a * std**2 + (1 - a) / z_t[0].numel())
        return (z_t - a.sqrt() * c) / (1 - a).sqrt()

    return denoise


def gaussian_flow_solution(
    schedule: NoiseSchedule, z: Tensor, t_from: int, t_to: int, mean: float, std: float
) -> Tensor:
    """The exact probability-flow ODE solution for N(mean, std^2) data, from ``z`` at
    timestep ``t_from`` to timestep ``t_to`` (-1: clean).

    The marginal at t is N(sqrt(a_t) mean, a_t std^2 + 1 - a_t) and the flow is the monotone
    map between marginals, so ``(z_t - sqrt(a_t) mean) / sqrt(a_t std^2 + 1 - a_t)`` is
    constant along it.
    """

    def alpha(t: int) -> float:
        return 1.0 if t < 0 else float(schedule.alphas_cumprod[t])

    a, b = alpha(t_from), alpha(t_to)
    standardized = (z - a**0.5 * mean) / (a * std**2 + 1 - a) ** 0.5
    return b**0.5 * mean + (b * std**2 + 1 - b) ** 0.5 * standardized


class SamplerConformance:
    """Contract of :class:`ldmkit.interfaces.Sampler`.

    ``distribution_tolerance`` bounds the error in mean and std when sampling a 1-D
    Gaussian with ``distribution_steps`` steps (DDIM at 100 steps is 0.014 off in std,
    ancestral DDPM 0.032); loosen it for a coarse algorithm, with a reason.

    ``expected_order`` checks a deterministic sampler's convergence on the probability-flow
    ODE of Gaussian data, whose solution is exact (:func:`gaussian_flow_solution`): the slope
    of log error against log steps over ``order_steps`` (each twice the one before, so the
    error ratio between S and 2S steps is 2^slope) must be within ``order_tolerance`` of it.
    Declare it: that is what catches a wrong algorithm that still converges (a DPM-Solver++(2M)
    with the sign of its multistep correction flipped measures 0.95, error ratios 1.9 where
    the real one has 4.3 and 3.7, and is 6-27x less accurate at 10-40 steps). Whether or not it
    is declared, a sampler that declares its own ``convergence_order`` must converge at that
    order or better (a Heun that is really Euler measures 1.0 against its 2). With neither, a
    sampler that is deterministic (the same result under two generators) must still converge
    at order ``minimum_order`` or better (one that ignores ``steps`` measures 0), and a
    stochastic one is skipped. The sampler's ``spacing`` is
    set to ``order_spacing`` for this; ``quad`` is the default because it is the only one
    whose steps shrink evenly in log-sigma near t = 0 (``linspace``, ``paper`` and
    ``trailing`` keep one last step whose log-sigma length shrinks only like log(T / S),
    or end with a first-order step to sigma = 0, which caps any solver at first order
    there); a multistep method that assumes even steps in t, like PLMS, wants ``linspace``.

    Declare ``stochastic``: True for a sampler that draws fresh noise as it goes (DDPM, DDIM
    with eta > 0, an ancestral sampler), so two generators must give different samples (a
    DDIM that ignores its ``eta`` gives the same); False for a deterministic one. A sampler
    with a ``spacing`` must visit the timesteps of :func:`ldmkit.diffusion.timestep_pairs`
    for each timestep spacing it takes (its ``callback``'s ``t``).

    ``sample(steps=S)`` must run S steps (``steps_check`` gives two S), ``sample()``
    ``self.steps``. A sampler that sets ``supports_mask`` must keep the known region and
    generate the rest consistently with it (on data whose samples are one value repeated,
    :func:`shared_value_denoiser`, the generated region must take the known value within
    ``mask_tolerance`` in every sample: the first-party samplers' worst is 0.25 off at 8 or 25
    steps, a sampler that pastes ``known`` in only at the end has samples 1.1 off); one that
    does not support masks must refuse one with ``ValueError`` instead of ignoring it. The
    img2img checks (``init``/``strength``) run for a sampler that sets ``supports_init``.

    Declare ``ddim_eta`` for a sampler whose fresh noise per step is DDIM's
    ``sigma_t(eta) = eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev)`` (Song et al.
    2021, eq. 16): DDIM with its ``eta``, DDPM (1), k-diffusion's ancestral samplers with their
    ``eta``. From one start, shared by ``eta_batch`` samples, the spread of z after the first
    step must be that std within ``eta_tolerance`` (relative): a DDIM whose eta 0.5 draws eta
    1's noise, or eta^2's, fails (``stochastic`` only sees that it draws some).

    The seed tests use :func:`ldmkit.diffusion.sample_generators`: sample i of a batch
    drawn with ``sample_generators(s, n)`` equals the sample drawn alone with
    ``sample_generators(s + i, 1)`` (noise start and every later draw), masks included.
    """

    steps: int = 25
    distribution_steps: int = 100
    shape: tuple[int, ...] = (2, 3, 4, 4)
    point_mass_tolerance: float = 1e-3
    distribution_tolerance: float = 0.05
    expected_order: float | None = None
    order_steps: tuple[int, ...] = (10, 20, 40)
    order_spacing: str = "quad"
    order_tolerance: float = 0.35
    order_data: tuple[float, float] = (0.5, 0.5)  # mean, std of the Gaussian data
    minimum_order: float = 1.0
    steps_check: tuple[int, int] = (4, 8)
    mask_tolerance: float = 0.4
    seed_batch: int = 16
    seed_steps: int = 8
    seed_tolerance: float = 1e-4
    stochastic: bool | None = None
    ddim_eta: float | None = None
    eta_batch: int = 512
    eta_tolerance: float = 0.1

    def make_sampler(self) -> Sampler:
        raise NotImplementedError("implement make_sampler() in your test class")

    def make_schedule(self) -> NoiseSchedule:
        return NoiseSchedule()

    def _noise(self, seed: int = 0, shape: tuple[int, ...] | None = None) -> Tensor:
        return torch.randn(shape or self.shape, generator=torch.Generator().manual_seed(seed))

    def test_is_a_sampler(self):
        s = self.make_sampler()
        assert isinstance(s, Sampler)
        _check_declared(s)

    def test_point_mass_is_recovered(self):
        schedule = self.make_schedule()
        target = torch.linspace(-1, 1, 48).reshape(1, 3, 4, 4)
        out = self.make_sampler().sample(
            point_mass_denoiser(schedule, target), schedule, self._noise(), steps=self.steps,
            generator=torch.Generator().manual_seed(1),
        )
        assert out.shape == self.shape
        torch.testing.assert_close(out, target.expand(self.shape), atol=self.point_mass_tolerance, rtol=0)

    def test_gaussian_data_distribution(self):
        schedule = self.make_schedule()
        mean, std = 0.5, 0.3
        noise = self._noise(shape=(4096, 1, 1, 1))
        out = self.make_sampler().sample(
            gaussian_denoiser(schedule, mean, std), schedule, noise, steps=self.distribution_steps,
            generator=torch.Generator().manual_seed(1),
        )
        assert abs(out.mean().item() - mean) < self.distribution_tolerance
        assert abs(out.std().item() - std) < self.distribution_tolerance

    def test_result_depends_on_the_noise(self):
        """``noise`` is z_T: another one under the same generator gives another result (a
        sampler that draws its own start from the generator fails here)."""
        schedule = self.make_schedule()
        a, b = (
            self.make_sampler().sample(
                gaussian_denoiser(schedule, 0.0, 0.5), schedule, self._noise(seed), steps=self.steps,
                generator=torch.Generator().manual_seed(7),
            )
            for seed in (0, 1)
        )  # fmt: skip
        assert _differ(a, b), "two different noises give the same samples: `noise` is ignored"

    def test_reproducible_with_generator(self):
        schedule = self.make_schedule()
        denoise = gaussian_denoiser(schedule, 0.0, 0.5)
        runs = [
            self.make_sampler().sample(
                denoise, schedule, self._noise(), steps=self.steps,
                generator=torch.Generator().manual_seed(7),
            )
            for _ in range(2)
        ]
        torch.testing.assert_close(runs[0], runs[1], atol=0, rtol=0)

    def test_callback_sees_every_step(self):
        schedule = self.make_schedule()
        seen: list[dict] = []
        self.make_sampler().sample(
            gaussian_denoiser(schedule, 0.0, 0.5), schedule, self._noise(), steps=self.steps,
            callback=seen.append,
        )
        assert len(seen) == self.steps
        assert [info["i"] for info in seen] == list(range(self.steps))
        assert all(info["z"].shape == self.shape for info in seen)

    def test_mask_keeps_known_region(self):
        s = self.make_sampler()
        schedule = self.make_schedule()
        known = torch.full(self.shape, 0.25)
        mask = torch.zeros(self.shape[0], 1, *self.shape[2:])
        mask[..., :2] = 1  # generate the left half, keep the right half
        if not s.supports_mask:
            pytest.skip("sampler does not support inpainting masks")
        out = s.sample(
            gaussian_denoiser(schedule, 0.0, 0.5), schedule, self._noise(), steps=self.steps,
            generator=torch.Generator().manual_seed(1), mask=mask, known=known,
        )
        torch.testing.assert_close(out[..., 2:], known[..., 2:], atol=1e-5, rtol=0)
        assert not torch.allclose(out[..., :2], known[..., :2])

    def test_mask_generated_region_follows_the_known_region(self):
        """Each sample is one value repeated (prior N(-0.5, 0.5^2)), so the generated region
        must take the value of the known region, 0.5, two prior deviations away. A sampler that
        ignores the mask while sampling and pastes ``known`` in at the end keeps the known
        region but generates a value of its own."""
        s = self.make_sampler()
        if not s.supports_mask:
            pytest.skip("sampler does not support inpainting masks")
        schedule = self.make_schedule()
        shape = (8, *self.shape[1:])  # one lucky free sample must not pass for a mutant
        known = torch.full(shape, 0.5)
        mask = torch.zeros(shape[0], 1, *shape[2:])
        mask[..., : shape[-1] // 2] = 1
        out = s.sample(
            shared_value_denoiser(schedule, -0.5, 0.5), schedule, self._noise(shape=shape),
            steps=self.steps, generator=torch.Generator().manual_seed(1), mask=mask, known=known,
        )
        generated = out[..., : shape[-1] // 2].flatten(1).mean(1)
        assert (generated - 0.5).abs().max() <= self.mask_tolerance, (
            f"the generated region's means {[round(v, 3) for v in generated.tolist()]} ignore the "
            f"known region's value 0.5 (tolerance {self.mask_tolerance}): the mask is not used "
            "while sampling"
        )

    def test_unsupported_mask_is_refused(self):
        s = self.make_sampler()
        if s.supports_mask:
            pytest.skip("the sampler supports masks: the test_mask_* checks apply")
        schedule = self.make_schedule()
        mask = torch.ones(self.shape[0], 1, *self.shape[2:])
        with pytest.raises((ValueError, NotImplementedError)):
            s.sample(
                gaussian_denoiser(schedule, 0.0, 0.5), schedule, self._noise(), steps=self.steps,
                mask=mask, known=torch.zeros(self.shape),
            )

    # -- steps -------------------------------------------------------------------------
    def test_steps_argument_sets_the_number_of_steps(self):
        """``sample(steps=S)`` runs S steps, whatever the constructor was given, and more steps
        give a different result."""
        sampler, schedule = self.make_sampler(), self.make_schedule()
        outputs = []
        for steps in self.steps_check:
            seen: list[dict] = []
            outputs.append(sampler.sample(
                gaussian_denoiser(schedule, 0.5, 0.5), schedule, self._noise(), steps=steps,
                generator=torch.Generator().manual_seed(1), callback=seen.append,
            ))  # fmt: skip
            assert len(seen) == steps, (
                f"sample(steps={steps}) ran {len(seen)} steps (the sampler was made with "
                f"steps={sampler.steps}): the steps argument is ignored"
            )
        assert _differ(*outputs), f"steps={self.steps_check[0]} and {self.steps_check[1]} give the same result"

    def test_default_steps_are_the_samplers_own(self):
        """``sample()`` without ``steps`` is ``sample(steps=self.steps)``: ``self.steps`` is the
        constructor's ``steps``, which the ``steps`` key of the sampler's config sets."""
        sampler, schedule = self.make_sampler(), self.make_schedule()
        runs = []
        for extra in ({}, {"steps": sampler.steps}):
            seen: list[dict] = []
            out = sampler.sample(
                gaussian_denoiser(schedule, 0.5, 0.5), schedule, self._noise(),
                generator=torch.Generator().manual_seed(1), callback=seen.append, **extra,
            )
            runs.append((out, len(seen)))
        assert runs[0][1] == runs[1][1], (
            f"sample() ran {runs[0][1]} steps, sample(steps=self.steps) {runs[1][1]} (self.steps = {sampler.steps})"
        )
        torch.testing.assert_close(runs[0][0], runs[1][0], atol=0, rtol=0)

    # -- per-sample seeds --------------------------------------------------------------
    def _seeded(self, seed: int, n: int, *, masked: bool = False) -> Tensor:
        """Samples ``seed .. seed + n - 1``, drawn as one batch with one generator each."""
        from ldmkit.diffusion import randn_like, sample_generators

        sampler, schedule = self.make_sampler(), self.make_schedule()
        generators = sample_generators(seed, n)
        noise = randn_like(torch.empty(n, *self.shape[1:]), generators)
        extra: dict[str, Tensor] = {}
        if masked:
            # sample i's mask and known latent depend on i alone, like its seed
            index = torch.arange(seed, seed + n, dtype=torch.float32).reshape(-1, 1, 1, 1)
            columns = torch.arange(self.shape[-1], dtype=torch.float32)
            generated = (columns < index % self.shape[-1] + 1).float()
            extra["mask"] = generated.expand(n, 1, *self.shape[2:])
            extra["known"] = (torch.sin(index + columns) * 0.5).expand(n, *self.shape[1:])
        return sampler.sample(
            gaussian_denoiser(schedule, 0.2, 0.6), schedule, noise, steps=self.seed_steps,
            generator=generators, **extra,
        )

    def _check_per_sample_seeds(self, masked: bool) -> None:
        seed, n = 1234, self.seed_batch
        batch = self._seeded(seed, n, masked=masked)
        for i in range(n):
            alone = self._seeded(seed + i, 1, masked=masked)
            torch.testing.assert_close(
                batch[i : i + 1], alone, atol=self.seed_tolerance, rtol=0,
                msg=lambda m, i=i: f"sample {i} of the batch != seed {seed} + {i} drawn alone: {m}",
            )

    def test_sample_i_is_seed_plus_i_alone(self):
        self._check_per_sample_seeds(masked=False)

    def test_sample_i_is_seed_plus_i_alone_with_a_mask(self):
        if not self.make_sampler().supports_mask:
            pytest.skip("sampler does not support inpainting masks")
        self._check_per_sample_seeds(masked=True)

    def test_offset_seed_reproduces_later_samples(self):
        """``seed=s+2, n=2`` are samples 2-3 of ``seed=s, n=4``."""
        torch.testing.assert_close(
            self._seeded(40, 4)[2:], self._seeded(42, 2), atol=self.seed_tolerance, rtol=0
        )

    # -- img2img -----------------------------------------------------------------------
    def _img2img(
        self, strength: float, denoise=None, init: Tensor | None = None, callback=None
    ) -> Tensor:
        sampler = self.make_sampler()
        if not sampler.supports_init:
            pytest.skip("the sampler does not declare img2img (supports_init)")
        schedule = self.make_schedule()
        init = torch.full(self.shape, 0.3) if init is None else init
        return sampler.sample(
            denoise or gaussian_denoiser(schedule, 0.0, 1.0), schedule, self._noise(),
            steps=self.steps, generator=torch.Generator().manual_seed(3), init=init,
            strength=strength, callback=callback,
        )

    def test_img2img_strength_zero_returns_init(self):
        init = self._noise(seed=9)
        torch.testing.assert_close(self._img2img(0.0, init=init), init, atol=0, rtol=0)

    def test_img2img_runs_the_last_share_of_the_steps(self):
        full: list[dict] = []
        partial: list[dict] = []
        self._img2img(1.0, callback=full.append)
        self._img2img(0.4, callback=partial.append)
        keep = int(len(full) * 0.4)
        assert len(partial) == keep, f"strength 0.4 of {len(full)} steps ran {len(partial)}"
        assert [c["t"] for c in partial] == [c["t"] for c in full[len(full) - keep :]]

    def test_img2img_strength_one_is_a_full_chain(self):
        """From any init, a full-strength chain on a point mass ends at the point mass."""
        schedule = self.make_schedule()
        target = torch.linspace(-1, 1, 48).reshape(1, 3, 4, 4).expand(self.shape)
        out = self._img2img(1.0, denoise=point_mass_denoiser(schedule, target), init=-target)
        torch.testing.assert_close(out, target, atol=self.point_mass_tolerance, rtol=0)

    def test_img2img_moves_away_from_init_as_strength_grows(self):
        init = self._noise(seed=11)
        distance = [
            (self._img2img(s, init=init) - init).abs().mean().item() for s in (0.1, 0.5, 1.0)
        ]
        assert distance[0] < distance[1] < distance[2], distance

    # -- convergence order -------------------------------------------------------------
    def convergence_order(self, sampler: Sampler) -> tuple[float, list[float]]:
        """(slope, errors): the fitted order of ``sampler`` on the Gaussian PF-ODE and the max
        error to the exact solution at each of ``order_steps``."""
        from ldmkit.diffusion import timestep_pairs

        if not hasattr(sampler, "spacing"):
            pytest.fail(
                f"{type(sampler).__name__} has no `spacing`: the order test needs a "
                "DiscreteSampler or SigmaSampler, or set expected_order = None"
            )
        sampler.spacing = self.order_spacing
        schedule = self.make_schedule()
        mean, std = self.order_data
        z = torch.linspace(-3, 3, 64, dtype=torch.float64).reshape(-1, 1, 1, 1)
        errors = []
        for steps in self.order_steps:
            out = sampler.sample(gaussian_denoiser(schedule, mean, std), schedule, z, steps=steps)
            pairs = timestep_pairs(schedule.timesteps, steps, self.order_spacing)
            exact = gaussian_flow_solution(schedule, z, pairs[0][0], pairs[-1][1], mean, std)
            errors.append(float((out - exact).abs().max()))
        log_steps = torch.tensor(self.order_steps, dtype=torch.float64).log()
        log_errors = torch.tensor(errors, dtype=torch.float64).log()
        centered = log_steps - log_steps.mean()
        covariance = (centered * (log_errors - log_errors.mean())).sum()
        slope = -float(covariance / centered.square().sum())
        return slope, errors

    def _order_report(self, sampler: Sampler, order: float, errors: list[float]) -> str:
        listed = ", ".join(f"{e:.2e}" for e in errors)
        ratios = ", ".join(f"{a / b:.2f}" for a, b in zip(errors, errors[1:], strict=False))
        return (
            f"{type(sampler).__name__} converges at order {order:.2f} (max errors {listed} at steps "
            f"{list(self.order_steps)}, error ratios {ratios}, spacing {self.order_spacing!r})"
        )

    def check_convergence_order(
        self, sampler: Sampler, expected: float, measured: tuple[float, list[float]] | None = None
    ) -> float:
        """Assert that ``sampler`` converges at order ``expected`` (within ``order_tolerance``):
        halving the step size divides the error by about 2^expected. ``measured``: its
        :meth:`convergence_order`, if already measured."""
        order, errors = measured or self.convergence_order(sampler)
        assert abs(order - expected) <= self.order_tolerance, (
            f"{self._order_report(sampler, order, errors)}; expected {expected} +- "
            f"{self.order_tolerance} (error ratios about {2**expected:g})"
        )
        return order

    def is_deterministic(self, sampler: Sampler) -> bool:
        """Whether two different generators give the same samples."""
        schedule = self.make_schedule()
        runs = [
            sampler.sample(
                gaussian_denoiser(schedule, 0.5, 0.5), schedule, self._noise(), steps=self.seed_steps,
                generator=torch.Generator().manual_seed(seed),
            )
            for seed in (1, 2)
        ]
        return torch.equal(runs[0], runs[1])

    def test_stochastic_as_declared(self):
        """With ``stochastic`` declared, two generators give different samples (True: a DDIM
        that ignores its ``eta`` fails) or the same ones (False)."""
        if self.stochastic is None:
            pytest.skip("stochastic is not declared")
        sampler = self.make_sampler()
        deterministic = self.is_deterministic(sampler)
        assert deterministic != self.stochastic, (
            f"{sampler!r} gives {'the same' if deterministic else 'different'} samples under two "
            f"generators, but the test class declares stochastic = {self.stochastic}"
        )

    def _first_step_alpha_bars(self, sampler: Sampler, schedule: NoiseSchedule, steps: int) -> tuple[float, float]:
        """``(a_t, a_prev)`` of the first step: from a sigma sampler's noise levels, else from
        its timesteps (-1: clean)."""
        if hasattr(sampler, "sigmas"):
            sigma, sigma_next = sampler.sigmas(schedule, steps)[:2]
            return 1 / (1 + sigma**2), 1 / (1 + sigma_next**2)
        t, t_prev = sampler.timesteps(schedule, steps)[0]
        return tuple(1.0 if u < 0 else float(schedule.alphas_cumprod[u]) for u in (t, t_prev))

    def test_fresh_noise_has_ddims_variance(self):
        """With ``ddim_eta`` declared, one step from a start all samples share spreads them by
        DDIM's ``sigma_t(eta)`` (eq. 16), measured over ``eta_batch`` samples."""
        if self.ddim_eta is None:
            pytest.skip("ddim_eta is not declared")
        sampler, schedule = self.make_sampler(), self.make_schedule()
        if not hasattr(sampler, "timesteps"):
            pytest.skip("the sampler has no `timesteps`: its first step's level is unknown")
        steps = 4
        a, a_prev = self._first_step_alpha_bars(sampler, schedule, steps)
        expected = self.ddim_eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)) ** 0.5
        noise = self._noise(shape=(1, *self.shape[1:])).expand(self.eta_batch, *self.shape[1:])
        seen: list[dict] = []
        sampler.sample(
            gaussian_denoiser(schedule, 0.5, 0.5), schedule, noise.contiguous(), steps=steps,
            generator=torch.Generator().manual_seed(1), callback=seen.append,
        )  # fmt: skip
        spread = float(seen[0]["z"].double().var(0).mean().sqrt())
        assert abs(spread - expected) <= self.eta_tolerance * max(expected, 0.05), (
            f"{sampler!r}: the first step ({steps} steps, alpha_bar {a:.4f} -> {a_prev:.4f}) spreads "
            f"one start by std {spread:.4f}, but DDIM's sigma_t at eta = {self.ddim_eta} (eq. 16) "
            f"is {expected:.4f}: the fresh noise does not follow the declared eta"
        )

    # -- timesteps ---------------------------------------------------------------------
    def test_timesteps_follow_the_spacing(self):
        """Step i visits the i-th timestep of ``timestep_pairs(T, steps, spacing)`` (its
        ``callback`` says ``t``) for each timestep spacing the sampler takes (fractional
        within 0.5 for the sigma samplers' ``linspace``). A sampler without ``spacing`` is
        skipped."""
        from ldmkit.diffusion import SPACINGS, timestep_pairs

        sampler, schedule = self.make_sampler(), self.make_schedule()
        if not hasattr(sampler, "spacing"):
            pytest.skip("the sampler has no `spacing`")
        steps = 10
        for spacing in [name for name in getattr(sampler, "spacings", SPACINGS) if name in SPACINGS]:
            sampler.spacing = spacing
            seen: list[dict] = []
            sampler.sample(
                gaussian_denoiser(schedule, 0.5, 0.5), schedule, self._noise(), steps=steps,
                generator=torch.Generator().manual_seed(1), callback=seen.append,
            )  # fmt: skip
            visited = [float(info["t"]) for info in seen]
            planned = [t for t, _ in timestep_pairs(schedule.timesteps, steps, spacing)]
            assert len(visited) == len(planned) and all(
                abs(a - b) <= 0.5 for a, b in zip(visited, planned, strict=True)
            ), f"with spacing {spacing!r} the steps visit t = {[round(t, 1) for t in visited]}, not {planned}"

    def test_convergence_order(self):
        """The measured order is ``expected_order`` where the test class declares one, and at
        least the order the sampler declares itself (``convergence_order``), or
        ``minimum_order`` where neither declares any."""
        sampler = self.make_sampler()
        declared = getattr(sampler, "convergence_order", None)  # plugins may lack the attribute
        if self.expected_order is None:
            if not hasattr(sampler, "spacing"):
                pytest.skip("no expected_order, and no `spacing` to run the order check on")
            if not self.is_deterministic(sampler):
                pytest.skip("stochastic sampler: no probability-flow ODE to converge to")
        order, errors = self.convergence_order(sampler)
        if self.expected_order is not None:
            self.check_convergence_order(sampler, self.expected_order, (order, errors))
        report = self._order_report(sampler, order, errors)
        if declared is not None:
            assert order >= declared - self.order_tolerance, (
                f"{report}; the sampler declares convergence_order = {declared} (+- {self.order_tolerance})"
            )
        elif self.expected_order is None:
            assert order >= self.minimum_order - self.order_tolerance, (
                f"{report}; a deterministic sampler must converge at order >= {self.minimum_order} +- "
                f"{self.order_tolerance} (declare expected_order to check the order it should have)"
            )
