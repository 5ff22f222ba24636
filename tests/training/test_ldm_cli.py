"""`ldmkit train stage=ldm` end to end through the CLI (real subprocesses, real shards),
with the latent cache, then `ldmkit sample --checkpoint` on the result."""

from __future__ import annotations

import json

from PIL import Image

from ldmkit.data import prepare
from tests.data.conftest import make_image_folder
from tests.test_cli import ldmkit


def test_train_with_latent_cache_then_sample(tmp_path):
    make_image_folder(tmp_path / "images", per_class=4, size=(8, 8))
    prepare("image_folder", tmp_path / "shards", path=str(tmp_path / "images"), shard_size=4, progress=False)
    run = tmp_path / "run"
    common = [
        "stage=ldm", "trainer=ldm_tiny", "first_stage=identity", "denoiser=unet_tiny",
        "conditioner=class_label", "conditioner.num_classes=3", "conditioner.embed_dim=16",
        "data=image_folder", f"data.path={tmp_path / 'shards'}", "image_size=8", f"run_dir={run}",
        "trainer.latent_cache=true", "trainer.val_split=train",
    ]
    out = ldmkit("train", *common)
    assert out.returncode == 0, out.stderr[-3000:]
    meta = json.loads((run / "latent_cache" / "meta.json").read_text())
    assert meta["samples"] == 12
    assert (run / "checkpoints" / "step_000000006").is_dir()

    # a second run with more steps resumes and reuses the cache
    stamp = (run / "latent_cache" / "meta.json").stat().st_mtime_ns
    out = ldmkit("train", *common, "trainer.max_steps=8")
    assert out.returncode == 0, out.stderr[-3000:]
    assert (run / "latent_cache" / "meta.json").stat().st_mtime_ns == stamp
    assert (run / "checkpoints" / "step_000000008").is_dir()

    grid = tmp_path / "samples.png"
    out = ldmkit("sample", "--checkpoint", str(run / "pipeline"), "--labels", "0,1,2,0",
                 "--guidance-scale", "2", "sampler.steps=3", "--out", str(grid), "--no-progress")
    assert out.returncode == 0, out.stderr[-3000:]
    assert Image.open(grid).size == (2 + 2 * 10, 2 + 2 * 10)


def test_changed_model_config_does_not_silently_resume(tmp_path):
    make_image_folder(tmp_path / "images", per_class=2, size=(8, 8))
    prepare("image_folder", tmp_path / "shards", path=str(tmp_path / "images"), shard_size=2, progress=False)
    common = ["stage=ldm", "trainer=ldm_tiny", "first_stage=identity", "data=image_folder",
              f"data.path={tmp_path / 'shards'}", "image_size=8", f"run_dir={tmp_path / 'run'}",
              "trainer.max_steps=3", "trainer.batch_size=2"]
    assert ldmkit("train", *common).returncode == 0
    out = ldmkit("train", *common, "trainer.max_steps=4", "denoiser.model_channels=64")
    assert out.returncode != 0
    assert "denoiser" in out.stderr and "start a new run_dir" in out.stderr


def test_bad_option_value_is_one_clear_line():
    out = ldmkit("sample", "denoiser.model_channels=16", "--print-config")
    assert out.returncode == 0  # composing is fine; building names the component
    out = ldmkit("sample", "denoiser.model_channels=16", "--num-samples", "1", "--no-progress")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "denoiser=unet_tiny: cannot build denoiser 'unet'" in out.stderr


def test_labels_beyond_num_classes_are_one_line_naming_it(tmp_path):
    """The data has 3 classes, the conditioner 2: a ValueError traceback at the first step before."""
    make_image_folder(tmp_path / "images", per_class=2, size=(8, 8))
    prepare("image_folder", tmp_path / "shards", path=str(tmp_path / "images"), shard_size=6, progress=False)
    out = ldmkit("train", "stage=ldm", "trainer=ldm_tiny", "first_stage=identity", "denoiser=unet_tiny",
                 "conditioner=class_label", "conditioner.num_classes=2", "data=image_folder",
                 f"data.path={tmp_path / 'shards'}", "image_size=8", f"run_dir={tmp_path / 'run'}",
                 "trainer.num_threads=1")
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "class labels must be in [0, 2) (conditioner.num_classes=2); got min 0, max 2" in out.stderr
