"""The data position a checkpoint keeps is restored only onto the same data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ldmkit.data import build_dataloader, prepare

from .conftest import loader_cfg, make_image_folder


@pytest.fixture
def shards(tmp_path) -> Path:
    make_image_folder(tmp_path / "images", per_class=4)
    prepare("image_folder", tmp_path / "shards", path=str(tmp_path / "images"), shard_size=3, progress=False)
    return tmp_path / "shards"


def _position(shards: Path) -> dict:
    loader = build_dataloader(loader_cfg(shards), batch_size=2)
    batches = iter(loader)
    next(batches)
    return loader.state_dict()


def test_data_prepared_again_under_the_same_names_is_not_resumed_as_if_unchanged(shards):
    """Before: the identity hashed the shard names only, so shards re-prepared with other
    pixels (same names, same sizes) resumed mid-epoch as if nothing had changed."""
    state = _position(shards)
    assert build_dataloader(loader_cfg(shards), batch_size=2).load_state_dict(state) is None  # same data: exact
    manifest = json.loads((shards / "manifest.json").read_text())
    shard = manifest["splits"]["train"]["shards"][0]
    shard["sha256"] = "0" * 64  # what a re-prepare with other pixels writes: the same name, another checksum
    (shards / "manifest.json").write_text(json.dumps(manifest))
    why = build_dataloader(loader_cfg(shards), batch_size=2).load_state_dict(state)
    assert why is not None and "what the shards hold (their sha256 in manifest.json) changed" in why, why
    assert "starts again from its beginning" in why


def test_a_position_saved_before_the_checksums_were_kept_still_resumes_exactly(shards):
    state = _position(shards)
    del state["content"]
    assert build_dataloader(loader_cfg(shards), batch_size=2).load_state_dict(state) is None
