"""``trainer.trainable`` / ``trainer.frozen``: the parameters left out train not at all —
bit-identical after training, no optimizer state, no EMA — in both stages; a pattern that
matches nothing, or nothing left to train, is one error naming it."""

from __future__ import annotations

import re

import pytest
import torch

from ldmkit.checkpoint_layout import Checkpoint
from ldmkit.config import compose_config
from ldmkit.pipeline import Pipeline
from ldmkit.safetensors_io import read_safetensors
from ldmkit.training import TrainingError, train
from ldmkit.training.state import load_state
from tests.test_init_from import class_data, ldm_cfg


@pytest.fixture(autouse=True)
def _threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def last_checkpoint(run, step):
    path = run / "checkpoints" / f"step_{step:09d}"
    return read_safetensors(path / "model.safetensors"), read_safetensors(path / "training.safetensors"), \
        load_state(Checkpoint(step, path))  # fmt: skip


def test_stage_two_trains_only_the_matches_and_leaves_the_rest_bit_identical(tmp_path, capsys):
    source = train(ldm_cfg(tmp_path / "source", "trainer.max_steps=3"), data=class_data(10))
    start = Pipeline.load(source / "pipeline").state_dict()
    capsys.readouterr()
    # the decoder half of the UNet and the class embedding, less the decoder's attention
    run = train(ldm_cfg(tmp_path / "run", f"trainer.init_from={source}",
                        "trainer.trainable=[denoiser.output_blocks, conditioner]",
                        "trainer.frozen=[denoiser.output_blocks.*.transformer_blocks]", "trainer.max_steps=4"),
                data=class_data(10))  # fmt: skip
    err = capsys.readouterr().err
    model, training, state = last_checkpoint(run, 4)
    names = [k for k in model if not k.startswith("first_stage.")]
    trained = [k for k in names if k.startswith(("denoiser.output_blocks.", "conditioner.")) and ".transformer_blocks." not in k]
    assert trained and len(trained) < len(names)
    assert all(torch.equal(model[k], start[k]) for k in names if k not in trained)  # frozen: unchanged
    for part in ("denoiser.output_blocks.", "conditioner."):  # trained: moved
        assert any(not torch.equal(model[k], start[k]) for k in trained if k.startswith(part)), part
    ema = [k for k in training if k.startswith("ema.shadow.")]
    assert sorted(ema) == sorted("ema.shadow." + k.replace(".", "__") for k in trained)  # no EMA of frozen ones
    optimizer = state["optimizers"]["diffusion"]
    assert len(optimizer["param_groups"][0]["params"]) == len(optimizer["state"]) == len(trained)
    total = sum(v.numel() for k, v in start.items() if k.startswith(("denoiser.", "conditioner.")))
    share = sum(model[k].numel() for k in trained)
    assert f"{share:,} of {total:,} parameters train" in err
    exported = Pipeline.load(run / "pipeline")
    assert all(torch.equal(v, start[k]) for k, v in exported.state_dict().items() if k in names and k not in trained)


def test_stage_one_freezes_the_encoder_by_its_checkpoint_name(tmp_path):
    def cfg(run, *extra):
        return compose_config(["stage=autoencoder", "first_stage=kl_tiny", "trainer=autoencoder_tiny",
                               "trainer.loss.disc_start=1", "trainer.num_threads=1", "trainer.tensorboard=false",
                               "trainer.max_steps=3", "trainer.checkpoint_every=1", f"run_dir={run}", *extra])  # fmt: skip

    run = train(cfg(tmp_path / "run", "trainer.frozen=[first_stage.encoder, loss.discriminator.main.0]"),
                data=class_data(1, size=16))  # fmt: skip
    first, _, _ = last_checkpoint(run, 1)
    last, training, state = last_checkpoint(run, 3)
    encoder = [k for k in first if k.startswith("first_stage.encoder.")]
    assert encoder and all(torch.equal(first[k], last[k]) for k in encoder)
    assert not torch.equal(first["first_stage.decoder.conv_out.weight"], last["first_stage.decoder.conv_out.weight"])
    first_disc = read_safetensors(run / "checkpoints" / "step_000000001" / "training.safetensors")
    assert torch.equal(first_disc["loss.discriminator.main.0.weight"], training["loss.discriminator.main.0.weight"])
    trainable_first_stage = sum(1 for k in first if k.startswith("first_stage.") and k not in encoder)
    autoencoder = state["optimizers"]["autoencoder"]
    assert len(autoencoder["param_groups"][0]["params"]) == trainable_first_stage  # loss.logvar is not learned (the paper)


@pytest.mark.parametrize(
    ("patterns", "fix"),
    [
        (["trainer.trainable=[first_stage.decoder]"],
         "add loss.discriminator to trainer.trainable (trainer.trainable=[first_stage.decoder, loss.discriminator])"),
        (["trainer.frozen=[first_stage.encoder,loss.discriminator]"], "leave loss.discriminator out of trainer.frozen"),
    ],
)  # fmt: skip
def test_a_stage_one_pattern_leaving_the_discriminator_nothing_says_how_to_keep_it(tmp_path, patterns, fix):
    """The decoder-only fine-tune a user tries first was refused with no way forward."""
    with pytest.raises(TrainingError) as err:
        train(compose_config([*_stage_one(tmp_path / "run"), *patterns]), data=class_data(1, size=16))
    assert str(err.value) == ("trainer.trainable/trainer.frozen leave nothing of the discriminator (loss.discriminator.*) "
                              f"to train, and stage=autoencoder trains it beside the first stage: {fix}")
    if "trainable" in patterns[0]:  # the fix given works
        fixed = patterns[0].replace("first_stage.decoder]", "first_stage.decoder,loss.discriminator]")
        train(compose_config([*_stage_one(tmp_path / "fixed"), fixed]), data=class_data(1, size=16))


def _stage_one(run):
    return ["stage=autoencoder", "first_stage=kl_tiny", "trainer=autoencoder_tiny", "trainer.num_threads=1",
            "trainer.max_steps=1", f"run_dir={run}"]  # fmt: skip


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer.trainable=[denoiser.nothing*]"], r"trainer.trainable: pattern 'denoiser.nothing\*' matches none"),
        (["trainer.frozen=[first_stage]"], r"trainer.frozen: pattern 'first_stage' matches none of the parameters stage=ldm trains"),
        (["trainer.trainable=[conditioner]", "trainer.frozen=[conditioner.embedding]"], r"leaves nothing of stage=ldm to train"),
    ],
)
def test_a_pattern_that_matches_nothing_or_leaves_nothing_is_one_line(tmp_path, overrides, message):
    with pytest.raises(TrainingError, match=message) as err:
        train(ldm_cfg(tmp_path / "run", *overrides), data=class_data(10))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_patterns_are_checked_with_the_config(tmp_path):
    from ldmkit.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape("trainer.frozen")):
        ldm_cfg(tmp_path, "trainer.frozen=5")
