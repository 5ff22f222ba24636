"""``ldmkit demo``: the page's inputs and checks (fast, no browser), the settings and command
line that reproduce a result, and the page itself in a real headless Chromium (Debian's
``chromium`` driven by Playwright) against ``ldmkit demo`` serving a tiny trained pipeline."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from ldmkit.demo.form import (
    MAX_IMAGES,
    DemoInputError,
    PageRequest,
    caption,
    condition_fields,
    prepare,
    sampler_options,
)
from ldmkit.sample_io.conditions import data_class_names

# -- a tiny trained class-conditional pipeline -------------------------------------------------


def _tiny_data(split, epoch):
    gen = torch.Generator().manual_seed(100 * epoch + (split == "train"))
    for _ in range(4):
        yield {
            "image": torch.rand(4, 3, 8, 8, generator=gen) * 2 - 1,
            "label": torch.randint(0, 10, (4,), generator=gen),
        }


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """``run/pipeline`` of a seconds-long stage-2 run: class_label (10 classes), 8x8, pixels."""
    from ldmkit.config import compose_config
    from ldmkit.training import train

    threads = torch.get_num_threads()
    root = tmp_path_factory.mktemp("demo")
    cfg = compose_config(
        [
            "stage=ldm",
            "trainer=ldm_tiny",
            "first_stage=identity",
            "denoiser=unet_tiny",
            "conditioner=class_label",
            "conditioner.embed_dim=16",
            "conditioner.drop_rate=0.2",
            "sampler=ddim",
            "image_size=8",
            f"run_dir={root / 'run'}",
            "trainer.num_threads=1",
        ]
    )
    try:
        run = train(cfg, data=_tiny_data)
    finally:
        torch.set_num_threads(threads)
    return run / "pipeline"


def _fake_pipeline(conditioner, *, image_size=8, f=4, channels=3, config=None):
    """What :func:`prepare` reads of a pipeline, around a real conditioner and sampler."""
    from ldmkit_samplers import DDIMSampler

    return SimpleNamespace(
        conditioner=conditioner,
        config=config,
        image_size=image_size,
        schedule=SimpleNamespace(timesteps=1000),
        first_stage=SimpleNamespace(downsample_factor=f, image_channels=channels),
        sampler=DDIMSampler(steps=4),
        scale_factor=torch.ones(()),  # on the pipeline's device
    )


def _class_pipeline(**kw):
    from ldmkit_conditioners import ClassLabelConditioner

    return _fake_pipeline(ClassLabelConditioner(num_classes=3, embed_dim=4), **kw)


def _request(**kw) -> PageRequest:
    values = dict(
        sampler="ddim", steps=4, guidance_scale=1.0, seed=0, num_images=2, conditions={"label": 1}
    )
    return PageRequest(**{**values, **kw})


# -- the inputs a pipeline asks for --------------------------------------------------------------


def test_class_field_lists_the_datasets_class_names(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"classes": ["cat", "dog", "emu"]}))
    config = OmegaConf.create({"data": {"path": str(tmp_path), "source": "image_folder"}})
    (field,) = condition_fields(_class_pipeline(config=config))
    assert (field.key, field.kind) == ("label", "class")
    assert field.choices == (("0: cat", 0), ("1: dog", 1), ("2: emu", 2))


def test_class_field_prefers_the_conditioners_own_class_names(tmp_path):
    from ldmkit_conditioners import ClassLabelConditioner

    (tmp_path / "manifest.json").write_text(json.dumps({"classes": ["cat", "dog", "emu"]}))
    config = OmegaConf.create({"data": {"path": str(tmp_path), "source": "image_folder"}})
    named = ClassLabelConditioner(num_classes=3, embed_dim=4, class_names=["sandal", "bag", "coat"])
    (field,) = condition_fields(_fake_pipeline(named, config=config))
    assert field.choices == (("0: sandal", 0), ("1: bag", 1), ("2: coat", 2))


def test_class_names_fall_back_to_the_source_then_to_numbers(tmp_path):
    fashion = OmegaConf.create(
        {"data": {"path": str(tmp_path / "absent"), "source": "fashion_mnist"}}
    )
    names = data_class_names(fashion, 10)
    assert names is not None and names[0] == "T-shirt/top" and len(names) == 10
    assert data_class_names(fashion, 3) is None  # a count that does not match is not used
    (field,) = condition_fields(
        _class_pipeline(config=OmegaConf.create({"data": {"source": "image_folder"}}))
    )
    assert field.choices == (("0", 0), ("1", 1), ("2", 2))


def test_fields_follow_the_conditioners_kinds(tmp_path):
    from ldmkit_conditioners import InpaintConditioner, SemanticMapConditioner

    names = ["background", "sky", "boat"]
    (tmp_path / "manifest.json").write_text(json.dumps({"segmentation_classes": names}))
    scenes = OmegaConf.create({"data": {"source": "semantic_scenes", "path": str(tmp_path)}})
    (seg,) = condition_fields(
        _fake_pipeline(SemanticMapConditioner(num_classes=3, n_stages=2), config=scenes)
    )
    assert (seg.kind, seg.num_classes) == ("segmentation", 3) and "0..2" in seg.label
    assert seg.names == tuple(names)  # the drawing canvas's legend
    image, mask = condition_fields(_fake_pipeline(InpaintConditioner()))
    assert (image.kind, image.mask_key) == ("image", "mask")  # one editor paints the mask
    assert (mask.kind, mask.painted_by) == ("mask", "image")


def test_text_and_class_fields_offer_a_negative_input():
    from ldmkit_conditioners import SemanticMapConditioner

    (label,) = condition_fields(_class_pipeline())
    (caption,) = condition_fields(_fake_pipeline(_text_conditioner()))
    (seg,) = condition_fields(_fake_pipeline(SemanticMapConditioner(num_classes=3, n_stages=2)))
    assert (label.negative, caption.negative, seg.negative) == (
        "steer away from class",
        "negative prompt",
        None,  # the page offers negatives for classes and prompts only
    )


def test_sampler_choices_are_the_sampler_config_options():
    assert {"ddim", "ddpm", "euler", "plms"} <= set(sampler_options())


# -- checks: one line each, naming the input -------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"steps": 0}, "steps must be a whole number from 1 to 1000, got 0"),
        ({"steps": 1001}, "steps must be a whole number from 1 to 1000, got 1001"),
        ({"steps": 2.5}, "steps must be a whole number from 1 to 1000, got 2.5"),
        ({"steps": None}, "steps is empty"),
        ({"guidance_scale": -1}, "guidance scale must be a number >= 0"),
        ({"guidance_scale": None}, "guidance scale is empty: give a number >= 0"),
        (
            {"num_images": MAX_IMAGES + 1},
            f"number of images must be a whole number from 1 to {MAX_IMAGES}, got {MAX_IMAGES + 1}",
        ),
        ({"num_images": 0}, f"number of images must be a whole number from 1 to {MAX_IMAGES}, got 0"),
        ({"num_images": None}, f"number of images is empty: give a whole number from 1 to {MAX_IMAGES}"),
        ({"seed": -3}, "seed must be a whole number from 0 to"),
        (
            {"conditions": {"label": 7}},
            "label: class 7 is not one of this model's classes (0 to 2)",
        ),
        ({"conditions": {}}, "label: choose a class"),
        (
            {"conditions": {"label": True}},  # not class 1 (True == 1 passes Gradio's choices)
            "label: class True is not one of this model's classes (0 to 2)",
        ),
        (
            {"height": 10, "width": 8},
            "size 10x8 is not divisible by the first stage's downsample factor f=4: height and width "
            "must be positive multiples of 4",
        ),
        (
            {"height": 64, "width": 8},
            "size 64x8 is over the largest allowed here, 32x32",
        ),
    ],
)
def test_bad_values_give_one_line_messages(tmp_path, change, message):
    with pytest.raises(DemoInputError) as err:
        prepare(_class_pipeline(), _request(**change), inputs_dir=tmp_path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_randomize_draws_the_seed_and_the_settings_keep_it(tmp_path):
    import random

    request = _request(seed=None, randomize_seed=True)  # the seed box is ignored
    first = prepare(_class_pipeline(), request, inputs_dir=tmp_path, rng=random.Random(5))
    again = prepare(_class_pipeline(), request, inputs_dir=tmp_path, rng=random.Random(5))
    assert first.request.seed == again.request.seed == random.Random(5).randrange(2**32)


def _text_conditioner():
    return SimpleNamespace(
        input_keys=("caption",), input_kind=lambda key: "text", modules=lambda: [],
        read=lambda batch, key: batch[key], known_region=lambda batch: None,
    )  # fmt: skip


def test_a_text_pipeline_needs_a_prompt(tmp_path):
    conditioner = _text_conditioner()
    with pytest.raises(DemoInputError, match="caption: the prompt is empty"):
        prepare(
            _fake_pipeline(conditioner), _request(conditions={"caption": "  "}), inputs_dir=tmp_path
        )
    done = prepare(
        _fake_pipeline(conditioner),
        _request(conditions={"caption": "a red apple"}),
        inputs_dir=tmp_path,
    )
    assert done.request.batch["caption"] == ["a red apple", "a red apple"]


def test_a_negative_is_one_value_for_every_image_and_needs_guidance(tmp_path):
    """The negative prompt (or class to steer away from) goes to the request as one value for
    every image; empty is none (the null condition); with guidance 1 it is refused in one line
    naming it as the page labels it."""
    text = _fake_pipeline(_text_conditioner())
    prompt = {"conditions": {"caption": "a red apple"}, "guidance_scale": 2.0}
    for empty in ("  ", None):
        done = prepare(text, _request(**prompt, negative={"caption": empty}), inputs_dir=tmp_path)
        assert done.request.negative is None
    done = prepare(text, _request(**prompt, negative={"caption": " green "}), inputs_dir=tmp_path)
    assert done.request.negative == {"caption": ["green"]}
    with pytest.raises(DemoInputError) as err:
        prepare(
            text,
            _request(**{**prompt, "guidance_scale": 1.0}, negative={"caption": "green"}),
            inputs_dir=tmp_path,
        )
    assert str(err.value) == (
        "negative prompt needs a guidance scale other than 1: it replaces the null condition of "
        "classifier-free guidance, which a scale of 1 does not evaluate"
    )
    classes = _class_pipeline()
    done = prepare(classes, _request(negative={"label": ""}), inputs_dir=tmp_path)  # "none"
    assert done.request.negative is None
    done = prepare(classes, _request(guidance_scale=3, negative={"label": 2}), inputs_dir=tmp_path)
    assert done.request.negative["label"].tolist() == [2]
    with pytest.raises(DemoInputError, match="^steer away from class needs a guidance scale other"):
        prepare(classes, _request(negative={"label": 2}), inputs_dir=tmp_path)
    with pytest.raises(DemoInputError) as err:
        prepare(classes, _request(guidance_scale=3, negative={"label": 7}), inputs_dir=tmp_path)
    assert str(err.value) == (
        "steer away from class: class 7 is not one of this model's classes (0 to 2)"
    )


def test_gallery_captions_name_the_negative(tmp_path):
    """Each image's caption gives its seed, its class or prompt and, where the request has one,
    what it was steered away from: a viewer tells steered images from plain ones."""
    classes = _class_pipeline()
    fields = condition_fields(classes)
    plain = prepare(classes, _request(guidance_scale=3), inputs_dir=tmp_path)
    steered = prepare(classes, _request(guidance_scale=3, negative={"label": 2}), inputs_dir=tmp_path)
    names = dict((i, name) for name, i in fields[0].choices)
    assert caption(plain, fields, 1) == f"seed 1 · {names[1]}"
    assert caption(steered, fields, 1) == f"seed 1 · {names[1]} · not {names[2]}"
    text = _fake_pipeline(_text_conditioner())
    prompt = {"conditions": {"caption": "a red apple"}, "guidance_scale": 2.0}
    done = prepare(text, _request(**prompt, negative={"caption": "green"}), inputs_dir=tmp_path)
    assert caption(done, condition_fields(text), 0) == 'seed 0 · a red apple · not "green"'


def test_file_inputs_are_read_as_ldmkit_sample_reads_them(tmp_path):
    from ldmkit_conditioners import SemanticMapConditioner

    pipeline = _fake_pipeline(SemanticMapConditioner(num_classes=5, n_stages=2))
    with pytest.raises(DemoInputError, match="^segmentation: upload a class map$"):
        prepare(pipeline, _request(conditions={}), inputs_dir=tmp_path / "in")
    rgb = tmp_path / "rgb.png"
    Image.new("RGB", (8, 8)).save(rgb)
    with pytest.raises(
        DemoInputError,
        match=r"^segmentation: rgb\.png is a RGB image; a class map is a one-channel PNG",
    ):
        prepare(
            pipeline, _request(conditions={"segmentation": str(rgb)}), inputs_dir=tmp_path / "in"
        )
    ids = tmp_path / "ids.png"
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) % 5).save(ids)
    done = prepare(
        pipeline, _request(conditions={"segmentation": str(ids)}), inputs_dir=tmp_path / "in"
    )
    assert done.request.batch["segmentation"].shape == (2, 8, 8)
    kept = tmp_path / "in" / "segmentation.png"  # a copy that outlives the upload cache,
    assert kept.is_file() and done.items == ["segmentation=segmentation.png"]  # named as such


def test_a_mask_must_have_the_start_images_size(tmp_path):
    image, mask = tmp_path / "image.png", tmp_path / "mask.png"
    Image.new("RGB", (8, 8)).save(image)
    Image.new("L", (16, 16), 255).save(mask)
    with pytest.raises(
        DemoInputError, match=r"mask has shape \(1, 1, 16, 16\), but init_image has shape \(1, 3, 8, 8\)"
    ):
        prepare(
            _class_pipeline(),
            _request(init_image=str(image), mask=str(mask)),
            inputs_dir=tmp_path / "in",
        )
    with pytest.raises(DemoInputError, match="mask is a pixel mask over the start image .*: give the start image too"):
        prepare(_class_pipeline(), _request(mask=str(mask)), inputs_dir=tmp_path / "in")
    for strength, message in [
        (0, r"^strength must be in \(0, 1\], got 0.0: the share of the steps run from the start image, noised"),
        (5, r"^strength must be in \(0, 1\], got 5.0"),
        (None, r"^strength is empty: give a number in \(0, 1\]$"),  # not 1 without a word
    ]:
        with pytest.raises(DemoInputError, match=message):
            prepare(
                _class_pipeline(),
                _request(init_image=str(image), strength=strength),
                inputs_dir=tmp_path / "in",
            )


def test_an_inpainting_mask_of_another_size_than_its_image_is_one_line(tmp_path):
    """The conditioner's own check (run by the request's validation, before any sampling) is
    the page's one line, not an unexpected "sampling failed: ConditionValueError: ..."."""
    from ldmkit_conditioners import InpaintConditioner

    image, mask = tmp_path / "image.png", tmp_path / "mask.png"
    Image.new("RGB", (8, 8)).save(image)
    Image.new("L", (4, 4), 255).save(mask)
    with pytest.raises(DemoInputError) as err:
        prepare(
            _fake_pipeline(InpaintConditioner()),
            _request(conditions={"image": str(image), "mask": str(mask)}),
            inputs_dir=tmp_path / "in",
        )
    assert str(err.value).startswith("inpaint: batch['mask'] has shape (2, 1, 4, 4), but batch['image']")


