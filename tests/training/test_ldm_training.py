"""Stage-2 training: runs, resumes exactly, stops on NaN, exports a loadable pipeline."""

from __future__ import annotations

import pytest
import torch

from ldmkit.config import compose_config
from ldmkit.pipeline import Pipeline
from ldmkit.training import TrainingDivergedError, train
from ldmkit.training.checkpoint import CheckpointManager, read_safetensors


def tiny_cfg(tmp_path, *extra):
    return compose_config([
        "stage=ldm", "trainer=ldm_tiny", "first_stage=identity", "denoiser=unet_tiny",
        "conditioner=class_label", "conditioner.embed_dim=16", "sampler=ddim", "image_size=8",
        f"run_dir={tmp_path / 'run'}", *extra,
    ])


def make_data(n_batches=4, batch=4, poison_at=None):
    def data(split, epoch):
        gen = torch.Generator().manual_seed(100 * epoch + (split == "train"))
        for i in range(n_batches):
            images = torch.rand(batch, 3, 8, 8, generator=gen) * 2 - 1
            if poison_at is not None and (epoch * n_batches + i) == poison_at:
                images[0, 0, 0, 0] = float("nan")
            yield {"image": images, "label": torch.randint(0, 10, (batch,), generator=gen)}
    return data


def test_trains_writes_checkpoints_grids_and_a_pipeline(tmp_path):
    run = train(tiny_cfg(tmp_path), data=make_data())
    assert [c.step for c in CheckpointManager(run / "checkpoints").list()] == [3, 6]
    assert sorted(p.name for p in (run / "images").iterdir()) == [
        "ldm_step_000000003.png", "ldm_step_000000006.png"]
    metrics = (run / "metrics.csv").read_text()
    assert "train/loss" in metrics and "val/loss" in metrics
    pipe = Pipeline.load(run / "pipeline")
    images = pipe.sample({"label": [1, 2]}, guidance_scale=2.0, seed=0, steps=2)
    assert images.shape == (2, 3, 8, 8) and torch.isfinite(images).all()


def test_exported_pipeline_holds_the_ema_weights(tmp_path):
    run = train(tiny_cfg(tmp_path), data=make_data())
    exported = read_safetensors(run / "pipeline" / "model.safetensors")
    last = CheckpointManager(run / "checkpoints").latest()
    ema = read_safetensors(last.path / "training.safetensors")
    raw = read_safetensors(last.model_file)
    key = "denoiser.out.2.weight"
    torch.testing.assert_close(exported[key], ema["ema.shadow." + key.replace(".", "__")])
    assert not torch.equal(exported[key], raw[key])


def test_resume_equals_uninterrupted(tmp_path):
    straight = train(tiny_cfg(tmp_path / "a"), data=make_data())
    train(tiny_cfg(tmp_path / "b", "trainer.max_steps=3"), data=make_data())
    resumed = train(tiny_cfg(tmp_path / "b"), data=make_data())
    a = read_safetensors(CheckpointManager(straight / "checkpoints").latest().model_file)
    b = read_safetensors(CheckpointManager(resumed / "checkpoints").latest().model_file)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0, msg=key)


def test_nan_loss_stops_with_the_last_good_checkpoint_intact(tmp_path):
    cfg = tiny_cfg(tmp_path, "trainer.max_steps=8")
    with pytest.raises(TrainingDivergedError, match=r"diffusion loss is nan at step 4.*last good checkpoint"):
        train(cfg, data=make_data(poison_at=4))
    latest = CheckpointManager(tmp_path / "run" / "checkpoints").latest()
    assert latest.step == 3
    read_safetensors(latest.model_file)  # readable


def test_scale_by_std_is_set_once_and_restored(tmp_path):
    run = train(tiny_cfg(tmp_path, "scale_factor=scale_by_std", "first_stage.channels=3"), data=make_data())
    pipe = Pipeline.load(run / "pipeline")
    first = next(make_data()("train", 0))["image"]
    assert float(pipe.scale_factor) == pytest.approx(1 / first.std().item(), rel=1e-5)


def test_condition_dropout_is_the_conditioners():
    """The trainer's step drops conditions at the conditioner's drop_rate, to exactly its
    unconditional output, per sample."""
    from ldmkit_conditioners import ClassLabelConditioner

    conditioner = ClassLabelConditioner(num_classes=3, embed_dim=4)
    batch = {"label": torch.tensor([0, 1, 2, 0])}
    conditioner.drop_rate = 1.0
    torch.testing.assert_close(conditioner.condition(batch)["crossattn"], conditioner.unconditional(batch)["crossattn"])
    conditioner.drop_rate = 0.0
    torch.testing.assert_close(conditioner.condition(batch)["crossattn"], conditioner(batch)["crossattn"])
    conditioner.drop_rate = 0.5
    half = conditioner.condition({"label": torch.zeros(2000, dtype=torch.long)}, generator=torch.Generator().manual_seed(0))
    dropped = (half["crossattn"][:, 0] == conditioner.embedding.weight[3]).all(-1).float().mean()
    assert 0.45 < float(dropped) < 0.55


