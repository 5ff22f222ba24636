"""Your own folder without stitching presets (issue 28 item 4): ``experiment=folder_*`` read the
dataset's facts from its ``manifest.json`` (``${manifest:KEY}``), a preset's conditioner is
switched with ``conditioner=NAME`` alone, and ``--config-dir`` / ``LDMKIT_CONFIG_PATH`` add the
user's own config folders."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from PIL import Image

from ldmkit.cli import main
from ldmkit.config import CONFIG_PATH_ENV, ConfigError, compose_config, config_dir
from ldmkit.data import prepare
from ldmkit.pipeline import build_pipeline
from tests.conftest import ldmkit_cli
from tests.data.conftest import CLASSES, make_image_folder

ROOT = Path(__file__).resolve().parents[1]
# main before the experiments' component keys moved into group options (conf/<group>/*.yaml)
BEFORE_OPTIONS = "9e271c4"
TINY = ["trainer.max_steps=1", "trainer.batch_size=2", "trainer.progress=false"]
TINY_LDM = [*TINY, "trainer.sample_steps=1", "trainer.sample_count=2"]


def image_folders(root: Path) -> tuple[Path, Path]:
    """``root/photos`` (RGB, class folders, some captions) and ``root/gray`` (the same, mode L)."""
    photos, gray = root / "photos", root / "gray"
    make_image_folder(photos, per_class=3, size=(12, 12))
    for path in photos.rglob("*"):
        target = gray / path.relative_to(photos)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif path.suffix == ".png":
            Image.open(path).convert("L").save(target)
        else:
            target.write_bytes(path.read_bytes())
    return photos, gray


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> dict[str, Path]:
    """``photos``: RGB with a val split; ``gray``: mode L, train only."""
    root = tmp_path_factory.mktemp("folders")
    photos, gray = image_folders(root)
    prepare("image_folder", root / "data/photos", path=str(photos), val_fraction=0.3, progress=False)
    prepare("image_folder", root / "data/gray", path=str(gray), progress=False)
    return {"root": root, "photos": root / "data/photos", "gray": root / "data/gray"}


def composed(*overrides: str, **kwargs) -> dict:
    cfg = compose_config(list(overrides), **kwargs)
    return OmegaConf.to_container(cfg, resolve=True)


def test_folder_class_reads_classes_splits_and_channels_from_the_manifest(prepared):
    cfg = composed("experiment=folder_class", f"data.path={prepared['photos']}")
    assert cfg["conditioner"]["num_classes"] == len(CLASSES)
    assert cfg["conditioner"]["class_names"] == list(CLASSES)
    assert cfg["trainer"]["val_split"] == "val"
    assert cfg["data"]["channels"] == cfg["first_stage"]["in_channels"] == cfg["first_stage"]["out_ch"] == 3
    gray = composed("experiment=folder_autoencoder", f"data.path={prepared['gray']}")
    assert gray["data"]["channels"] == gray["first_stage"]["in_channels"] == gray["first_stage"]["out_ch"] == 1
    assert gray["trainer"]["val_split"] is None and gray["eval"]["split"] is None  # no held-out split


@pytest.mark.parametrize("experiment", ["folder_class", "folder_class_gpu", "fmnist_ldm_kl_f4", "t2i_minilm"])
def test_switching_a_presets_conditioner_needs_no_deletions(prepared, experiment):
    cfg = composed(f"experiment={experiment}", f"data.path={prepared['photos']}", "conditioner=none")
    assert cfg["conditioner"] == {"name": "none"}


def test_gpu_variants_compose_with_the_stage_one_run_they_read(prepared):
    cfg = composed("experiment=folder_text_gpu", f"data.path={prepared['gray']}")
    assert cfg["image_size"] == 256 and cfg["first_stage"]["in_channels"] == 1
    assert cfg["first_stage"]["checkpoint"] == "runs/folder_autoencoder_gpu"
    assert cfg["denoiser"]["model_channels"] == 224 and cfg["conditioner"]["name"] == "frozen_text"
    stage_one = composed("experiment=folder_autoencoder_gpu", f"data.path={prepared['gray']}")
    assert stage_one["run_dir"] == "runs/folder_autoencoder_gpu" and stage_one["stage"] == "autoencoder"


def test_missing_stage_one_run_names_the_command(prepared, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = compose_config(["experiment=folder_class", f"data.path={prepared['photos']}"])
    with pytest.raises(ConfigError) as err:
        build_pipeline(cfg)
    assert str(err.value) == (
        "first_stage.checkpoint=runs/folder_autoencoder does not exist: it is the stage-1 run of "
        f"experiment=folder_autoencoder; train that first: ldmkit train experiment=folder_autoencoder "
        f"data.path={prepared['photos']}"
    )


def test_missing_manifest_is_one_line(tmp_path):
    done = ldmkit_cli("train", "experiment=folder_class", f"data.path={tmp_path / 'photos'}")
    assert done.returncode == 1, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert f"data.path={tmp_path / 'photos'}" in done.stderr
    assert f"{tmp_path / 'photos' / 'manifest.json'} is missing" in done.stderr
    assert f"ldmkit data prepare image_folder path=YOUR_IMAGES out={tmp_path / 'photos'}" in done.stderr
    classless = tmp_path / "flat"
    make_image_folder(tmp_path / "images", per_class=1)
    for path in (tmp_path / "images").rglob("*.png"):  # images directly under the root: label -1
        path.rename(tmp_path / "images" / f"{path.parent.name}_{path.name}")
    prepare("image_folder", classless, path=str(tmp_path / "images"), progress=False)
    with pytest.raises(ConfigError, match="has no classes .*experiment=folder_uncond"):
        compose_config(["experiment=folder_class", f"data.path={classless}"])


def _git_show(path: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(ROOT), "show", f"{BEFORE_OPTIONS}:{path}"],
                              capture_output=True, text=True, timeout=30)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def test_existing_experiments_compose_to_what_they_did(tmp_path):
    """Every experiment of main before the change, written as it was, composes to the same
    config as the converted one (``choices`` aside: they name the new group options)."""
    # folder_* are new; scenes_* now read their class count from the prepared data (8 before;
    # tests/test_all_configs.py::test_scenes_experiments_take_the_class_count_of_the_prepared_scenes)
    names = sorted(p.stem for p in (config_dir() / "experiment").glob("*.yaml")
                   if not p.stem.startswith(("folder_", "scenes_")))  # fmt: skip
    (tmp_path / "experiment").mkdir()
    for name in names:
        text = _git_show(f"conf/experiment/{name}.yaml")
        if text is None:
            pytest.skip(f"needs the git history ({BEFORE_OPTIONS})")
        (tmp_path / "experiment" / f"before_{name}.yaml").write_text(text)
    for name in names:
        now = composed(f"experiment={name}")
        before = composed(f"experiment=before_{name}", config_dirs=[tmp_path])
        now.pop("choices"), before.pop("choices")
        assert now == before, name


# -- the user's own config folders ----------------------------------------------------------
MINE = """\
# @package _global_
defaults:
  - override /conditioner: my_classes
