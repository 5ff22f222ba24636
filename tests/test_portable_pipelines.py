"""A pipeline folder stands alone: the files its components read when built (bert's custom
vocab, a frozen encoder's config and tokenizer when its weights are embedded) travel inside it
(``Component.pipeline_files``, :mod:`ldmkit.pipeline_files`), and it loads from any working
directory, after the original files moved away."""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml

import ldmkit
from ldmkit.pipeline import Pipeline
from tests.conftest import ldmkit_cli

pytest.importorskip("transformers")

TINY = ["first_stage=identity", "denoiser=unet_tiny", "image_size=8", "sampler=ddim", "sampler.steps=2"]
WORDS = ["a", "red", "blue", "apple", "car", "hi"]


def compose(*overrides):
    torch.manual_seed(0)
    return ldmkit.compose(overrides=[*TINY, *overrides]).eval()


def sample(pipe):
    return pipe.sample({"caption": ["a red apple", "hi"]}, seed=0, guidance_scale=2.0, precision="fp32")


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """Move to a fresh working directory (the one the pipeline was saved from is left)."""

    def go(name="elsewhere"):
        folder = tmp_path / name
        folder.mkdir()
        monkeypatch.chdir(folder)
        return folder

    return go


def write_vocab(path):
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return path


def test_bert_with_a_relative_vocab_loads_and_samples_from_another_directory(tmp_path, elsewhere):
    work = elsewhere("work")
    write_vocab(work / "myvocab.txt")
    pipe = compose("conditioner=bert", "conditioner.max_seq_len=8", "conditioner.vocab=myvocab.txt")
    reference = sample(pipe)
    saved = pipe.save(tmp_path / "pipe")  # no embed_frozen: the vocab is not a frozen weight
    assert pipe.config.conditioner.vocab == "myvocab.txt"  # the pipeline's own config is untouched
    vocab = yaml.safe_load((saved / "config.yaml").read_text())["conditioner"]["vocab"]
    assert not vocab.startswith("/") and (saved / vocab).read_text() == (work / "myvocab.txt").read_text()
    (work / "myvocab.txt").unlink()
    elsewhere()
    loaded = Pipeline.load(saved)
    torch.testing.assert_close(sample(loaded), reference, atol=0, rtol=0)
    # saved again elsewhere from the loaded one (its vocab inside the first folder): still alone
    again = loaded.save(tmp_path / "again")
    shutil.rmtree(saved)
    torch.testing.assert_close(sample(Pipeline.load(again)), reference, atol=0, rtol=0)
    # the CLI, from yet another directory
    other = tmp_path / "other"
    other.mkdir()
    result = ldmkit_cli("sample", "--checkpoint", str(again), "--prompt", "hi", "--no-progress",
                        "--out", str(tmp_path / "s.png"), cwd=other)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "s.png").is_file()


def test_a_folder_saved_before_with_a_cwd_relative_path_still_loads(tmp_path, elsewhere):
    work = elsewhere("work")
    write_vocab(work / "myvocab.txt")
    pipe = compose("conditioner=bert", "conditioner.max_seq_len=8", "conditioner.vocab=myvocab.txt")
    saved = pipe.save(tmp_path / "old")
    # as written before files were carried: the path as typed, nothing beside config.yaml
    cfg = yaml.safe_load((saved / "config.yaml").read_text())
    cfg["conditioner"]["vocab"] = "myvocab.txt"
    (saved / "config.yaml").write_text(yaml.safe_dump(cfg))
    shutil.rmtree(saved / "files")
    (saved / "files.json").unlink()
    torch.testing.assert_close(sample(Pipeline.load(saved)), sample(pipe), atol=0, rtol=0)


def frozen_encoder_stands_alone(tmp_path, elsewhere, source, overrides):
    """Save with embed_frozen=True, move ``source`` away, load from another directory: the same
    samples; the folder carries the small files, not the weights (already in model.safetensors)."""
    pipe = compose(*overrides)
    reference = sample(pipe)
    saved = pipe.save(tmp_path / "pipe", embed_frozen=True)
    carried = [p for p in (saved / "files").rglob("*") if p.is_file()]
    assert carried and not [p for p in carried if p.suffix in (".safetensors", ".bin")]
    assert sum(p.stat().st_size for p in carried) < 2e6
    source.rename(source.with_name("moved"))
    elsewhere()
    torch.testing.assert_close(sample(Pipeline.load(saved)), reference, atol=0, rtol=0)
    result = ldmkit_cli("sample", "--checkpoint", str(saved), "--prompt", "hi", "--no-progress",
                        "--out", str(tmp_path / "s.png"), cwd=tmp_path / "elsewhere")  # fmt: skip
    assert result.returncode == 0, result.stderr
    return saved


def test_frozen_text_embedded_stands_alone(tmp_path, elsewhere):
    from ldmkit_text.tokenizer import default_model_dir

    work = elsewhere("work")
    shutil.copytree(default_model_dir(), work / "minilm")
    frozen_encoder_stands_alone(tmp_path, elsewhere, work / "minilm",
                                ["conditioner=frozen_text", "conditioner.name_or_path=minilm"])  # fmt: skip


def test_clip_text_embedded_stands_alone(tmp_path, elsewhere):
    from ldmkit_text.testing import write_tiny_clip

    clip = write_tiny_clip(tmp_path / "clip")
    frozen_encoder_stands_alone(tmp_path, elsewhere, clip,
                                ["conditioner=clip_text", f"conditioner.name_or_path={clip}"])  # fmt: skip


