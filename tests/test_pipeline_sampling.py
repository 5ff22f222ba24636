"""Pipeline.sample: per-sample seeds, batch-size chunking, img2img, inpainting with any model,
sizes other than the trained one. Tiny untrained pipelines (KL f=4 first stage, tiny UNet)."""

from __future__ import annotations

import pytest
import torch

import ldmkit
from ldmkit.masks import MaskError, latent_mask
from ldmkit.pipeline import SampleArgumentError


def first_party_samplers() -> list[str]:
    from ldmkit.plugins import get_registry

    registry = get_registry()
    names = registry.names("sampler")
    return sorted(n for n in names if "(ldmkit-samplers " in registry.get("sampler", n).provider)


ALL_SAMPLERS = first_party_samplers()  # ddim, ddpm (ancestral), plms, dpmpp_2m, euler, ...
SAMPLERS = ["ddim", "ddpm"]  # deterministic and ancestral, for everything else


def make_pipe(sampler: str = "ddim", *extra: str, steps: int = 4):
    return ldmkit.compose(
        overrides=[
            "conditioner=class_label",
            "first_stage=kl_tiny",
            "first_stage.encode_mode=mode",
            "image_size=16",
            f"sampler={sampler}",
            f"sampler.steps={steps}",
            *extra,
        ]
    ).eval()


@pytest.fixture(scope="module", params=SAMPLERS)
def pipe(request):
    torch.manual_seed(0)
    return make_pipe(request.param)


def images_in(n: int = 1, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# -- seeds and batches ---------------------------------------------------------------------
@pytest.mark.parametrize("sampler", ALL_SAMPLERS)
def test_seeds_are_per_sample_for_every_sampler(sampler):
    """Sample i is drawn from seed + i alone: offset seeds reproduce samples 2-3, and one batch
    of 16, 16 batches of 1 and chunks of 5 agree (up to batched round-off)."""
    torch.manual_seed(0)
    pipe = make_pipe(sampler, steps=2)
    labels = torch.arange(16) % 10
    whole = pipe.sample({"label": labels}, seed=3, guidance_scale=2.0)
    offset = pipe.sample({"label": labels[2:4]}, seed=5, guidance_scale=2.0)
    alone = torch.cat(
        [
            pipe.sample({"label": labels[i : i + 1]}, seed=3 + i, guidance_scale=2.0)
            for i in range(16)
        ]
    )
    chunked = pipe.sample({"label": labels}, seed=3, guidance_scale=2.0, batch_size=5)
    assert (offset - whole[2:4]).abs().max() <= 1e-4
    assert (alone - whole).abs().max() <= 1e-4
    assert (chunked - whole).abs().max() <= 1e-4
    assert (whole[0] - whole[1]).abs().max() > 1e-2  # the samples differ


def test_every_first_party_sampler_is_covered():
    assert {"ddim", "ddpm"} <= set(ALL_SAMPLERS)


def test_chunks_share_one_unconditional_embedding(pipe, monkeypatch):
    calls = []
    original = pipe.conditioner.unconditional
    monkeypatch.setattr(pipe.conditioner, "unconditional", lambda b: calls.append(1) or original(b))
    chunks = set()
    pipe.sample(
        {"label": [1, 2, 3]},
        seed=0,
        guidance_scale=2.0,
        batch_size=1,
        callback=lambda info: chunks.add((info["chunk"], info["num_chunks"])),
    )
    assert len(calls) == 1 and chunks == {(0, 3), (1, 3), (2, 3)}


def test_a_single_generator_draws_the_whole_starting_noise():
    pipe = make_pipe("ddim")
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(9))
    a = pipe.sample({"label": [1, 2]}, generator=torch.Generator().manual_seed(9))
    b = pipe.sample({"label": [1, 2]}, noise=noise)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    with pytest.raises(SampleArgumentError, match="seed= or generator="):
        pipe.sample({"label": [1]}, seed=0, generator=torch.Generator())


# -- img2img -------------------------------------------------------------------------------
def test_img2img_with_strength_near_zero_returns_the_reconstruction():
    pipe = make_pipe("ddim", "scale_factor=0.5", steps=50)
    x = images_in(2)
    with torch.no_grad():
        z = pipe.first_stage.encode(x) * 0.5
        reconstruction = pipe.first_stage.decode(z / 0.5).clamp(-1, 1)
    steps = []
    out = pipe.sample({"label": [1, 2]}, init_image=x, strength=1e-3, seed=0, callback=steps.append)
    assert not steps  # int(50 * 1e-3) = 0 steps
    torch.testing.assert_close(out, reconstruction, atol=1e-5, rtol=0)
    latents = pipe.sample(
        {"label": [1, 2]}, init_image=x, strength=1e-3, seed=0, return_latents=True
    )
    torch.testing.assert_close(latents, z, atol=1e-5, rtol=0)


def test_img2img_runs_the_strength_share_of_the_steps(pipe):
    x = images_in(1)
    steps = []
    out = pipe.sample(
        {"label": [1, 2]}, init_image=x, strength=0.5, seed=0, steps=8, callback=steps.append
    )
    assert len(steps) == 4 and steps[0]["t"] < 999 and out.shape == (2, 3, 16, 16)
    # one image serves every sample; sample i still has its own seed
    again = pipe.sample({"label": [2]}, init_image=x, strength=0.5, seed=1, steps=8)
    torch.testing.assert_close(again, out[1:], atol=1e-4, rtol=0)