def _bomb(path: Path, side: int = 100_000) -> Path:
    """A PNG of 45 bytes that declares side x side pixels (30 GB as RGB): what PIL reads first."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    return path


def test_images_larger_than_the_demo_takes_are_refused_before_decoding(tmp_path):
    from ldmkit_conditioners import SemanticMapConditioner

    tall = tmp_path / "tall.png"
    Image.new("L", (8, 40)).save(tall)  # 40 high: over 4x the trained 8
    maps = _fake_pipeline(SemanticMapConditioner(num_classes=5, n_stages=2))
    with pytest.raises(DemoInputError) as err:
        prepare(maps, _request(conditions={"segmentation": str(tall)}), inputs_dir=tmp_path / "in")
    assert str(err.value) == (
        "segmentation: the image is 40x8 pixels; the demo takes images up to 32x32"
    )
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    for change in (
        {"init_image": str(tall)},
        {"init_image": str(tmp_path / "ok.png"), "mask": str(tall)},
    ):
        with pytest.raises(DemoInputError, match=r": the image is 40x8 pixels; the demo takes"):
            prepare(_class_pipeline(), _request(**change), inputs_dir=tmp_path / "in")
    with pytest.raises(DemoInputError) as err:  # PIL refuses to open it: nothing is decoded
        prepare(
            _class_pipeline(),
            _request(init_image=str(_bomb(tmp_path / "bomb.png"))),
            inputs_dir=tmp_path / "in",
        )
    assert str(err.value) == (
        "start image: the image has more than 1024 pixels; the demo takes images up to 32x32"
    )


def test_painted_strokes_become_the_mask(tmp_path):
    from ldmkit.demo.editor import editor_files

    background = Image.new("RGB", (8, 6), (10, 20, 30))
    strokes = Image.new("RGBA", (8, 6), (0, 0, 0, 0))
    strokes.putpixel((2, 3), (255, 0, 255, 255))
    image, mask = editor_files({"background": background, "layers": [strokes]}, tmp_path, "start")
    assert np.array_equal(np.asarray(Image.open(image)), np.asarray(background))
    painted = np.asarray(Image.open(mask)) > 127
    assert painted.shape == (6, 8) and painted.sum() == 1 and painted[3, 2]
    assert editor_files({"background": background, "layers": []}, tmp_path, "start")[1] is None
    empty = Image.new("RGBA", (8, 6), (0, 0, 0, 0))
    assert editor_files({"background": empty, "layers": []}, tmp_path, "start") == (None, None)
    with pytest.raises(DemoInputError, match="the strokes need an image under them"):
        editor_files({"background": empty, "layers": [strokes]}, tmp_path, "start")


@pytest.mark.parametrize("mode", ["I;16", "F"])
def test_a_deep_start_image_is_scaled_as_ldmkit_sample_scales_it(tmp_path, mode):
    """An editor's image sent through the API (not a browser's 8-bit canvas) reaches the page
    as uploaded: a 16-bit or float grayscale image is scaled as ``--init-image`` scales it,
    not clipped at 255 by Gradio's conversion to RGBA (16-bit mid-grey came out white)."""
    gr = pytest.importorskip("gradio", reason="the demo extra (gradio) is not installed")
    from gradio.components.image_editor import EditorData
    from gradio.data_classes import FileData

    from ldmkit.demo.app import _read_uploads
    from ldmkit.demo.editor import editor_files
    from ldmkit.sample_io.conditions import load_image

    deep = tmp_path / "deep.tiff"
    grey = np.full((4, 6), 32768, np.uint16) if mode == "I;16" else np.full((4, 6), 0.5, np.float32)
    Image.fromarray(grey).save(deep)
    assert Image.open(deep).mode == mode
    editor = gr.ImageEditor(type="pil", layers=False, transforms=())
    _read_uploads(editor, "start image", 32)
    upload = FileData(path=str(deep), orig_name="deep.tiff")
    value = editor.preprocess(EditorData(background=upload, layers=[], composite=upload))
    image, mask = editor_files(value, tmp_path / "out", "start")
    shown = load_image(image, channels=3, flag="start image")
    assert mask is None and torch.equal(shown, load_image(deep, channels=3, flag="--init-image"))


