"""One sampling request (issue 27, item 1): ``SampleRequest`` checks the arguments of
``Pipeline.sample`` in one place for the Python API, ``ldmkit sample`` and ``ldmkit demo``;
``Pipeline.with_sampler`` changes the sampler and its config together; a pipeline built from
objects saves and loads, because every component records its own config."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import ldmkit
from ldmkit.diffusion import DiscreteSampler, NoiseSchedule
from ldmkit.errors import ConfigError
from ldmkit.pipeline import Pipeline
from ldmkit.sampling_request import SampleArgumentError, SampleRequest, message
from tests.conftest import ldmkit_cli

TINY = ["conditioner=class_label", "conditioner.num_classes=3", "conditioner.embed_dim=16",
        "first_stage=kl_tiny", "first_stage.encode_mode=mode", "image_size=16", "sampler=ddim",
        "sampler.steps=2"]  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A saved tiny class-conditional pipeline (f=4, 16x16) and a 16x16 photo beside it."""
    root = tmp_path_factory.mktemp("request")
    torch.manual_seed(0)
    ldmkit.compose(TINY).save(root / "pipeline")
    Image.new("RGB", (16, 16), (200, 30, 30)).save(root / "photo.png")
    return root


# -- one text per bad argument ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_args", "cli_args", "page_values", "text"),
    [
        (
            {"guidance_scale": -2},
            ["--guidance-scale", "-2"],
            {"guidance_scale": -2},
            "guidance_scale must be a number >= 0 (1: no guidance, 0: unconditional), got -2.0",
        ),
        (
            {"seed": 4294967296},
            ["--seed", "4294967296"],
            {"seed": 4294967296},
            "seed must be a whole number from 0 to 4294967295, got 4294967296",
        ),
        (
            {"init_image": torch.zeros(1, 3, 16, 16), "strength": 1.5},
            ["--init-image", "{photo}", "--strength", "1.5"],
            {"init_image": "{photo}", "strength": 1.5},
            "strength must be in (0, 1], got 1.5: the share of the steps run from init_image, noised "
            "(1 = all of them)",
        ),
        (
            {"size": (18, 16)},
            ["--height", "18", "--width", "16"],
            {"height": 18, "width": 16},
            "size 18x16 is not divisible by the first stage's downsample factor f=4: height and width must be "
            "positive multiples of 4",
        ),
    ],
)
def test_the_cli_and_the_demo_refuse_a_bad_argument_with_one_text(
    checkpoint, tmp_path, request_args, cli_args, page_values, text
):
    """The text is the request's, checked once: the CLI and the page only write the names of the
    arguments their way (``--strength``, ``the start image``)."""
    from ldmkit.cli.sample import SAMPLE_FLAGS
    from ldmkit.demo.form import PAGE_NAMES, DemoInputError, PageRequest, prepare

    pipeline = Pipeline.load(checkpoint / "pipeline")
    with pytest.raises(SampleArgumentError) as err:
        SampleRequest({"label": [1]}, **request_args).validate(pipeline)
    assert str(err.value) == text

    photo = str(checkpoint / "photo.png")
    out = ldmkit_cli("sample", "--checkpoint", str(checkpoint / "pipeline"), "--labels", "1",
                     *[a.format(photo=photo) for a in cli_args], "--out", str(tmp_path / "s.png"),
                     "--no-progress")  # fmt: skip
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    (line,) = out.stderr.strip().splitlines()
    cli = line.removeprefix("ldmkit sample: error: ")
    assert cli == err.value.named(SAMPLE_FLAGS) == message(err.value, SAMPLE_FLAGS)

    values = {"sampler": "ddim", "steps": 2, "guidance_scale": 1.0, "seed": 0, "num_images": 1,
              "conditions": {"label": 1}}  # fmt: skip
    values.update({k: v.format(photo=photo) if isinstance(v, str) else v for k, v in page_values.items()})
    with pytest.raises(DemoInputError) as page:
        prepare(pipeline, PageRequest(**values), inputs_dir=tmp_path / "inputs")
    assert str(page.value) == err.value.named(PAGE_NAMES)
    argument = err.value.argument  # the culprit, first, as each front end names it
    assert cli.startswith(f"{SAMPLE_FLAGS.get(argument, argument)} ")
    assert str(page.value).startswith(f"{PAGE_NAMES.get(argument, argument)} ")


def test_every_sample_seed_stays_in_range_so_each_can_be_redrawn_alone(checkpoint, tmp_path):
    """Sample i uses seed + i. Before: ``--seed 4294967295 --labels 0,1,2`` drew samples from
    seeds 4294967296 and 4294967297, which ``--seed`` then refused to take to redraw them."""
    pipeline = Pipeline.load(checkpoint / "pipeline")
    SampleRequest({"label": [0, 1, 2]}, seed=4294967293).validate(pipeline)  # the last one fits
    with pytest.raises(SampleArgumentError) as err:
        SampleRequest({"label": [0, 1, 2]}, seed=4294967294).validate(pipeline)
    assert str(err.value) == (
        "seed=4294967294 for 3 samples: sample i uses seed + i, which must stay at most "
        "4294967295; use a seed of at most 4294967293"
    )
    out = ldmkit_cli("sample", "--checkpoint", str(checkpoint / "pipeline"), "--labels", "0,1,2",
                     "--seed", "4294967295", "--out", str(tmp_path / "s.png"), "--no-progress")  # fmt: skip
    assert out.returncode == 1 and out.stderr.strip() == (
        "ldmkit sample: error: --seed=4294967295 for 3 samples: sample i uses seed + i, which must "
        "stay at most 4294967295; use a seed of at most 4294967293"
    ), out.stderr


