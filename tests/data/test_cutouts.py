"""The cutouts source: emoji + Tux Paint stamps with real captions and one shared label set."""

from __future__ import annotations

import pytest

from ldmkit.data import build_dataset, prepare, read_manifest
from ldmkit.data.errors import SourceNotFoundError
from ldmkit.data.sources.cutouts import CATEGORIES, Cutouts, category_of


def test_category_rules_merge_both_collections_and_leave_out_symbols():
    assert category_of("emoji", "Smileys & Emotion", "face-smiling") == "face"
    assert category_of("emoji", "Animals & Nature", "animal-bird") == "animal"
    assert category_of("tuxpaint", "animals", "birds/cartoon") == "animal"
    assert category_of("tuxpaint", "town", "houses/cartoon") == "building"
    assert category_of("tuxpaint", "people", "") == "person"
    assert category_of("tuxpaint", "people", "body_parts") is None
    assert category_of("emoji", "Flags", "country-flag") is None
    assert category_of("emoji", "People & Body", "person-symbol") is None
    assert category_of("tuxpaint", "symbols", "") is None


def test_bad_options_are_errors():
    with pytest.raises(ValueError, match="unknown collection 'clipart'"):
        Cutouts(collections="emoji,clipart")
    with pytest.raises(ValueError, match="holdout"):
        Cutouts(holdout=1.5)


def installed() -> Cutouts:
    try:
        return Cutouts()
    except SourceNotFoundError as exc:
        pytest.skip(f"cutouts needs npm emoji-datasource-google and tuxpaint-stamps-default: {exc}")


def test_val_split_is_stratified_and_disjoint():
    source = installed()
    train, val = source.items("train"), source.items("val")
    assert {i["origin"] for i in train}.isdisjoint(i["origin"] for i in val)
    assert {i["category"] for i in val} == set(CATEGORIES)
    assert {i["collection"] for i in train} == {"emoji", "tuxpaint"}
    assert not any(i["origin"].endswith("_mirror.png") for i in train + val)


def test_prepare_with_limit(tmp_path):
    installed()
    manifest = prepare("cutouts", tmp_path / "c", limit=8, progress=False)
    assert manifest.classes == list(CATEGORIES)
    assert manifest.splits["train"].num_samples == 8 and manifest.splits["val"].num_samples == 8
    assert manifest.image_size == [64, 64] and manifest.image_mode == "RGBA"
    assert read_manifest(tmp_path / "c").classes == list(CATEGORIES)
    dataset = build_dataset({"path": str(tmp_path / "c"), "image_size": 32}, split="val")
    for i in range(len(dataset)):
        sample = dataset[i]
        assert sample["image"].shape == (3, 32, 32)
        assert 0 <= sample["label"] < len(CATEGORIES)
        # real captions: an emoji name or a stamp description, never the category name alone
        assert sample["caption"].strip() and sample["caption"] != CATEGORIES[sample["label"]]