def test_a_drawn_map_becomes_class_ids(tmp_path):
    from ldmkit.demo.editor import PALETTE, drawing_file, palette

    assert palette(3) == list(PALETTE[:3]) and palette(len(PALETTE) + 1) is None
    drawing = np.zeros((4, 6, 4), dtype=np.uint8)  # transparent: class 0
    drawing[1, 1] = (0xE6, 0x19, 0x4B, 255)  # PALETTE[1]
    drawing[2, 3] = (0x40, 0x60, 0xD0, 255)  # a soft edge near PALETTE[4] (#4363d8)
    path = drawing_file(
        {"composite": drawing, "background": None, "layers": []}, 5, tmp_path, "segmentation"
    )
    ids = np.asarray(Image.open(path))
    assert Image.open(path).mode == "L" and ids.shape == (4, 6)
    assert (ids[1, 1], ids[2, 3], int(ids.sum())) == (1, 4, 5)


# -- a result is reproducible from the command line ------------------------------------------------


def _session(trained, tmp_path, checkpoint=None):
    from ldmkit.demo.session import DemoSession
    from ldmkit.pipeline import Pipeline

    return DemoSession(
        Pipeline.load(trained),
        checkpoint=checkpoint or trained,
        device="cpu",
        results_dir=tmp_path / "results",
    )


