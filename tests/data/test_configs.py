"""Every conf/data option is a valid loader config whose prepare options its source accepts."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ldmkit.data import SOURCES, build_dataloader, data_config, ensure_prepared, prepare
from ldmkit.data.loader import transform_from

CONF = Path(__file__).resolve().parents[2] / "conf" / "data"
OPTIONS = sorted(p.stem for p in CONF.glob("*.yaml"))
COMMON = set(inspect.signature(prepare).parameters) - {"source", "out", "source_options"}


def load(option: str, **root):
    # the data node interpolates top-level keys (image_size), as in the composed config
    cfg = OmegaConf.merge(
        {"image_size": 24, **root}, {"data": OmegaConf.load(CONF / f"{option}.yaml")}
    )
    return cfg.data


def test_all_sources_have_a_config():
    assert set(SOURCES) <= set(OPTIONS)


@pytest.mark.parametrize("option", OPTIONS)
def test_data_option_is_a_valid_loader_config(option):
    cfg = data_config(load(option))
    assert cfg["image_size"] == 24 and cfg["path"] == f"data/{option}"
    transform_from(cfg)
    source = SOURCES[cfg["source"]]
    assert set(cfg["prepare"]) <= set(source.options) | COMMON


def test_ensure_prepared_then_load(tmp_path, image_folder):
    root, expected = image_folder
    data = load("image_folder")
    data.path = str(tmp_path / "prepared")
    data.prepare = {"path": str(root), "progress": False}
    manifest = ensure_prepared(data)
    assert manifest.splits["train"].num_samples == len(expected)
    assert ensure_prepared(data).splits == manifest.splits  # already there: read, not rewritten
    batch = next(iter(build_dataloader(data, batch_size=4)))
    assert batch["image"].shape == (4, 3, 24, 24)