def test_clip_text_with_a_separate_tokenizer_folder_stands_alone(tmp_path, elsewhere):
    from ldmkit_text.testing import write_tiny_clip

    clip = write_tiny_clip(tmp_path / "clip")
    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(clip / name, tokenizer / name)
    saved = frozen_encoder_stands_alone(
        tmp_path, elsewhere, clip,
        ["conditioner=clip_text", f"conditioner.name_or_path={clip}", f"conditioner.tokenizer_path={tokenizer}"],
    )  # fmt: skip
    shutil.rmtree(tokenizer)
    Pipeline.load(saved)


def captioned_batches(split, epoch):
    """Training data for a tiny text run: two batches of two 8x8 images with captions."""
    gen = torch.Generator().manual_seed(epoch)
    for _ in range(2):
        yield {"image": torch.rand(2, 3, 8, 8, generator=gen) * 2 - 1, "caption": ["a red apple", "hi"]}


def test_a_relative_vocab_is_recorded_absolute_in_the_run(tmp_path, elsewhere):
    from ldmkit.config import compose_config
    from ldmkit.training import train
    from ldmkit.training.checkpoint import CheckpointManager

    work = elsewhere("work")
    write_vocab(work / "myvocab.txt")

    def cfg(steps):
        return compose_config([
            "stage=ldm", "trainer=ldm_tiny", *TINY, "conditioner=bert", "conditioner.max_seq_len=8",
            f"conditioner.vocab={work / 'myvocab.txt'}" if steps > 1 else "conditioner.vocab=myvocab.txt",
            f"run_dir={tmp_path / 'run'}", f"trainer.max_steps={steps}",
        ])  # fmt: skip

    run = train(cfg(1), data=captioned_batches)
    recorded = yaml.safe_load((run / "config.yaml").read_text())["conditioner"]["vocab"]
    assert recorded == str(work / "myvocab.txt")
    checkpoint = CheckpointManager(run / "checkpoints").latest()
    assert yaml.safe_load(checkpoint.config_file.read_text())["conditioner"]["vocab"] == recorded
    elsewhere()  # resumes from another directory, with the path as recorded
    train(cfg(2), data=captioned_batches)
    Pipeline.load(run / "pipeline")


def test_a_run_that_recorded_a_relative_vocab_resumes_with_the_same_command(tmp_path, elsewhere, monkeypatch):
    """Runs before paths were recorded absolute kept ``vocab: myvocab.txt``; resuming from the
    same directory must not see ``myvocab.txt -> /…/myvocab.txt`` as a changed model."""
    from ldmkit import pipeline_files
    from ldmkit.config import compose_config
    from ldmkit.training import train

    work = elsewhere("work")
    write_vocab(work / "myvocab.txt")

    def cfg(steps):
        return compose_config(["stage=ldm", "trainer=ldm_tiny", *TINY, "conditioner=bert", "conditioner.max_seq_len=8",
                               "conditioner.vocab=myvocab.txt", f"run_dir={tmp_path / 'run'}",
                               f"trainer.max_steps={steps}"])  # fmt: skip

    with monkeypatch.context() as before:
        before.setattr(pipeline_files, "absolute_paths", lambda cfg, modules: None)
        run = train(cfg(1), data=captioned_batches)
    assert yaml.safe_load((run / "config.yaml").read_text())["conditioner"]["vocab"] == "myvocab.txt"
    with pytest.warns(Warning) as caught:
        train(cfg(2), data=captioned_batches)
    assert not any("vocab" in str(w.message) for w in caught)
    assert (run / "checkpoints" / "step_000000002").is_dir()


def test_a_pipeline_loads_after_the_stage_one_run_it_names_is_gone(tmp_path):
    """A run's pipeline/ holds its first stage's weights, yet its config.yaml keeps
    first_stage.checkpoint (a stage-1 run, relative to where training ran): moved, deleted or out
    of reach from the working directory, every load failed ("checkpoint r_ae does not exist")."""
    from ldmkit.training import train

    def data(split, epoch):
        gen = torch.Generator().manual_seed(epoch)
        return [{"image": torch.rand(4, 3, 16, 16, generator=gen) * 2 - 1, "label": torch.tensor([0, 1, 2, 3])}]

    common = ["trainer.max_steps=1", "trainer.num_threads=1", "first_stage=kl_tiny", "image_size=16"]
    ae = train(ldmkit.config.compose_config(["stage=autoencoder", "trainer=autoencoder_tiny", *common,
                                             f"run_dir={tmp_path / 'ae'}"]), data=data)  # fmt: skip
    run = train(ldmkit.config.compose_config(["stage=ldm", "trainer=ldm_tiny", "denoiser=unet_tiny", *common,
                                              "conditioner=class_label", f"first_stage.checkpoint={ae}",
                                              f"run_dir={tmp_path / 'ldm'}"]), data=data)  # fmt: skip
    assert yaml.safe_load((run / "pipeline" / "config.yaml").read_text())["first_stage"]["checkpoint"] == str(ae)
    before = Pipeline.load(run / "pipeline").sample({"label": [1, 2]}, seed=0, steps=2, precision="fp32")
    shutil.rmtree(ae)
    after = Pipeline.load(run / "pipeline").sample({"label": [1, 2]}, seed=0, steps=2, precision="fp32")
    assert torch.equal(before, after)
    step = run / "checkpoints" / "step_000000001"
    with pytest.raises(ldmkit.errors.ConfigError) as err:  # was: a ValueError about a missing scale_factor
        Pipeline.load(step)
    assert str(err.value).startswith(f"{step} is a training checkpoint, not a pipeline folder: a stage-2 run's "
                                     f"pipeline is {run / 'pipeline'}")