def test_the_settings_and_command_line_reproduce_the_images(trained, tmp_path, monkeypatch):
    from ldmkit.cli import main
    from ldmkit.demo.session import Result, Step

    monkeypatch.chdir(trained.parent)  # `ldmkit demo --checkpoint pipeline`, typed relative
    session = _session(trained, tmp_path, checkpoint=Path(trained.name))
    start = tmp_path / "my holiday.png"
    Image.fromarray(np.arange(192, dtype=np.uint8).reshape(8, 8, 3)).save(start)
    events = list(
        session.generate(
            _request(
                sampler="euler",
                steps=6,
                guidance_scale=2.0,
                seed=11,
                conditions={"label": 4},
                negative={"label": 2},
                init_image=str(start),
                strength=0.5,
            )
        )
    )
    steps, result = [e for e in events if isinstance(e, Step)], events[-1]
    assert isinstance(result, Result) and steps[-1].done == steps[-1].total == 3
    assert any(step.preview is not None for step in steps)  # the decoded x0 prediction
    record = result.record
    assert record["sampler"]["name"] == "euler" and record["sampler"]["steps"] == 6
    assert record["overrides"] == ["sampler=euler", "sampler.steps=6"]
    assert (record["seed"], record["guidance_scale"], record["conditions"]) == (
        11,
        2.0,
        {"label": [4, 4]},
    )
    assert record["negative"] == {"label": [2]}  # one for every image, as ldmkit sample records it
    # the inputs are named as the downloads name them, never by their path on the server
    assert record["init_image"] == "init_image.png" and str(tmp_path) not in result.command
    words = shlex.split(result.command)
    assert words[words.index("--negative-cond") + 1] == "label=2"
    assert words[:2] == ["ldmkit", "sample"] and words[-8:] == [
        "--init-image",
        "init_image.png",
        "--strength",
        "0.5",
        "--device",
        "cpu",
        "--out",
        "samples.png",
    ]
    cli = tmp_path / "cli"
    cli.mkdir()
    (download,) = result.files[2:]  # after the grid and the settings: the inputs
    shutil.copyfile(download, cli / download.name)  # downloaded to where the command runs
    monkeypatch.chdir(cli)  # another folder than the server's: the checkpoint is absolute
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # main() replaces it
    assert main([*words[1:], "--no-progress"]) == 0  # the command as shown
    assert json.loads((cli / "samples.json").read_text()) == {
        k: v for k, v in record.items() if k != "command"
    }
    run_dir = result.files[0].parent
    for entry in record["images"]:
        assert (cli / entry["file"]).read_bytes() == (run_dir / entry["file"]).read_bytes()


def test_closing_the_page_stops_the_sampling(trained, tmp_path):
    import threading

    session = _session(trained, tmp_path)
    cancel = threading.Event()
    events = session.generate(_request(steps=50), cancel)
    next(events)  # started
    events.close()  # Gradio closes the generator when the page goes away
    assert cancel.is_set() and not [
        t for t in threading.enumerate() if t.name == "ldmkit-demo-sampling"
    ]
    assert not list((tmp_path / "results").glob("run-*"))  # nothing half-written is kept
    assert isinstance(list(session.generate(_request(steps=2)))[-1].record, dict)  # free again


def test_a_map_with_unknown_ids_fails_while_sampling_in_one_line(tmp_path):
    import ldmkit
    from ldmkit.demo.session import DemoSession

    pipeline = ldmkit.compose(
        overrides=[
            "first_stage=identity",
            "denoiser=unet_tiny",
            "conditioner=semantic_map",
            "conditioner.n_stages=0",
            "image_size=8",
            "sampler=ddim",
        ]
    )
    session = DemoSession(
        pipeline, checkpoint=tmp_path / "ckpt", device="cpu", results_dir=tmp_path / "results"
    )
    ids = tmp_path / "ids.png"
    Image.fromarray(np.full((8, 8), 9, dtype=np.uint8)).save(ids)
    with pytest.raises(DemoInputError) as err:
        list(session.generate(_request(steps=2, conditions={"segmentation": str(ids)})))
    assert str(err.value).startswith("semantic_map: class id 9 in batch['segmentation']")
    assert "outside 0..7" in str(err.value) and "\n" not in str(err.value)


# -- a request's notes: what it should know about its samples -------------------------------------