def test_values_are_checked_and_normalized_when_the_request_is_made():
    request = SampleRequest({"label": [1]}, seed=3.0, num_samples=1.0, size=16, guidance_scale=2, tile=8)
    assert (request.seed, request.num_samples, request.size, request.guidance_scale) == (3, 1, (16, 16), 2.0)
    assert (request.tile, request.tile_overlap) == (8, 2)  # the default overlap, a quarter
    assert SampleRequest(image_size=(32, 16)).size == (32, 16)  # the alias
    refused = [
        ({"seed": 1, "generator": torch.Generator()}, "give seed= or generator=, not both"),
        ({"tile_overlap": 2}, "tile_overlap needs tile"),
        ({"strength": 0.5}, "strength needs init_image"),
        ({"size": (16, "a")}, "size must be a whole number >= 1 or (height, width) of them, got (16, 'a')"),
        ({"batch_size": 0}, "batch_size must be a whole number >= 1, got 0"),
        ({"seed": 1e308}, "seed must be a whole number from 0 to 4294967295, got 1e+308"),  # not 309 digits
        ({"num_samples": -4.0}, "num_samples must be a whole number >= 1, got -4"),
        ({"precision": "fp8"}, "precision='fp8' is not a precision"),
        ({"compile": "fast"}, "compile='fast': expected true, false, auto, aot or one of"),
        # was dict()'s "cannot convert dictionary update sequence element #0 to a sequence"
        ({"batch": [1, 2]}, "batch maps each condition key to its values, e.g. {'label': [1, 2]}"),
    ]
    for kwargs, text in refused:
        with pytest.raises(SampleArgumentError) as err:
            SampleRequest(**kwargs)
        assert str(err.value).startswith(text), (kwargs, str(err.value))
        assert err.value.argument == next(iter(kwargs))


def test_sample_runs_a_request_or_builds_one_from_keywords():
    pipe = ldmkit.compose(TINY).eval()
    request = SampleRequest({"label": [0, 2]}, seed=5, guidance_scale=2.0)
    torch.testing.assert_close(pipe.sample(request), pipe.sample({"label": [0, 2]}, seed=5, guidance_scale=2.0),
                               atol=0, rtol=0)  # fmt: skip
    with pytest.raises(TypeError, match="takes no other arguments, got seed"):
        pipe.sample(request, seed=1)
    with pytest.raises(SampleArgumentError, match="steps must be a whole number from 1 to 1000, got 1001"):
        pipe.sample({"label": [1]}, steps=1001)


# -- the sampler declares what it supports ---------------------------------------------------


class _Img2ImgByHand(DiscreteSampler):
    """A DDIM step, on the base that implements img2img, with the declaration removed."""

    supports_init = False

    def step(self, s):
        return s.alpha_bar_prev.sqrt() * s.x0 + (1 - s.alpha_bar_prev).sqrt() * s.eps


def test_img2img_needs_a_sampler_that_declares_it():
    from ldmkit_samplers import DDIMSampler, EulerSampler

    assert DDIMSampler.supports_init and EulerSampler.supports_init  # from their bases
    pipe = ldmkit.compose(TINY).eval()
    image = torch.zeros(1, 3, 16, 16)
    pipe.sampler = _Img2ImgByHand(steps=2)
    with pytest.raises(SampleArgumentError, match="sampler _Img2ImgByHand does not support img2img"):
        pipe.sample({"label": [1]}, init_image=image, strength=0.5, seed=0)
    pipe.sampler.supports_init = True
    assert pipe.sample({"label": [1]}, init_image=image, strength=0.5, seed=0).shape == (1, 3, 16, 16)


# -- with_sampler ----------------------------------------------------------------------------------


def test_with_sampler_changes_the_sampler_and_its_config_together(tmp_path):
    from ldmkit_samplers import DDIMSampler, DPMSolverPP2MSampler

    pipe = ldmkit.compose(TINY).eval()
    assert pipe.with_sampler("dpmpp_2m", steps=3) is pipe
    assert isinstance(pipe.sampler, DPMSolverPP2MSampler) and pipe.sampler.steps == 3
    assert dict(pipe.config.sampler) == {"name": "dpmpp_2m", "steps": 3}
    pipe.with_sampler({"name": "ddim", "steps": 4, "spacing": "paper"}, eta=0.5)
    assert (pipe.sampler.steps, pipe.sampler.eta, pipe.sampler.spacing) == (4, 0.5, "paper")
    pipe.with_sampler(DDIMSampler(steps=5))
    assert dict(pipe.config.sampler) == {"name": "ddim", "steps": 5}
    pipe.with_sampler(pipe.sampler, steps=6)  # an object, rebuilt with an argument changed
    assert dict(pipe.config.sampler) == {"name": "ddim", "steps": 6} and pipe.sampler.steps == 6
    loaded = Pipeline.load(pipe.save(tmp_path / "saved"))
    assert isinstance(loaded.sampler, DDIMSampler) and loaded.sampler.steps == 6
    with pytest.raises(ConfigError, match="unknown sampler 'nope'"):
        pipe.with_sampler("nope")
    assert pipe.sampler.steps == 6  # unchanged by the refusal


