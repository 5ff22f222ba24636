"""Frozen pretrained parts are saved by reference (ldmkit.frozen): the pipeline folder stays
small, loads to the same model, embeds on request, and fails in one line naming the source
when the source is gone or changed."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import ldmkit
from ldmkit.frozen import FROZEN_FILE, FrozenReferenceError, frozen_parts
from ldmkit.pipeline import Pipeline

pytest.importorskip("transformers")


def make(name_or_path=None):
    torch.manual_seed(0)
    overrides = [
        "conditioner=frozen_text",
        "first_stage=identity",
        "denoiser=unet_tiny",
        "image_size=8",
        "sampler=ddim",
        "sampler.steps=2",
    ]
    if name_or_path is not None:
        overrides.append(f"conditioner.name_or_path={name_or_path}")
    return ldmkit.compose(overrides=overrides).eval()


@pytest.fixture(scope="module")
def model_copy(tmp_path_factory):
    """A private copy of the offline MiniLM folder, so the tests may delete or change it."""
    from ldmkit_text.tokenizer import default_model_dir

    target = tmp_path_factory.mktemp("minilm") / "model"
    shutil.copytree(default_model_dir(), target)
    return target


def sample(pipe):
    return pipe.sample(
        {"caption": ["a red apple", "a blue car"]}, seed=0, guidance_scale=2.0, precision="fp32"
    )


def test_saved_by_reference_by_default_and_loads_the_same(tmp_path):
    pipe = make()
    assert list(frozen_parts(pipe)) == ["conditioner.encoder"]
    small = pipe.save(tmp_path / "ref")
    big = pipe.save(tmp_path / "embedded", embed_frozen=True)
    manifest = json.loads((small / FROZEN_FILE).read_text())
    assert (
        list(manifest["parts"]) == ["conditioner.encoder"]
        and len(manifest["parts"]["conditioner.encoder"]["sha256"]) == 64
    )
    assert not (big / FROZEN_FILE).exists()
    ref_size, big_size = ((d / "model.safetensors").stat().st_size for d in (small, big))
    encoder_bytes = sum(p.numel() * p.element_size() for p in pipe.conditioner.encoder.parameters())
    assert big_size - ref_size >= 0.9 * encoder_bytes  # the encoder is not copied
    reference = sample(pipe)
    for folder in (small, big):
        torch.testing.assert_close(sample(Pipeline.load(folder)), reference)


def test_re_saving_embedded_removes_the_manifest(tmp_path):
    pipe = make()
    pipe.save(tmp_path / "p")
    pipe.save(tmp_path / "p", embed_frozen=True)
    assert not (tmp_path / "p" / FROZEN_FILE).exists()
    Pipeline.load(tmp_path / "p")


def test_a_changed_source_is_refused_naming_it(tmp_path, model_copy):
    folder = tmp_path / "changed"
    shutil.copytree(model_copy, folder)
    make(folder).save(tmp_path / "p")
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(folder), local_files_only=True)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    model.save_pretrained(str(folder))
    with pytest.raises(
        FrozenReferenceError, match=r"conditioner\.encoder changed since the pipeline was saved"
    ):
        Pipeline.load(tmp_path / "p")


def test_a_missing_source_is_one_clear_error(tmp_path, model_copy):
    folder = tmp_path / "gone"
    shutil.copytree(model_copy, folder)
    make(folder).save(tmp_path / "p")
    shutil.rmtree(folder)
    with pytest.raises(
        FrozenReferenceError, match=rf"conditioner\.encoder from {folder}.*embed_frozen=True"
    ):
        Pipeline.load(tmp_path / "p")


def test_a_trainable_part_cannot_be_a_reference(tmp_path):
    pipe = make()
    pipe.conditioner.encoder.requires_grad_(True)
    with pytest.raises(FrozenReferenceError, match="has trainable parameters"):
        pipe.save(tmp_path / "p")
    pipe.save(tmp_path / "p", embed_frozen=True)  # embedding always works