def _text_session(root: Path, *overrides: str):
    """A page for an untrained text pipeline (bert, prompts cut at 8 tokens), 8x8 pixels."""
    import ldmkit
    from ldmkit.demo.session import DemoSession

    pipeline = ldmkit.compose(
        overrides=[
            "first_stage=identity",
            "denoiser=unet_tiny",
            "conditioner=bert",
            "conditioner.n_embed=16",
            "conditioner.n_layer=1",
            "conditioner.max_seq_len=8",
            "image_size=8",
            "sampler=ddim",
            *overrides,
        ]
    )
    return DemoSession(
        pipeline, checkpoint=root / "ckpt", device="cpu", results_dir=root / "results"
    )


def _prompt(text: str, **kw) -> PageRequest:
    return _request(**{"steps": 2, "num_images": 1, "conditions": {"caption": text}, **kw})


CUT = "caption: the prompt is longer than the 8 tokens its text encoder reads; the rest was cut"


def test_each_request_notes_its_own_cut_prompt(tmp_path):
    """The text conditioner warns about a cut prompt once in a process (a server would tell
    only the first user ever): each request with one says so in its notes, one without does not."""
    session = _text_session(tmp_path)

    def notes(text: str) -> list[str]:
        return list(session.generate(_prompt(text)))[-1].notes

    first, second = notes("a very long caption " * 4), notes("red apple " * 5)
    assert len(first) == 1 and first[0].startswith(CUT), first  # in place of the plugin's words
    assert second == first
    assert notes("red apple") == []
    assert notes("a 🐸 on a log") == [
        "caption: the prompt holds text the text encoder's vocabulary does not know (emoji, "
        "most symbols), read as its unknown token"
    ]


def test_each_request_notes_the_warnings_it_raised(tmp_path):
    """Python shows a warning once per place in the code in a process: each request's notes
    hold the warnings it raised, again for the next request."""
    session = _text_session(tmp_path, "conditioner.drop_rate=0")  # an untrained null condition
    for _ in range(2):
        (note,) = list(session.generate(_prompt("red apple", guidance_scale=2.0)))[-1].notes
        assert note.startswith("guidance_scale=2.0 with conditioner BertConditioner"), note
    assert list(session.generate(_prompt("red apple")))[-1].notes == []  # no guidance, no warning


def test_a_strength_that_runs_no_step_is_noted(tmp_path):
    """``int(steps * strength)`` steps run from the start image: none at 4 steps and strength
    0.2, and the images are the start image's reconstruction, which the notes say."""
    start = tmp_path / "start.png"
    Image.new("RGB", (8, 8), (200, 30, 30)).save(start)
    session = _text_session(tmp_path)
    request = _prompt("red apple", steps=4, init_image=str(start), strength=0.2)
    assert list(session.generate(request))[-1].notes == [
        "strength 0.2 runs none of the 4 steps (4 x 0.2 rounds down to 0): the images are the "
        "start image as the first stage reconstructs it; raise the strength or the steps"
    ]
    request = _prompt("red apple", steps=4, init_image=str(start), strength=0.25)
    assert list(session.generate(request))[-1].notes == []  # one step


def test_a_request_is_checked_against_the_sampler_it_picks(tmp_path, monkeypatch):
    """The pipeline holds the sampler the last request ran (another user's, maybe): a request
    is checked against the sampler it picks, and the check leaves the pipeline alone (checks
    run beside a sampling)."""
    from ldmkit_samplers import DDIMSampler

    class NoImg2Img(DDIMSampler):
        supports_init = False

    start = tmp_path / "start.png"
    Image.new("RGB", (8, 8)).save(start)
    session = _text_session(tmp_path)
    last = NoImg2Img(steps=4)
    monkeypatch.setattr(session.pipeline, "sampler", last)
    session.check(_prompt("red apple", init_image=str(start), strength=0.5))  # ddim takes it
    assert session.pipeline.sampler is last
    with pytest.raises(DemoInputError, match="^sampler NoImg2Img does not support img2img"):
        prepare(
            _class_pipeline(),  # its sampler is DDIM's
            _request(init_image=str(start)),
            inputs_dir=tmp_path / "in",
            sampler=NoImg2Img(steps=4),
        )


def test_a_requests_notes_hold_only_its_own_warnings():
    """Another thread's warning during a request (an input check beside a sampling) is not
    the request's; the filters stay as they are (``ldmkit demo`` makes PIL's decompression-bomb
    warning an error, and so it stays while a request samples)."""
    import threading

    from ldmkit.demo.session import warnings_to

    notes: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with warnings_to(notes):
            warnings.warn("mine", stacklevel=1)
            other = threading.Thread(target=warnings.warn, args=("another request's",))
            other.start()
            other.join()
            warnings.warn("mine", stacklevel=1)  # noted once
            with pytest.raises(Image.DecompressionBombWarning):
                warnings.warn("a bomb", Image.DecompressionBombWarning, stacklevel=1)
        warnings.warn("after the request", stacklevel=1)
    assert notes == ["mine"]


@pytest.fixture(scope="module")
def text_page(tmp_path_factory):
    """The page of :func:`_text_session` built in this process, and a function that runs its
    Generate with the page's defaults changed by ``elem_id`` (the last update's dict)."""
    pytest.importorskip("gradio", reason="the demo extra is not installed: pip install 'ldmkit[demo]'")
    from ldmkit.demo.app import build_demo

    session = _text_session(tmp_path_factory.mktemp("text_page"))
    session.pipeline.save(session.checkpoint)  # what its command lines load
    demo = build_demo(session)
    (event,) = [fn for fn in demo.fns.values() if fn.api_name == "generate"]
    by_id = {c.elem_id: c for c in [*event.inputs, *event.outputs]}

    def generate(**values) -> dict:
        given = {c: c.value for c in event.inputs}
        given.update({by_id[f"ldmkit-{k.replace('_', '-')}"]: v for k, v in values.items()})
        *_, last = event.fn(given)
        return {c.elem_id: update for c, update in last.items()}

    return SimpleNamespace(demo=demo, event=event, by_id=by_id, generate=generate)


def test_the_page_shows_each_requests_notes_beside_its_samples(text_page):
    def shown(prompt: str):
        return text_page.generate(
            cond_caption=prompt, steps=2, num_images=1, randomize=False
        )["ldmkit-notes"]

    for prompt in ("a very long caption " * 4, "red apple " * 5):
        notes = shown(prompt)
        assert notes.visible and notes.value.startswith(CUT), notes.value
    notes = shown("red apple")
    assert not notes.visible and notes.value == ""


