"""Each conditioning task trained for a few steps through the real CLI on real shards
(semantic maps with the latent cache caching the maps, super-resolution caching the images,
inpainting), then sampled with ``ldmkit sample --cond key=value`` in a subprocess."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ldmkit.data import prepare
from tests.data.conftest import make_image_folder
from tests.data.test_semantic_scenes import make_cutouts
from tests.test_cli import ldmkit

TINY = ["stage=ldm", "trainer=ldm_tiny", "first_stage=identity", "denoiser=unet_tiny",
        "trainer.num_threads=1"]


def train(run, *overrides):
    out = ldmkit("train", *TINY, f"run_dir={run}", *overrides)
    assert out.returncode == 0, out.stderr[-3000:]
    return run / "pipeline"


def sample(pipeline, out_png, *args):
    return ldmkit("sample", "--checkpoint", str(pipeline), "sampler.steps=2", "--out", str(out_png),
                  "--no-progress", *args)


def grid_size(n_rows_cols, size):
    """torchvision's grid: 2-pixel padding, none around a single image."""
    return size if n_rows_cols == 1 else 2 + n_rows_cols * (size + 2)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    make_cutouts(root / "cutouts")
    prepare("semantic_scenes", root / "shards", cutouts="folder", path=str(root / "cutouts"), num_classes=4,
            num_samples=12, val_samples=4, image_size=16, shard_size=4, seed=1, progress=False)
    return root


