"""Every option of every config group composes, and every component option builds.

Component options are instantiated for real when they are CPU-sized (name contains
'tiny' or 'small', or the component is light and not named 'paper') and on the meta device
otherwise (the
paper-size models): either way the config's keys must match the constructor's arguments.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ldmkit.config import COMPONENT_GROUPS, GROUPS, compose_config, config_dir
from ldmkit.pipeline import build_pipeline
from ldmkit.plugins import _root_directory, get_plugin_manager, reset_plugin_manager


def _options() -> list[tuple[str, str]]:
    reset_plugin_manager()
    roots = [config_dir()] + [_root_directory(r) for r in get_plugin_manager().config_roots()]
    found = set()
    for root in roots:
        for group in GROUPS:
            for path in (Path(root) / group).glob("*.yaml"):
                found.add((group, path.stem))
    return sorted(found)


OPTIONS = _options()
HEAVY = {"first_stage", "denoiser"}


def test_every_group_has_options():
    groups = {g for g, _ in OPTIONS}
    assert set(COMPONENT_GROUPS) <= groups


def _tiny_clip(tmp_path) -> list[str]:
    from ldmkit_text.testing import write_tiny_clip

    return [f"conditioner.name_or_path={write_tiny_clip(tmp_path / 'clip')}"]


def _prepared_folder(tmp_path) -> list[str]:
    from ldmkit.data import prepare
    from tests.data.conftest import make_image_folder

    make_image_folder(tmp_path / "images", per_class=1, size=(8, 8))
    prepare("image_folder", tmp_path / "data", path=str(tmp_path / "images"), progress=False)
    return [f"data.path={tmp_path / 'data'}"]


def _prepared_scenes(tmp_path) -> list[str]:
    from ldmkit.data import prepare
    from tests.data.test_semantic_scenes import make_cutouts

    make_cutouts(tmp_path / "cutouts")
    prepare("semantic_scenes", tmp_path / "scenes", cutouts="folder", path=str(tmp_path / "cutouts"),
            num_classes=3, num_samples=1, val_samples=0, image_size=8, progress=False)  # fmt: skip
    return [f"data.path={tmp_path / 'scenes'}"]


# options with a mandatory local path (`???`) or reading the prepared data's manifest.json
# (`${manifest:KEY}`): what the test fills in
REQUIRED = {
    ("conditioner", "clip_text"): _tiny_clip,
    ("conditioner", "class_label_manifest"): _prepared_folder,
    ("conditioner", "semantic_map_manifest"): _prepared_scenes,
    ("conditioner", "semantic_map_f2_manifest"): _prepared_scenes,
    ("experiment", "scenes_semantic"): _prepared_scenes,
    ("experiment", "scenes_semantic_f2"): _prepared_scenes,
    **{("experiment", option): _prepared_folder for group, option in OPTIONS
       if group == "experiment" and option.startswith("folder_")},
}


@pytest.mark.parametrize("experiment", ["scenes_semantic", "scenes_semantic_f2"])
def test_scenes_experiments_take_the_class_count_of_the_prepared_scenes(experiment, tmp_path):
    cfg = compose_config([f"experiment={experiment}", *_prepared_scenes(tmp_path)])
    assert cfg.conditioner.num_classes == 3  # prepared with num_classes=3 (the preset's data: 8)


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_and_builds(group, option, tmp_path):
    overrides = [f"{group}={option}"]
    if (group, option) in REQUIRED:
        overrides += REQUIRED[group, option](tmp_path)
    if group == "experiment":
        cfg = compose_config(overrides)
        assert cfg is not None
        return
    cfg = compose_config(overrides)
    if group not in COMPONENT_GROUPS:
        assert cfg[group] is not None
        return
    small = (group not in HEAVY and "paper" not in option) or "tiny" in option or "small" in option \
        or option == "identity"
    if small:
        pipe = build_pipeline(cfg)
    else:
        with torch.device("meta"):
            pipe = build_pipeline(cfg)
    assert getattr(pipe, group) is not None


@pytest.mark.parametrize("option", [o for g, o in OPTIONS if g == "sampler"])
@pytest.mark.parametrize("spacing", ["karras", "exponential"])
def test_sigma_grids_build_for_the_sigma_samplers_and_are_refused_by_the_others(option, spacing):
    from ldmkit.config import ConfigError
    from ldmkit.diffusion import SigmaSampler
    from ldmkit.plugins import get_registry

    cfg = compose_config([f"sampler={option}", f"sampler.spacing={spacing}"])
    if issubclass(get_registry().get("sampler", option).factory, SigmaSampler):
        assert build_pipeline(cfg).sampler.spacing == spacing
        return
    with pytest.raises(ConfigError) as err:
        build_pipeline(cfg)
    assert str(err.value).startswith(
        f"sampler={option}: cannot build sampler {option!r}: "
    ) and f"takes no spacing {spacing!r}" in str(err.value)
