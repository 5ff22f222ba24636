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


@pytest.mark.parametrize("given_state", [False, True], ids=["own", "given"])
def test_re_saving_embedded_removes_the_manifest(tmp_path, given_state):
    # also with a ``state`` handed in (the trainer's EMA export, a gathered sharded model)
    pipe = make()
    pipe.save(tmp_path / "p")
    assert (tmp_path / "p" / FROZEN_FILE).exists()
    pipe.save(tmp_path / "p", embed_frozen=True, state=pipe.state_dict() if given_state else None)
    assert not (tmp_path / "p" / FROZEN_FILE).exists()
    torch.testing.assert_close(sample(Pipeline.load(tmp_path / "p")), sample(pipe))


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
        FrozenReferenceError, match=r"conditioner\.encoder changed since it was saved"
    ):
        Pipeline.load(tmp_path / "p")


def test_changed_tokenizer_files_are_refused_naming_them(tmp_path, model_copy):
    """Before: the hash covered weight files only, so a source whose tokenizer changed (here:
    no more lowercasing, so "A Red Apple" becomes other tokens) loaded silently and gave other
    conditions for the same prompts."""
    folder = tmp_path / "retokenized"
    shutil.copytree(model_copy, folder)
    make(folder).save(tmp_path / "p")
    Pipeline.load(tmp_path / "p")  # unchanged: loads
    assert json.loads((tmp_path / "p" / FROZEN_FILE).read_text())["parts"]["conditioner.encoder"]["files_sha256"]
    for name in ("tokenizer.json", "tokenizer_config.json"):
        text = (folder / name).read_text()
        (folder / name).write_text(text.replace('"lowercase": true', '"lowercase": false')
                                   .replace('"do_lower_case": true', '"do_lower_case": false'))
    with pytest.raises(FrozenReferenceError, match=r"tokenizer or config files of conditioner\.encoder changed"):
        Pipeline.load(tmp_path / "p")
    saved = json.loads((tmp_path / "p" / FROZEN_FILE).read_text())
    del saved["parts"]["conditioner.encoder"]["files_sha256"]  # a folder saved before: weights only
    (tmp_path / "p" / FROZEN_FILE).write_text(json.dumps(saved))
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


# -- training checkpoints --------------------------------------------------------------------


def train_cfg(tmp_path, *extra):
    from ldmkit.config import compose_config

    return compose_config([
        "stage=ldm", "trainer=ldm_tiny", "first_stage=identity", "denoiser=unet_tiny",
        "conditioner=frozen_text", "sampler=ddim", "image_size=8", f"run_dir={tmp_path / 'run'}",
        *extra,
    ])


def captions(split, epoch):
    gen = torch.Generator().manual_seed(100 * epoch + (split == "train"))
    words = ["a red apple", "a blue car", "a green tree", "a black cat"]
    for i in range(4):
        yield {"image": torch.rand(4, 3, 8, 8, generator=gen) * 2 - 1,
               "caption": [words[(i + j) % 4] for j in range(4)]}


def test_training_checkpoints_keep_the_frozen_encoder_by_reference(tmp_path):
    from ldmkit.training import train
    from ldmkit.training.checkpoint import CheckpointManager, read_safetensors
    from ldmkit.weights import load_component_weights

    run = train(train_cfg(tmp_path), data=captions)
    last = CheckpointManager(run / "checkpoints").latest(verify=True)  # frozen.json is checksummed
    manifest = json.loads((last.path / FROZEN_FILE).read_text())
    assert list(manifest["parts"]) == ["conditioner.encoder"]
    weights = read_safetensors(last.model_file)
    assert not [k for k in weights if k.startswith("conditioner.encoder.")]
    assert [k for k in weights if k.startswith("denoiser.")]
    assert not (run / "pipeline" / "model.safetensors").stat().st_size > 20e6  # no 90 MB copy
    # a component loads from the run through checkpoint: (its exported pipeline/, the EMA
    # weights), taking the encoder from its source; and from the checkpoint folder alike
    exported = read_safetensors(run / "pipeline" / "model.safetensors")
    for source in (run, last.path):
        fresh = make()
        load_component_weights(fresh.conditioner, source, "conditioner")
        load_component_weights(fresh.denoiser, source, "denoiser")
        torch.testing.assert_close(fresh.denoiser.state_dict(), {
            k[len("denoiser."):]: v for k, v in exported.items() if k.startswith("denoiser.")}, atol=0, rtol=0)

    embedded = train(train_cfg(tmp_path / "e", "trainer.embed_frozen=true"), data=captions)
    last_e = CheckpointManager(embedded / "checkpoints").latest()
    assert not (last_e.path / FROZEN_FILE).exists()
    encoder = [k for k in read_safetensors(last_e.model_file) if k.startswith("conditioner.encoder.")]
    assert len(encoder) == len(fresh.conditioner.encoder.state_dict())


def test_resume_from_a_reference_checkpoint_is_exact(tmp_path):
    from ldmkit.training import train
    from ldmkit.training.checkpoint import CheckpointManager, read_safetensors

    straight = train(train_cfg(tmp_path / "a"), data=captions)
    train(train_cfg(tmp_path / "b", "trainer.max_steps=3"), data=captions)
    resumed = train(train_cfg(tmp_path / "b"), data=captions)
    a = read_safetensors(CheckpointManager(straight / "checkpoints").latest().model_file)
    b = read_safetensors(CheckpointManager(resumed / "checkpoints").latest().model_file)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0, msg=key)


def test_resume_refuses_a_changed_source_naming_it(tmp_path, model_copy):
    from transformers import AutoModel

    from ldmkit.training import train

    folder = tmp_path / "encoder"
    shutil.copytree(model_copy, folder)
    cfg = train_cfg(tmp_path, "trainer.max_steps=3", f"conditioner.name_or_path={folder}")
    train(cfg, data=captions)
    model = AutoModel.from_pretrained(str(folder), local_files_only=True)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    model.save_pretrained(str(folder))
    with pytest.raises(FrozenReferenceError, match=r"step_000000003: the frozen weights of conditioner\.encoder changed"):
        train(train_cfg(tmp_path, f"conditioner.name_or_path={folder}"), data=captions)