def test_img2img_with_a_sampling_encoder_is_seeded_per_sample():
    """A KL first stage that samples its posterior draws from the sample's generator."""
    torch.manual_seed(0)
    pipe = make_pipe("ddim", "first_stage.encode_mode=sample")
    x = images_in(1)
    a = pipe.sample({"label": [1, 2, 3]}, init_image=x, strength=0.5, seed=4, batch_size=2)
    torch.manual_seed(123)  # the global RNG plays no part
    b = pipe.sample({"label": [2, 3]}, init_image=x, strength=0.5, seed=5)
    torch.testing.assert_close(b, a[1:], atol=1e-4, rtol=0)


# -- inpainting ----------------------------------------------------------------------------
def box_mask(size: int = 16) -> torch.Tensor:
    mask = torch.zeros(1, 1, size, size)
    mask[..., 4:12, 4:10] = 1  # 1 = repaint
    return mask


@pytest.mark.parametrize("strength", [None, 0.5])
def test_inpainting_any_model_keeps_the_known_latents(pipe, strength):
    x = images_in(1)
    mask = box_mask()
    z = pipe.sample(
        {"label": [1, 2]}, init_image=x, mask=mask, strength=strength, seed=0, return_latents=True
    )
    with torch.no_grad():
        known = pipe.encode(x)
    keep = latent_mask(mask, 4).expand_as(z) == 0
    assert keep.any() and (~keep).any()
    torch.testing.assert_close(z[keep], known.expand_as(z)[keep], atol=0, rtol=0)
    assert (z[~keep] - known.expand_as(z)[~keep]).abs().max() > 1e-2


def test_the_latent_mask_rule_is_one_function():
    from ldmkit_conditioners.inpaint import InpaintConditioner

    mask = torch.zeros(1, 1, 8, 8)
    mask[0, 0, 5, 2] = 1  # one pixel repaints its whole 4x4 cell
    expected = torch.tensor([[0.0, 0.0], [1.0, 0.0]])[None, None]
    assert torch.equal(latent_mask(mask, 4), expected)
    pipe = ldmkit.compose(overrides=["conditioner=inpaint", "first_stage=kl_tiny"])
    assert isinstance(pipe.conditioner, InpaintConditioner)
    assert torch.equal(pipe.conditioner.latent_mask(mask), expected)


# -- sizes ---------------------------------------------------------------------------------
def test_non_square_and_larger_than_trained_sizes(pipe):
    out = pipe.sample({"label": [1]}, size=(16, 32), seed=0)
    assert out.shape == (1, 3, 16, 32)
    z = pipe.sample({"label": [1]}, size=24, seed=0, return_latents=True)
    assert z.shape == (1, 3, 6, 6)
    assert pipe.sample({"label": [1]}, image_size=(8, 16), seed=0).shape == (1, 3, 8, 16)
    # latents of odd sides (20 / 4 = 5): the UNet's levels do not halve them evenly
    assert pipe.sample({"label": [1]}, size=(20, 28), seed=0).shape == (1, 3, 20, 28)


def test_size_not_divisible_by_f_is_an_error(pipe):
    with pytest.raises(SampleArgumentError, match=r"size 18x16 is not divisible .* factor f=4"):
        pipe.sample({"label": [1]}, size=(18, 16), seed=0)
    with pytest.raises(SampleArgumentError, match="size=16 and image_size=32 disagree"):
        pipe.sample({"label": [1]}, size=16, image_size=32)


# -- bad inputs ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"strength": 0.0}, SampleArgumentError, r"strength must be in \(0, 1\], got 0.0"),
        ({"strength": 1.5}, SampleArgumentError, r"strength must be in \(0, 1\], got 1.5"),
        (
            {"mask": torch.ones(1, 1, 8, 8)},
            MaskError,
            r"mask has shape \(1, 1, 8, 8\), but init_image",
        ),
        ({"mask": torch.full((16, 16), 2.0)}, MaskError, r"mask values must be in \[0, 1\]"),
        # NaN passed the range checks (min/max compare false) and gave NaN images
        ({"mask": torch.full((16, 16), float("nan"))}, MaskError, r"mask values must be in \[0, 1\]"),
        (
            {"init_image": torch.full((1, 3, 16, 16), float("nan"))},
            SampleArgumentError,
            r"init_image values must be in \[-1, 1\], got \[nan, nan\]",
        ),
        ({"size": 32}, SampleArgumentError, "size 32x32 differs from init_image's 16x16"),
    ],
)
def test_bad_img2img_and_inpainting_inputs_name_the_argument(kwargs, error, message):
    pipe = make_pipe("ddim", steps=2)
    with pytest.raises(error, match=message):
        pipe.sample({"label": [1]}, **{"init_image": images_in(1), **kwargs})


def test_inputs_that_need_an_init_image_or_fit_the_first_stage():
    pipe = make_pipe("ddim", steps=2)
    with pytest.raises(SampleArgumentError, match="strength needs init_image"):
        pipe.sample({"label": [1]}, strength=0.5)
    with pytest.raises(SampleArgumentError, match="mask is a pixel mask over init_image"):
        pipe.sample({"label": [1]}, mask=torch.ones(16, 16))
    with pytest.raises(SampleArgumentError, match=r"init_image must be float images B×3×H×W"):
        pipe.sample({"label": [1]}, init_image=torch.zeros(1, 1, 16, 16))
    with pytest.raises(SampleArgumentError, match=r"init_image values must be in \[-1, 1\]"):
        pipe.sample({"label": [1]}, init_image=torch.full((1, 3, 16, 16), 2.0))
    with pytest.raises(
        SampleArgumentError, match="init_image is 18x16, which is not divisible .* f=4"
    ):
        pipe.sample({"label": [1]}, init_image=torch.zeros(1, 3, 18, 16))
    with pytest.raises(SampleArgumentError, match="init_image holds 2 images for 3 samples"):
        pipe.sample({"label": [1, 2, 3]}, init_image=images_in(2))