def test_a_negative_prompt_on_the_page_is_in_its_settings_and_command(
    text_page, tmp_path, monkeypatch
):
    """The page's negative prompt reaches the sampling, one for every image; its settings are
    what the command it shows (``--negative-prompt``) writes, with the same images; with
    guidance 1 it is one line naming it."""
    import gradio as gr

    from ldmkit.cli import main

    box = text_page.by_id["ldmkit-negative-caption"]
    assert isinstance(box, gr.Textbox) and box.label.startswith("negative prompt")
    prompt = {"cond_caption": "red apple", "steps": 2, "num_images": 2, "randomize": False}
    with pytest.raises(gr.Error) as err:
        text_page.generate(**prompt, guidance=1, negative_caption="green")
    assert err.value.message.startswith("negative prompt needs a guidance scale other than 1: ")
    plain = text_page.generate(**prompt, guidance=2.5)["ldmkit-settings"]  # empty: none
    assert plain["negative"] is None and "--negative" not in plain["command"]
    shown = text_page.generate(**prompt, guidance=2.5, negative_caption=" -green, 'ripe' ")
    record = shown["ldmkit-settings"]
    assert record["negative"] == {"caption": ["-green, 'ripe'"]}
    assert record["conditions"] == {"caption": ["red apple", "red apple"]}
    words = shlex.split(record["command"])
    assert "--negative-prompt=-green, 'ripe'" in words  # not read as an option -green
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # main() replaces it
    assert main([*words[1:], "--no-progress"]) == 0  # the command as shown
    assert json.loads((tmp_path / "samples.json").read_text()) == {
        k: v for k, v in record.items() if k != "command"
    }
    run_dir = Path(shown["ldmkit-files"][0]).parent
    for entry in record["images"]:
        assert (tmp_path / entry["file"]).read_bytes() == (run_dir / entry["file"]).read_bytes()


def test_the_page_takes_typed_numbers_as_typed(text_page):
    """A slider puts a typed value outside its range back inside it without a word (Gradio's
    slider does on blur, before Generate sends it): the page has number boxes, whose values
    the request checks in one line (tests above), and no sliders."""
    import gradio as gr

    assert not [c.elem_id for c in text_page.event.inputs if isinstance(c, gr.Slider)]
    for name in ("guidance", "num-images", "strength", "steps", "seed"):
        assert isinstance(text_page.by_id[f"ldmkit-{name}"], gr.Number)
    assert text_page.by_id["ldmkit-num-images"].precision is None  # 2.5 is refused, not rounded


# -- the command ---------------------------------------------------------------------------------


def test_demo_command_checks_its_arguments(capsys):
    from ldmkit.cli import main

    assert main(["demo", "--checkpoint", "x", "--port", "0"]) == 1
    assert "--port must be in 1..65535, got 0" in capsys.readouterr().err
    assert main(["demo", "--checkpoint", "x", "--queue-size", "0"]) == 1
    assert "--queue-size must be >= 1, got 0" in capsys.readouterr().err