def test_trainer_cond_drop_prob_names_its_new_home(tmp_path):
    from ldmkit.training.engine import TrainingError

    with pytest.raises(TrainingError, match=r"conditioner\.drop_rate"):
        train(tiny_cfg(tmp_path, "+trainer.cond_drop_prob=0.2"), data=make_data())


@pytest.mark.parametrize(("key", "before", "after"), [
    ("trainer.objective.learn_logvar", "false", "true"),
    ("trainer.objective.learn_logvar", "true", "false"),
    ("trainer.ema.enabled", "false", "true"),
])
def test_resume_refuses_what_the_checkpoint_cannot_hold_in_one_line(tmp_path, key, before, after):
    """A learned log-variance and the EMA are checkpoint state: switching them on resume was
    a state_dict error listing every tensor (or, EMA off, a silent loss of the average)."""
    from ldmkit.training.engine import TrainingError

    train(tiny_cfg(tmp_path, "trainer.max_steps=3", f"{key}={before}"), data=make_data())
    with pytest.raises(TrainingError, match=rf"{key}: {before.title()} -> {after.title()}.*cannot change") as err:
        train(tiny_cfg(tmp_path, f"{key}={after}"), data=make_data())
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("learn", "said"), [("true", "(ignored: the checkpoint's value is kept)"), ("false", "")])
def test_a_changed_logvar_init_on_resume_is_said_as_it_is(tmp_path, learn, said):
    """Learned, the log-variance is a saved parameter and keeps the checkpoint's value; fixed,
    it is rebuilt from logvar_init and the change applies."""
    from ldmkit.training.errors import TrainingWarning

    learned = f"trainer.objective.learn_logvar={learn}"
    train(tiny_cfg(tmp_path, "trainer.max_steps=2", learned), data=make_data())
    with pytest.warns(TrainingWarning, match="resuming") as caught:
        train(tiny_cfg(tmp_path, "trainer.max_steps=3", learned, "trainer.objective.logvar_init=1.5"), data=make_data())
    (note,) = [str(w.message) for w in caught if "resuming" in str(w.message)]
    assert f"trainer.objective.logvar_init: 0.0 -> 1.5{' ' + said if said else ';'}" in note + ";"


def test_a_misspelt_nested_trainer_key_is_named(tmp_path):
    """trainer.ema.decy / trainer.lora.rnk were silently ignored (trainer.decy warned)."""
    with pytest.warns(UserWarning, match=r"trainer\.ema\.decy \(did you mean trainer\.ema\.decay\?\), trainer\.lora\.rnk \(did you mean trainer\.lora\.rank\?\) are not used by stage=ldm"):
        train(tiny_cfg(tmp_path, "trainer.max_steps=1", "+trainer.ema.decy=0.5", "+trainer.lora.rnk=4"),
              data=make_data())


def test_a_checkpoint_that_does_not_fit_is_one_line(tmp_path):
    """Unfreezing on resume: the EMA has no average of the newly trained tensors (torch's
    message listed every missing tensor, over several lines; then "does not fit the ema ...:
    missing shadow.denoiser__out__0__bias, ..." named neither the model's names nor the keys
    that changed them, as stage 1's optimizer message does)."""
    from ldmkit.training.engine import TrainingError

    train(tiny_cfg(tmp_path, "trainer.max_steps=3", "trainer.frozen=[denoiser.out]"), data=make_data())
    checkpoint = tmp_path / "run" / "checkpoints" / "step_000000003"
    with pytest.raises(TrainingError) as err:
        train(tiny_cfg(tmp_path), data=make_data())
    assert str(err.value) == (
        f"checkpoint {checkpoint} holds the EMA averages for other parameters than this run trains: none of "
        "denoiser.out.0.weight, denoiser.out.0.bias, denoiser.out.2.weight (and 1 more) (did trainer.trainable / "
        "trainer.frozen change since the run started?); restore them, or start a new run from its weights: "
        f"trainer.init_from={checkpoint} run_dir=<a new folder>"
    )
    with pytest.raises(TrainingError, match=r"denoiser\.input_blocks\.0\.0\.weight, .* were trained \(its EMA averages "
                                            r"them\), and the model built now keeps them frozen \(did trainer\.trainable / "
                                            r"trainer\.frozen change since the run started\?"):  # fmt: skip
        train(tiny_cfg(tmp_path, "trainer.frozen=[denoiser.out,denoiser.input_blocks]"), data=make_data())


def test_scale_by_std_of_constant_latents_is_one_line(tmp_path):
    """A first batch whose latents have no spread cannot set the scale (a ValueError traceback
    from deep in the trainer before)."""
    from ldmkit.training.engine import TrainingError

    def blank(split, epoch):
        for _ in range(2):
            yield {"image": torch.ones(4, 3, 8, 8), "label": torch.zeros(4, dtype=torch.long)}

    with pytest.raises(TrainingError, match=r"^scale_factor=scale_by_std: the first training batch's latents "
                                            r"have std 0 or NaN .*; set scale_factor to a number$"):
        train(tiny_cfg(tmp_path, "scale_factor=scale_by_std"), data=blank)
