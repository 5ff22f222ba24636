"""The stage-1 training loop on in-memory data."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from ldmkit.config import ConfigError
from ldmkit.training import TrainingDivergedError, TrainingError, TrainingWarning, train
from ldmkit.training.checkpoint import CheckpointManager
from ldmkit.training.logger import read_metrics


def test_run_writes_checkpoints_logs_grids(tiny_cfg, image_data, tmp_path):
    cfg = tiny_cfg("trainer.tensorboard=true")
    run = train(cfg, data=image_data())
    assert [c.step for c in CheckpointManager(run / "checkpoints").list()] == [10, 20]
    weights = load_file(run / "checkpoints/step_000000020/model.safetensors")
    assert "first_stage.decoder.conv_out.weight" in weights
    extra = load_file(run / "checkpoints/step_000000020/training.safetensors")
    assert "loss.logvar" in extra and "loss.discriminator.main.0.weight" in extra
    assert (run / "config.yaml").is_file() and (run / "checkpoints/step_000000020/config.yaml").is_file()
    rows = read_metrics(run)
    train_rows = [r for r in rows if "train/loss" in r]
    assert [int(r["step"]) for r in train_rows] == [5, 10, 15, 20]
    assert "train/g_loss" not in train_rows[1] and "train/g_loss" in train_rows[2]  # disc_start=10
    assert any("val/psnr" in r for r in rows)
    assert sorted(p.name for p in (run / "images").iterdir()) == [
        "autoencoder_step_000000010.png", "autoencoder_step_000000020.png"]
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))


def _weights(run, step):
    return load_file(run / f"checkpoints/step_{step:09d}/model.safetensors")


@pytest.mark.parametrize("first_stage", [
    ("first_stage=kl_tiny",),  # posterior samples draw from the RNG every step
    ("first_stage=vq_tiny", "first_stage.dead_code_threshold=0.5"),  # dead-code restarts do
])
def test_resume_replays_the_uninterrupted_run_exactly(tiny_cfg, image_data, first_stage):
    # weights, optimizers, RNG and the data position all restored; the GAN is on from step 4
    common = (*first_stage, "trainer.max_steps=16", "trainer.checkpoint_every=6",
              "trainer.val_every=4", "trainer.loss.disc_start=4")
    straight = train(tiny_cfg(*common, run="straight"), data=image_data(n=20))
    train(tiny_cfg(*common, "trainer.max_steps=6", run="resumed"), data=image_data(n=20))
    resumed = train(tiny_cfg(*common, run="resumed"), data=image_data(n=20))
    a, b = _weights(straight, 16), _weights(resumed, 16)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    steps = [int(r["step"]) for r in read_metrics(resumed) if "train/loss" in r]
    assert steps == sorted(set(steps))  # every step logged once


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_cfg, image_data):
    cfg = tiny_cfg("trainer.max_steps=10")
    run = train(cfg, data=image_data())
    before = _weights(run, 10)

    def poisoned(split, epoch):
        return [{"image": torch.full((4, 3, 16, 16), float("nan"))}]

    with pytest.raises(TrainingDivergedError, match="step 10.*step_000000010 is intact"):
        train(tiny_cfg("trainer.max_steps=20"), data=poisoned)
    latest = CheckpointManager(run / "checkpoints").latest()
    assert latest.step == 10
    after = _weights(run, 10)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_resume_refuses_a_different_first_stage(tiny_cfg, image_data):
    train(tiny_cfg("trainer.max_steps=10"), data=image_data())
    with pytest.raises(TrainingError, match=r"different model: first_stage\.ch: 8 -> 16; first_stage, trainer\.loss\.disc_ndf, .*, seed cannot"):
        train(tiny_cfg("first_stage.ch=16", "trainer.max_steps=20"), data=image_data())
    with pytest.raises(TrainingError, match="already holds checkpoints"):
        train(tiny_cfg("trainer.resume=false"), data=image_data())


@pytest.mark.parametrize(("override", "change"), [
    ("trainer.loss.disc_ndf=16", r"trainer\.loss\.disc_ndf: 8 -> 16"),
    ("trainer.loss.disc_num_layers=3", r"trainer\.loss\.disc_num_layers: 2 -> 3"),
    ("trainer.loss.learn_logvar=true", r"trainer\.loss\.learn_logvar: False -> True"),
])
def test_resume_refuses_another_discriminator_or_logvar(tiny_cfg, image_data, override, change):
    # the discriminator's shape and the optimizers' parameters are the checkpoint's: a change
    # is one error naming the key (it was a state_dict / param-group traceback)
    train(tiny_cfg("trainer.max_steps=2"), data=image_data())
    with pytest.raises(TrainingError, match=f"different model: {change}; "):
        train(tiny_cfg(override, "trainer.max_steps=4"), data=image_data())


def test_resume_with_other_trained_parameters_says_how_to_go_on(tiny_cfg, image_data):
    # trainer.frozen changes what the optimizer holds: one line (it was torch's param-group
    # traceback), and its advice works
    run = train(tiny_cfg("trainer.max_steps=2"), data=image_data())
    frozen = "trainer.frozen=[first_stage.encoder.*]"
    with pytest.raises(TrainingError, match=r"autoencoder optimizer's state for other parameters .*"
                                            r"trainer\.trainable / trainer\.frozen"):
        train(tiny_cfg(frozen, "trainer.max_steps=4"), data=image_data())
    checkpoint = CheckpointManager(run / "checkpoints").latest().path
    train(tiny_cfg(frozen, "trainer.max_steps=2", f"trainer.init_from={checkpoint}", run="next"), data=image_data())


def test_an_option_stage_1_does_not_use_is_a_training_warning(tiny_cfg, image_data):
    # a TrainingWarning: `ldmkit train` prints it as one line (a UserWarning came with the
    # source line of the engine)
    with pytest.warns(TrainingWarning, match=r"trainer option\(s\) trainer\.ema( \(did you mean [^)]*\))? are not used by stage=autoencoder"):
        train(tiny_cfg("+trainer.ema.enabled=true", "trainer.max_steps=1"), data=image_data())


def test_an_interpolation_in_a_checkpoint_config_is_refused(tiny_cfg, image_data, monkeypatch):
    """A run folder someone sent: its checkpoint's config.yaml (checksum updated to match)
    reads an environment variable. Resume and evaluate refuse it naming the file and key;
    before, resume went on and evaluate resolved it."""
    import hashlib
    import json

    from ldmkit.evaluation.autoencoder import load_first_stage
    from ldmkit.training import resolve_checkpoint

    monkeypatch.setenv("UNTRUSTED_TEST_LR", "0.001")
    run = train(tiny_cfg("trainer.max_steps=2"), data=image_data())
    latest = resolve_checkpoint(run)
    text = latest.config_file.read_text()
    assert "  lr: 0.001\n" in text
    latest.config_file.write_text(text.replace("  lr: 0.001\n", "  lr: ${oc.env:UNTRUSTED_TEST_LR}\n"))
    meta = json.loads((latest.path / "meta.json").read_text())
    meta["sha256"]["config.yaml"] = hashlib.sha256(latest.config_file.read_bytes()).hexdigest()
    (latest.path / "meta.json").write_text(json.dumps(meta))
    refused = rf"^{latest.config_file}: trainer\.lr holds the interpolation '\$\{{oc\.env:UNTRUSTED_TEST_LR\}}'"
    with pytest.raises(ConfigError, match=refused):
        train(tiny_cfg("trainer.max_steps=4"), data=image_data())
    assert resolve_checkpoint(run).step == 2  # nothing trained, nothing skipped
    with pytest.raises(ConfigError, match=refused):
        load_first_stage(latest, device=torch.device("cpu"))


def test_bad_data_and_stage_are_named(tiny_cfg, image_data):
    with pytest.raises(TrainingError, match="data has 1-channel images.*first_stage.in_channels"):
        train(tiny_cfg(), data=image_data(channels=1))
    with pytest.raises(TrainingError, match="no trainable parameters"):
        train(tiny_cfg("first_stage=identity", run="identity"), data=image_data())
    with pytest.raises(ConfigError, match="unknown stage 'gan'"):
        train(tiny_cfg("stage=gan"))


def test_time_limit_stops_and_checkpoints(tiny_cfg, image_data):
    run = train(tiny_cfg("trainer.max_steps=100000", "trainer.max_minutes=0.0001"), data=image_data())
    latest = CheckpointManager(run / "checkpoints").latest()
    assert latest is not None and latest.step < 100000


def test_a_rerun_with_nothing_left_to_train_says_so(tiny_cfg, image_data):
    """Before: a finished run started again exited 0 without a word on why nothing trained."""
    run = train(tiny_cfg("trainer.max_steps=2"), data=image_data())
    with pytest.warns(TrainingWarning, match=r"^nothing to train: the run is at step 2 and trainer.max_steps=2 is reached; raise it to train on$"):
        assert train(tiny_cfg("trainer.max_steps=2"), data=image_data()) == run
    with pytest.warns(TrainingWarning, match=r"its time budget \(trainer.max_minutes=1e-06\) is used up"):
        train(tiny_cfg("trainer.max_steps=5", "trainer.max_minutes=0.000001"), data=image_data())