def test_semantic_map_task_caches_maps_and_samples_at_1x_and_2x(scenes, tmp_path):
    run = tmp_path / "run"
    pipeline = train(run, "conditioner=semantic_map", "conditioner.num_classes=4", "conditioner.n_stages=0",
                     "data=semantic_scenes", f"data.path={scenes / 'shards'}", "data.prepare={}", "image_size=16",
                     "trainer.latent_cache=true", "trainer.val_split=val")
    meta = json.loads((run / "latent_cache" / "meta.json").read_text())
    assert meta["keys"] == ["segmentation"] and meta["samples"] == 12
    chunk = load_file(str(run / "latent_cache" / "chunk_00000.safetensors"))
    assert chunk["segmentation"].shape == (12, 16, 16) and int(chunk["segmentation"].max()) <= 3

    ids = np.zeros((16, 16), np.uint8)
    ids[4:12, 2:9], ids[8:, 10:] = 1, 3
    Image.fromarray(ids, mode="L").save(tmp_path / "map.png")
    Image.fromarray(np.kron(ids, np.ones((2, 2), np.uint8)), mode="L").save(tmp_path / "map2x.png")
    out = sample(pipeline, tmp_path / "s1.png", "--cond", f"segmentation={tmp_path / 'map.png'}",
                 "--cond", f"segmentation={tmp_path / 'map.png'}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert Image.open(tmp_path / "s1.png").size == (grid_size(2, 16), 2 + 16 + 2)
    out = sample(pipeline, tmp_path / "shown.png", "--cond", f"segmentation={tmp_path / 'map.png'}",
                 "--cond", f"segmentation={tmp_path / 'map.png'}", "--show-conditions")
    assert out.returncode == 0, out.stderr[-3000:]
    assert Image.open(tmp_path / "shown.png").size == (grid_size(2, 16), grid_size(2, 16))  # map | sample
    # each image's JSON entry names the map it was drawn from
    out = sample(pipeline, tmp_path / "each.png", "--cond", f"segmentation={tmp_path / 'map.png'}",
                 "--cond", f"segmentation={tmp_path / 'map2x.png'}", "--image-size", "16", "--num-samples", "2")
    assert out.returncode == 1 and "different sizes" in out.stderr  # one size per call
    Image.fromarray(ids[::-1].copy(), mode="L").save(tmp_path / "flipped.png")
    out = sample(pipeline, tmp_path / "each.png", "--cond", f"segmentation={tmp_path / 'map.png'}",
                 "--cond", f"segmentation={tmp_path / 'flipped.png'}", "--num-samples", "2")
    assert out.returncode == 0, out.stderr[-3000:]
    entries = json.loads((tmp_path / "each.json").read_text())["images"]
    assert [(e["seed"], e["segmentation"]) for e in entries] == [
        (0, str(tmp_path / "map.png")), (1, str(tmp_path / "map.png")),
        (2, str(tmp_path / "flipped.png")), (3, str(tmp_path / "flipped.png"))]
    # a map twice the size samples twice the size (convolutional sampling, Sec. 4.3.2)
    out = sample(pipeline, tmp_path / "s2.png", "--cond", f"segmentation={tmp_path / 'map2x.png'}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert Image.open(tmp_path / "s2.png").size == (grid_size(1, 32), grid_size(1, 32))

    ids[0, 0] = 9
    Image.fromarray(ids, mode="L").save(tmp_path / "bad.png")
    out = sample(pipeline, tmp_path / "bad_out.png", "--cond", f"segmentation={tmp_path / 'bad.png'}")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "9" in out.stderr and "num_classes=4" in out.stderr and "bad.png" in out.stderr
    # the conditioner's key is required, and named
    out = sample(pipeline, tmp_path / "none.png", "--num-samples", "2")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "SemanticMapConditioner reads batch key 'segmentation'" in out.stderr
    out = sample(pipeline, tmp_path / "none.png", "--cond", "label=3")
    assert out.returncode == 1 and "reads no key 'label'" in out.stderr


@pytest.mark.parametrize("conditioner", [["conditioner=class_label"], ["conditioner=multi"]])
def test_class_labels_on_data_without_labels_say_the_data_has_none(scenes, tmp_path, conditioner):
    """The semantic scenes hold no ``.cls``: the loader's label is -1 (none) for every sample,
    and the class conditioner (alone or a part of ``multi``) says so, not only "got min -1"."""
    out = ldmkit("train", *TINY, f"run_dir={tmp_path / 'run'}", *conditioner, "data=semantic_scenes",
                 f"data.path={scenes / 'shards'}", "data.prepare={}", "image_size=16", "first_stage=identity")
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "got min -1, max -1" in out.stderr
    assert "-1 is the data's label for a sample without one (no .cls member)" in out.stderr


def test_super_resolution_caches_images_and_samples_from_a_low_res_png(tmp_path):
    make_image_folder(tmp_path / "images", per_class=4, size=(16, 16))
    prepare("image_folder", tmp_path / "shards", path=str(tmp_path / "images"), shard_size=4, progress=False)
    run = tmp_path / "run"
    pipeline = train(run, "conditioner=low_res", "conditioner.factor=4", "conditioner.channels=3",
                     "data=image_folder", f"data.path={tmp_path / 'shards'}", "data.crop=center",
                     "data.flip=false", "image_size=16", "trainer.latent_cache=true", "trainer.val_split=train")
    assert json.loads((run / "latent_cache" / "meta.json").read_text())["keys"] == ["image"]
    small = np.random.default_rng(0).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    Image.fromarray(small).save(tmp_path / "lowres.png")
    out = sample(pipeline, tmp_path / "sr.png", "--cond", f"lowres={tmp_path / 'lowres.png'}", "--num-samples", "3")
    assert out.returncode == 0, out.stderr[-3000:]
    assert Image.open(tmp_path / "sr.png").size == (grid_size(2, 16), grid_size(2, 16))


def test_inpainting_samples_from_an_image_and_a_mask(tmp_path):
    make_image_folder(tmp_path / "images", per_class=4, size=(8, 8))
    prepare("image_folder", tmp_path / "shards", path=str(tmp_path / "images"), shard_size=4, progress=False)
    pipeline = train(tmp_path / "run", "conditioner=inpaint", "data=image_folder",
                     f"data.path={tmp_path / 'shards'}", "image_size=8", "trainer.val_split=train")
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(tmp_path / "photo.png")
    mask = np.zeros((8, 8), np.uint8)
    mask[2:6, 2:6] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = sample(pipeline, tmp_path / "fill.png", "--cond", f"image={tmp_path / 'photo.png'}",
                 "--cond", f"mask={tmp_path / 'mask.png'}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert Image.open(tmp_path / "fill.png").size == (grid_size(1, 8), grid_size(1, 8))
    settings = json.loads((tmp_path / "fill.json").read_text())  # condition files by path
    assert settings["conditions"] == {"image": str(tmp_path / "photo.png"), "mask": str(tmp_path / "mask.png")}
    assert settings["images"] == [{"file": "fill/000000.png", "seed": 0, "image": str(tmp_path / "photo.png"),
                                   "mask": str(tmp_path / "mask.png")}]  # each image's inputs
    assert settings["refine_known"] == 0
    out = sample(pipeline, tmp_path / "fitted.png", "--cond", f"image={tmp_path / 'photo.png'}",
                 "--cond", f"mask={tmp_path / 'mask.png'}", "--refine-known", "3")
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((tmp_path / "fitted.json").read_text())["refine_known"] == 3
    out = sample(pipeline, tmp_path / "fill.png", "--cond", f"image={tmp_path / 'photo.png'}")
    assert out.returncode == 1 and "InpaintConditioner reads batch key 'mask'" in out.stderr
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "small_mask.png")
    out = sample(pipeline, tmp_path / "fill.png", "--cond", f"image={tmp_path / 'photo.png'}",
                 "--cond", f"mask={tmp_path / 'small_mask.png'}")
    assert out.returncode == 1 and "Traceback" not in out.stderr and "mask" in out.stderr


@pytest.mark.parametrize("conditioner", ["bert", "frozen_text"])
def test_text_to_image_trains_and_samples_from_prompts(tmp_path, conditioner):
    make_image_folder(tmp_path / "images", per_class=4, size=(8, 8))  # captions on every other image
    prepare("image_folder", tmp_path / "shards", path=str(tmp_path / "images"), shard_size=4, progress=False)
    run = tmp_path / "run"
    pipeline = train(run, f"conditioner={conditioner}", "conditioner.max_" + ("seq_len" if conditioner == "bert" else "length") + "=8",
                     "data=image_folder", f"data.path={tmp_path / 'shards'}", "image_size=8",
                     "trainer.latent_cache=true", "trainer.val_split=train")
    assert json.loads((run / "latent_cache" / "meta.json").read_text())["keys"] == ["caption"]
    out = sample(pipeline, tmp_path / "t2i.png", "--prompt", "a cat", "--cond", "caption=a dog sitting",
                 "--guidance-scale", "3")
    assert out.returncode == 0, out.stderr[-3000:]
    # the conditioner's warnings are one line each, as the CLI's own (no file, line or source)
    out = sample(pipeline, tmp_path / "long.png", "--prompt", " ".join(["cat"] * 20))
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stderr.startswith("ldmkit sample: warning: ") and "1 prompt(s) in this batch exceed 8 tokens" in out.stderr
    assert "UserWarning" not in out.stderr and ".py:" not in out.stderr and len(out.stderr.splitlines()) == 1
    assert Image.open(tmp_path / "t2i.png").size == (grid_size(2, 8), 2 + 8 + 2)
    # the prompts in the order given, --prompt and --cond caption= alike: sample i is the i-th
    captions = [e["caption"] for e in json.loads((tmp_path / "t2i.json").read_text())["images"]]
    assert captions == ["a cat", "a dog sitting"]
    if conditioner == "frozen_text":  # trained through the real trainer, the encoder is untouched
        from ldmkit.pipeline import Pipeline
        from ldmkit_text import FrozenTextConditioner

        trained = Pipeline.load(pipeline).conditioner.state_dict()
        pristine = FrozenTextConditioner(max_length=8).state_dict()
        assert trained.keys() == pristine.keys()
        assert all(torch.equal(trained[k], pristine[k]) for k in pristine)