# -- a pipeline built from objects -----------------------------------------------------------------


def _parts() -> dict:
    from ldmkit_autoencoders import KLAutoencoder
    from ldmkit_conditioners import ClassLabelConditioner
    from ldmkit_samplers import DDIMSampler
    from ldmkit_unet import UNetModel

    torch.manual_seed(0)
    conditioner = ClassLabelConditioner(num_classes=3, embed_dim=8)
    conditioner.drop_rate = 0.1  # as composition sets it
    return {
        "first_stage": KLAutoencoder(latent_channels=3, z_channels=3, ch=8, ch_mult=(1, 2, 2), num_res_blocks=1,
                                     attn_resolutions=(), resolution=16, norm_groups=4, encode_mode="mode"),
        "denoiser": UNetModel(in_channels=3, out_channels=3, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                              attention_resolutions=(2,), num_head_channels=8, context_dim=8),
        "conditioner": conditioner,
        "sampler": DDIMSampler(steps=2),
        "schedule": NoiseSchedule(kind="cosine", timesteps=500),
    }  # fmt: skip


def test_a_pipeline_built_from_objects_saves_loads_and_samples_the_same(tmp_path):
    pipe = Pipeline(**_parts(), image_size=16, scale_factor=0.5).eval()
    loaded = Pipeline.load(pipe.save(tmp_path / "objects")).eval()
    assert dict(loaded.config.sampler) == {"name": "ddim", "steps": 2}
    assert loaded.config.first_stage.name == "kl" and loaded.config.first_stage.ch_mult == [1, 2, 2]
    assert (loaded.schedule.kind, loaded.schedule.timesteps, float(loaded.scale_factor)) == ("cosine", 500, 0.5)
    assert loaded.conditioner.drop_rate == 0.1
    for request in (SampleRequest({"label": [0, 2]}, seed=3, guidance_scale=2.0),
                    SampleRequest({"label": [1]}, seed=4, init_image=torch.zeros(1, 3, 16, 16), strength=0.5)):
        torch.testing.assert_close(loaded.sample(request), pipe.sample(request), atol=0, rtol=0)  # fmt: skip


def test_a_component_no_config_can_name_is_named_when_saving(tmp_path):
    parts = _parts()
    parts["sampler"] = _Img2ImgByHand(steps=2)  # not registered
    pipe = Pipeline(**parts, image_size=16)
    assert pipe.config is None
    with pytest.raises(ConfigError, match="cannot save this pipeline, no config rebuilds it: the sampler "
                                          "_Img2ImgByHand is not a registered sampler class"):  # fmt: skip
        pipe.save(tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_a_pipeline_from_objects_refuses_an_unset_interface_attribute():
    """Built in Python, a component that leaves an interface attribute unset is refused when the
    pipeline is made, naming it (composition does the same for registered ones); before, the
    first sampling failed with an AttributeError."""

    class NoLatentChannels(type(_parts()["first_stage"])):
        def __init__(self, **options):
            super().__init__(**options)
            del self.latent_channels

    parts = _parts()
    first = parts["first_stage"]
    parts["first_stage"] = NoLatentChannels(latent_channels=3, z_channels=3, ch=8, ch_mult=(1, 2, 2), num_res_blocks=1,
                                            attn_resolutions=(), resolution=16, norm_groups=4)  # fmt: skip
    assert first.declaration_problems() == []
    with pytest.raises(ConfigError, match=r"Pipeline\(\.\.\.\): first_stage NoLatentChannels: latent_channels is not set"):
        Pipeline(**parts, image_size=16)


def test_a_pipeline_cast_to_half_is_refused_naming_the_fix():
    """Was "Input type (float) and bias type (c10::Half) should be the same" from a convolution,
    in every precision: ldmkit samples bf16/fp16 from a copy of float32 weights."""
    pipe = ldmkit.compose(["denoiser=unet_tiny", "first_stage=kl_tiny", "image_size=16", "sampler.steps=2"]).eval()
    pipe.to(torch.float16)
    for precision in ("auto", "fp32", "fp16"):
        with pytest.raises(SampleArgumentError, match=r"the pipeline's denoiser has float16 weights: .*"
                                                      r"cast it back with \.float\(\)"):  # fmt: skip
            pipe.sample(num_samples=1, seed=0, precision=precision)
    assert pipe.float().sample(num_samples=1, seed=0).shape == (1, 3, 16, 16)