def test_an_address_the_demo_cannot_listen_on_is_one_line_naming_the_option(tmp_path, capsys):
    """Gradio says "Cannot find empty port ... set GRADIO_SERVER_PORT" for an unknown host as
    for a port in use (after a warning about serving beyond this machine, and uvicorn's own
    line): the command names ``--host`` or ``--port``, in one line."""
    pytest.importorskip("gradio", reason="the demo extra (gradio) is not installed")
    import ldmkit
    from ldmkit.cli import main

    ldmkit.compose(overrides=["first_stage=identity", "denoiser=unet_tiny", "image_size=8"]).save(
        tmp_path / "ckpt"
    )
    demo = ["demo", "--checkpoint", str(tmp_path / "ckpt")]
    assert main([*demo, "--host", "no-such-host.invalid", "--port", str(_free_port())]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("ldmkit demo: error: --host no-such-host.invalid: no such address (")
    assert "\n" not in err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main([*demo, "--port", str(port)]) == 1
    assert capsys.readouterr().err.strip() == (
        f"ldmkit demo: error: --port {port} on 127.0.0.1 is in use: choose another --port"
    )


def test_demo_without_gradio_says_what_to_install(monkeypatch, capsys):
    from ldmkit.cli import main

    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` fails as if not installed
    import ldmkit.demo

    # the page's module, where a test of this process imported it, is imported afresh
    monkeypatch.delitem(sys.modules, "ldmkit.demo.app", raising=False)
    monkeypatch.delattr(ldmkit.demo, "app", raising=False)
    assert main(["demo", "--checkpoint", "x"]) == 1
    assert capsys.readouterr().err.strip() == (
        "ldmkit demo: error: the demo needs Gradio, which is not installed: pip install 'ldmkit[demo]'"
    )


def test_demo_with_a_missing_checkpoint_is_one_line(tmp_path, capsys):
    pytest.importorskip("gradio", reason="the demo extra (gradio) is not installed")
    from ldmkit.cli import main

    assert main(["demo", "--checkpoint", str(tmp_path / "nope")]) == 1
    assert (
        capsys.readouterr().err.strip()
        == f"ldmkit demo: error: checkpoint file missing: {tmp_path / 'nope' / 'config.yaml'}"
    )


# -- the page in a real browser ------------------------------------------------------------------


def _browser() -> str:
    """The system Chromium, or a skip that says what is missing."""
    pytest.importorskip(
        "gradio", reason="the demo extra is not installed: pip install 'ldmkit[demo]'"
    )
    pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (the test extra)"
    )
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no Chromium on PATH: apt-get install chromium (scripts/setup.sh does)")
    return chromium


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(trained, tmp_path_factory):
    """``ldmkit demo`` serving the trained pipeline with a temporary folder of its own
    (``TMPDIR``): ``.url``, ``.tmp``, ``.log`` and ``.stop()`` (SIGTERM; the module's last
    test calls it to see what is left, else it runs after the module)."""
    pytest.importorskip(
        "gradio", reason="the demo extra is not installed: pip install 'ldmkit[demo]'"
    )
    port = _free_port()
    root = tmp_path_factory.mktemp("server")
    log, tmp = root / "demo.log", root / "tmp"
    tmp.mkdir()
    exe = Path(sys.executable).with_name("ldmkit")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
        "NO_PROXY": "127.0.0.1",
        "TMPDIR": str(tmp),
    }
    env.pop("GRADIO_TEMP_DIR", None)  # Gradio's default: <TMPDIR>/gradio
    with open(log, "w") as out:
        process = subprocess.Popen(
            [
                str(exe),
                "demo",
                "--checkpoint",
                str(trained),
                "--port",
                str(port),
                "--queue-size",
                "8",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=root,
        )
    url = f"http://127.0.0.1:{port}/"

    def stop() -> None:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    try:
        deadline = time.monotonic() + 90
        while True:
            if process.poll() is not None:
                pytest.fail(f"ldmkit demo exited with {process.returncode}:\n{log.read_text()}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            if time.monotonic() > deadline:
                pytest.fail(f"ldmkit demo did not serve {url} within 90 s:\n{log.read_text()}")
            time.sleep(0.3)
        yield SimpleNamespace(url=url, tmp=tmp, log=log, stop=stop)
    finally:
        stop()


class _Page:
    """What the page's JavaScript sends, without a browser: uploads, then an event joined to
    Gradio's queue with the page's values (its defaults, changed by ``elem_id``), then the
    session's messages (``estimation``, ``process_starts``, ``process_completed``, ...)."""

    def __init__(self, url: str) -> None:
        import httpx

        self.http = httpx.Client(base_url=url, timeout=60)
        config = self.http.get("config").json()
        self.props = {c["id"]: c["props"] for c in config["components"]}
        self.events = {d["api_name"]: d for d in config["dependencies"]}

    def upload(self, path: Path) -> dict:
        with open(path, "rb") as f:
            response = self.http.post("gradio_api/upload", files={"files": (path.name, f)})
        response.raise_for_status()
        (stored,) = response.json()
        return {"path": stored, "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}

    def join(self, event: str, session: str, values: dict | None = None) -> None:
        dependency = self.events[event]
        shown = {
            self.props[i].get("elem_id"): self.props[i].get("value") for i in dependency["inputs"]
        }
        shown.update(values or {})
        data = [shown[self.props[i].get("elem_id")] for i in dependency["inputs"]]
        body = {"data": data, "fn_index": dependency["id"], "session_hash": session}
        self.http.post("gradio_api/queue/join", json=body).raise_for_status()

    def messages(self, session: str, events: int) -> list[dict]:
        """The session's messages until ``events`` events completed."""
        out: list[dict] = []
        params = {"session_hash": session}
        with self.http.stream("GET", "gradio_api/queue/data", params=params) as stream:
            for line in stream.iter_lines():
                if line.startswith("data:"):
                    out.append(json.loads(line[5:]))
                    if sum(m["msg"] == "process_completed" for m in out) == events:
                        break
        return out

    def run(self, event: str, values: dict | None = None) -> dict:
        """One event's ``process_completed`` message."""
        session = uuid.uuid4().hex
        self.join(event, session, values)
        return self.messages(session, 1)[-1]


def _editor(upload: dict) -> dict:
    """The start-image editor's value: an uploaded image, no strokes."""
    return {"background": upload, "layers": [], "composite": upload, "id": None}


@pytest.mark.slow  # a few seconds on the shared server
@pytest.mark.parametrize("kind", ["larger", "bomb"])
def test_an_upload_larger_than_the_demo_takes_is_one_line(server, tmp_path, kind):
    page = _Page(server.url)
    image = tmp_path / "big.png"
    if kind == "bomb":  # PIL refuses it inside Gradio, before the page's check runs
        _bomb(image)
        expected = "start image: the image has more than 1024 pixels; "
    else:  # 40 wide on a model trained at 8x8 (the output would be 40 wide), 320 pixels
        Image.new("RGB", (40, 8)).save(image)
        expected = "start image: the image is 8x40 pixels; "
    done = page.run("check", {"ldmkit-init-image": _editor(page.upload(image))})
    assert not done["success"]
    assert done["output"]["error"] == expected + "the demo takes images up to 32x32"
    if kind == "larger":  # and Gradio takes no file larger than such an image can be
        too_big = tmp_path / "too_big.png"
        too_big.write_bytes(os.urandom(2 * 2**20))
        with open(too_big, "rb") as f:
            response = page.http.post("gradio_api/upload", files={"files": (too_big.name, f)})
        assert response.status_code == 413


@pytest.mark.slow  # a few seconds on the shared server
def test_an_upload_that_is_no_image_is_one_line(server, tmp_path):
    """Gradio decodes the start image and the mask before the page's check runs: a file PIL
    cannot read is the page's one line naming the input and the file as uploaded (not the
    bare "Error" of a failed preprocess, nor the upload's path on the server)."""
    page = _Page(server.url)
    notes, truncated, fine = tmp_path / "notes.png", tmp_path / "cut.png", tmp_path / "ok.png"
    notes.write_text("not an image")
    Image.new("RGB", (8, 8)).save(fine)
    truncated.write_bytes(fine.read_bytes()[:40])
    done = page.run("check", {"ldmkit-init-image": _editor(page.upload(notes))})
    assert not done["success"]
    assert done["output"]["error"] == "start image: cannot read notes.png as an image: cannot identify image file 'notes.png'"
    done = page.run(
        "check", {"ldmkit-init-image": _editor(page.upload(fine)), "ldmkit-init-mask": page.upload(truncated)}
    )
    assert not done["success"]
    assert done["output"]["error"].startswith("mask: cannot read cut.png as an image: ")
    assert str(server.tmp) not in done["output"]["error"]


@pytest.mark.slow  # a few seconds on the shared server
def test_strokes_without_an_image_name_the_start_image(server, tmp_path):
    page = _Page(server.url)
    strokes = tmp_path / "strokes.png"
    Image.new("RGBA", (8, 8), (255, 0, 255, 255)).save(strokes)
    empty = {"background": None, "layers": [page.upload(strokes)], "composite": None, "id": None}
    done = page.run("check", {"ldmkit-init-image": empty})
    assert not done["success"]
    assert done["output"]["error"] == (
        "start image: the strokes need an image under them: upload the image first"
    )


@pytest.mark.slow  # a few seconds on the shared server
def test_values_gradio_refuses_name_the_input(server):
    """Through the API (a browser offers only the choices), a value a dropdown or a checkbox
    refuses is a line naming the input, not Gradio's bare "Value: 12 is not in the list of
    choices" (or "Error", for a value of the wrong type); the numbers are the request's to
    check."""
    page = _Page(server.url)
    for values, error in [
        ({"ldmkit-cond-label": 12}, "label: Value: 12 is not in the list of choices: "),
        ({"ldmkit-sampler": "nope"}, "sampler: Value: nope is not in the list of choices: "),
        ({"ldmkit-num-images": 0}, "number of images must be a whole number from 1 to 16, got 0"),
        ({"ldmkit-guidance": None}, "guidance scale is empty: give a number >= 0"),
    ]:
        done = page.run("check", values)
        assert not done["success"] and done["output"]["error"].startswith(error), done


@pytest.mark.slow
def test_input_checks_run_a_few_at_a_time(server):
    from ldmkit.demo.form import MAX_CHECKS

    page, session = _Page(server.url), uuid.uuid4().hex
    with ThreadPoolExecutor(6) as pool:  # six presses of Generate at once
        list(pool.map(lambda _: page.join("check", session), range(6)))
    running = most = 0
    for message in page.messages(session, 6):
        running += {"process_starts": 1, "process_completed": -1}.get(message["msg"], 0)
        most = max(most, running)
    assert most <= MAX_CHECKS == 2


@pytest.mark.slow  # about 25 s with the server's start and stop, on a busy 2-core machine
def test_page_generates_and_reports_bad_input(server):
    chromium = _browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            outside = []  # the page loads nothing from outside the server (no network at run time)
            page.on(
                "request",
                lambda r: (
                    outside.append(r.url)
                    if not r.url.startswith((server.url, "data:", "blob:"))
                    else None
                ),
            )
            page.goto(server.url)
            page.wait_for_selector("#ldmkit-generate", timeout=30_000)

            page.click("#ldmkit-cond-label input")  # the class dropdown, with the classes' names
            options = page.get_by_role("option")
            assert options.count() == 10 and options.nth(3).inner_text().startswith("3: ")
            options.nth(3).click()
            page.fill("#ldmkit-steps input", "3")
            page.uncheck("#ldmkit-randomize input")
            page.fill("#ldmkit-seed input", "7")
            for field, value in (("#ldmkit-guidance", "2.5"), ("#ldmkit-num-images", "2")):
                box = page.locator(f"{field} input[type=number]")
                box.fill(value)
                box.press("Enter")
            page.click("#ldmkit-generate")

            images = page.locator("#ldmkit-samples img")
            images.nth(1).wait_for(timeout=60_000)
            # an <img> is in the page before its file has loaded (naturalWidth 0 until then)
            page.wait_for_function(
                "[...document.querySelectorAll('#ldmkit-samples img')]"
                ".every(e => e.complete && e.naturalWidth > 0)",
                timeout=60_000,
            )
            sizes = images.evaluate_all("els => els.map(e => [e.naturalWidth, e.naturalHeight])")
            assert sizes == [[8, 8], [8, 8]]
            page.wait_for_function(
                "document.querySelector('#ldmkit-command textarea').value.length > 0"
            )
            shown = page.inner_text("#ldmkit-settings").split("\n", 1)[1]  # after the label
            record = json.loads(shown.replace("\n", ""))
            assert record["conditions"] == {"label": [3, 3]} and record["sampler"]["steps"] == 3
            assert (record["seed"], record["guidance_scale"], record["size"]) == (7, 2.5, [8, 8])
            assert [image["seed"] for image in record["images"]] == [7, 8]
            command = page.input_value("#ldmkit-command textarea")
            assert (
                command == record["command"]
                and "--cond label=3" in command
                and "--seed 7" in command
            )
            links = page.locator("#ldmkit-files a").evaluate_all("els => els.map(e => e.href)")
            settings_file = next(link for link in links if link.endswith(".json"))
            downloaded = page.request.get(
                settings_file
            ).json()  # the settings, as ldmkit sample writes them
            assert downloaded == {k: v for k, v in record.items() if k != "command"}

            page.fill("#ldmkit-steps input", "0")
            page.click("#ldmkit-generate")
            toast = page.locator(".toast-body").filter(has_text="steps must be")
            toast.wait_for(timeout=15_000)
            assert "steps must be a whole number from 1 to 1000, got 0" in toast.inner_text()
            assert images.count() == 2  # the results stay
            page.fill("#ldmkit-steps input", "3")  # a value typed out of range is said, not
            page.fill("#ldmkit-num-images input", "100")  # put back in range (a slider's 16)
            page.click("#ldmkit-generate")
            toast = page.locator(".toast-body").filter(has_text="number of images")
            toast.wait_for(timeout=15_000)
            assert "number of images must be a whole number from 1 to 16, got 100" in toast.inner_text()
            assert images.count() == 2
            assert not outside, f"the page requested {outside}"
        finally:
            browser.close()


@pytest.mark.slow
def test_inputs_stay_private_and_go_with_the_server(server, tmp_path):
    """One user's inputs can be neither read off another's page nor fetched by their path;
    SIGTERM removes every file the server wrote, Gradio's copies included. Stops the server:
    the module's last test."""
    page = _Page(server.url)
    start = tmp_path / "my holiday.png"
    Image.new("RGB", (8, 8), (200, 30, 30)).save(start)
    values = {"ldmkit-init-image": _editor(page.upload(start)), "ldmkit-strength": 0.5}
    done = page.run("generate", {**values, "ldmkit-steps": 2, "ldmkit-num-images": 1})
    assert done["success"], done
    _, _, command, record, files, notes = done["output"]["data"]
    assert not notes["visible"]  # nothing to note
    assert "--init-image init_image.png --strength 0.5" in command
    assert record["init_image"] == "init_image.png"
    assert str(server.tmp) not in json.dumps([command, record])  # no path on the server is shown
    (kept,) = server.tmp.glob("ldmkit-demo-*/run-*/inputs/init_image.png")  # the test knows it
    assert re.fullmatch("run-[0-9a-f]{32}", kept.parent.parent.name)  # no run-000001, -000002
    assert page.http.get(f"gradio_api/file={kept}").status_code == 403  # not served by path
    assert page.http.get(files[-1]["url"]).status_code == 200  # the user's own download is

    server.stop()
    left = [p.relative_to(server.tmp) for p in server.tmp.rglob("*")]
    assert not [p for p in left if (server.tmp / p).is_file() or p.parts[0] == "gradio"], left
    log = server.log.read_text()
    assert f"ldmkit demo: serving {server.url}" in log and "share=True" not in log, log