image_size: 24
"""
MY_CLASSES = """\
defaults:
  - class_label
  - _self_
num_classes: 7
"""


@pytest.fixture
def my_configs(tmp_path) -> Path:
    folder = tmp_path / "my_conf"
    (folder / "experiment").mkdir(parents=True)
    (folder / "conditioner").mkdir()
    (folder / "experiment" / "mine.yaml").write_text(MINE)
    (folder / "conditioner" / "my_classes.yaml").write_text(MY_CLASSES)
    return folder


def test_config_dir_flag_adds_experiments_and_group_options(my_configs, tmp_path, capsys):
    done = ldmkit_cli("train", "--config-dir", str(my_configs), "experiment=mine", "--print-config")
    assert done.returncode == 0, done.stderr
    printed = [done.stdout]
    for command in ("evaluate", "sample"):  # the same parser and composition, in this process
        assert main([command, "--config-dir", str(my_configs), "experiment=mine", "--print-config"]) == 0
        printed.append(capsys.readouterr().out)
    for text in printed:
        cfg = OmegaConf.create(text)
        assert cfg.image_size == 24 and cfg.conditioner.num_classes == 7 and cfg.choices.experiment == "mine"
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--config-dir", str(tmp_path / "nope"), "experiment=mine"])
    error = capsys.readouterr().err
    assert exit_.value.code == 2 and error.count("\n") == 1, error
    assert f"argument --config-dir: no such directory: {tmp_path / 'nope'}" in error


def test_config_path_env(my_configs, tmp_path, monkeypatch):
    monkeypatch.setenv(CONFIG_PATH_ENV, f"{tmp_path / 'empty'}")
    with pytest.raises(ConfigError, match=f"^{CONFIG_PATH_ENV}: config directory .*empty does not exist$"):
        compose_config(["experiment=mine"])
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv(CONFIG_PATH_ENV, os.pathsep.join([str(tmp_path / "empty"), str(my_configs)]))
    assert compose_config(["experiment=mine"]).conditioner.num_classes == 7


def test_a_user_option_named_like_a_shipped_one_is_refused(my_configs, monkeypatch):
    (my_configs / "experiment" / "folder_class.yaml").write_text(MINE)
    monkeypatch.setenv(CONFIG_PATH_ENV, str(my_configs))
    with pytest.raises(ConfigError, match=r"config option experiment=folder_class of .* is also .*folder_class.yaml; "
                                          r"rename yours \(e.g. experiment/my_folder_class.yaml\)"):
        compose_config(["experiment=mine"])


# -- the real commands, as a user types them ------------------------------------------------
@pytest.mark.slow
def test_prepare_then_both_stages_as_written(tmp_path):
    photos, gray = image_folders(tmp_path / "images")
    for folder, extra in ((photos, ["val_fraction=0.3"]), (gray, [])):
        done = ldmkit_cli("data", "prepare", "image_folder", f"path={folder}", f"out=data/{folder.name}",
                          "progress=false", *extra, cwd=tmp_path)  # fmt: skip
        assert done.returncode == 0, done.stderr

    def train(*overrides: str) -> dict:
        done = ldmkit_cli("train", *overrides, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        run = done.stdout.strip().splitlines()[-1].removeprefix("run directory: ")
        return OmegaConf.to_container(OmegaConf.load(tmp_path / run / "config.yaml"))

    first = train("experiment=folder_autoencoder", "data.path=data/photos", *TINY)
    assert first["data"]["channels"] == first["first_stage"]["in_channels"] == 3
    assert first["trainer"]["val_split"] == first["eval"]["split"] == "val"
    second = train("experiment=folder_class", "data.path=data/photos", *TINY_LDM)
    assert second["conditioner"]["num_classes"] == len(CLASSES)
    assert second["conditioner"]["class_names"] == list(CLASSES)
    assert second["trainer"]["val_split"] == "val" and second["run_dir"] == "runs/folder_class"
    assert (tmp_path / "runs/folder_class/pipeline/config.yaml").is_file()
    text = train("experiment=folder_text", "data.path=data/photos", *TINY_LDM)
    assert text["conditioner"]["name"] == "frozen_text"
    gray_first = train("experiment=folder_autoencoder", "data.path=data/gray", "run_dir=runs/gray_autoencoder", *TINY)
    assert gray_first["data"]["channels"] == gray_first["first_stage"]["out_ch"] == 1
    assert gray_first["trainer"]["val_split"] is None
    uncond = train("experiment=folder_uncond", "data.path=data/gray", "first_stage.checkpoint=runs/gray_autoencoder",
                   *TINY_LDM)  # fmt: skip
    assert uncond["conditioner"] == {"name": "none"} and uncond["first_stage"]["in_channels"] == 1
