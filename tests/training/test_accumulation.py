"""Gradient accumulation (`trainer.accumulate_grad_batches=K`): K micro-batches of B train as
one batch of K·B would, for both stages, and a run with K > 1 resumes exactly.

What must line up per sample: stage 2 draws timesteps and noise once for all the samples of a
step (DiffusionObjective.draw) and slices them per micro-batch, so they are equal by
construction; its class-label dropout and the KL posterior samples of both stages are drawn per
micro-batch, and torch's CPU generators give the same values for K draws of B samples as for one
draw of K·B (uniforms one by one; normals in blocks of 16: a KL-tiny latent has 48 values per
sample). What cannot be equal by design is what depends on the batch as a whole: stage 1's
PatchGAN normalizes with BatchNorm over each micro-batch, and its adaptive weight is computed per
micro-batch. The adversarial steps are therefore compared on data whose micro-batches are copies
of one another, where those statistics agree with the whole batch's (all but BatchNorm's running
statistics, which use the unbiased variance and are updated once per forward).
"""

from __future__ import annotations

import pytest
import torch

from ldmkit.config import compose_config
from ldmkit.training.checkpoint import CheckpointManager, read_safetensors
from tests.training import faults


def _labelled_data(batch_size: int, *, copies: int = 1, n: int = 24):
    """``n`` fixed 16×16 images with labels, in a per-epoch order, cut into batches of
    ``batch_size``: the same samples in the same order whatever the batch size. ``copies``:
    every group of ``8 // copies`` samples comes that many times in a row."""
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, 16, 16, generator=gen) * 2 - 1
    labels = torch.randint(0, 3, (n,), generator=gen)

    def data(split, epoch):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(1000 * epoch + (split == "test")))
        stream = torch.cat([group.repeat(copies) for group in order.split(8 // copies)])
        for i in range(0, len(stream), batch_size):
            index = stream[i : i + batch_size]
            yield {"image": images[index], "label": labels[index]}

    return data


def _final_tensors(run, *, parameters_only=False):
    latest = CheckpointManager(run / "checkpoints").latest()
    tensors = {**read_safetensors(latest.model_file), **read_safetensors(latest.path / "training.safetensors")}
    if parameters_only:  # BatchNorm's running statistics differ by design (module docstring)
        tensors = {k: v for k, v in tensors.items() if "running_" not in k and "num_batches_tracked" not in k}
    # an attention's key bias has no gradient (softmax ignores a shift shared by all keys): Adam
    # turns the rounding noise left in its gradient into steps of about lr, whatever the batching
    return latest.step, {k: v for k, v in tensors.items() if not k.replace("__", ".").endswith(".k.bias")}


def _stage1(tmp_path, run, *extra):
    return compose_config([
        "stage=autoencoder", "trainer=autoencoder_tiny", "image_size=16", f"run_dir={tmp_path / run}",
        "trainer.tensorboard=false", "trainer.num_threads=1", "trainer.precision=fp32", "trainer.val_batches=0", "trainer.sample_every=0",
        "trainer.max_steps=3", "trainer.checkpoint_every=0", "trainer.log_every=1", *extra,
    ])  # fmt: skip


def _stage2(tmp_path, run, *extra):
    return compose_config([
        "stage=ldm", "trainer=ldm_tiny", "first_stage=kl_tiny", "denoiser=unet_tiny", "image_size=16",
        "conditioner=class_label", "conditioner.num_classes=3", "conditioner.embed_dim=16",
        "conditioner.drop_rate=0.3", f"run_dir={tmp_path / run}", "trainer.num_threads=1", "trainer.precision=fp32",
        "trainer.val_batches=0", "trainer.sample_every=0", "trainer.max_steps=3", "trainer.checkpoint_every=0",
        "trainer.log_every=1", *extra,
    ])  # fmt: skip


CASES = {
    # the autoencoder before disc_start: L1 + KL with posterior samples
    "autoencoder": (_stage1, ("first_stage=kl_tiny", "trainer.loss.disc_start=1000"), 1),
    # the adversarial phase from step 0, both optimizers: a deterministic VQ first stage, micro-batches
    # that are copies of each other (BatchNorm and the adaptive weight see the same statistics)
    "autoencoder-gan": (_stage1, ("first_stage=vq_tiny", "first_stage.restart_dead_codes=false",
                                  "trainer.loss.disc_start=0"), 4),  # fmt: skip
    # the diffusion model with EMA, warm-up, KL posterior samples and label dropout
    "ldm": (_stage2, (), 1),
}


def _recording(trainer_class):
    """``trainer_class`` keeping the gradients each optimizer steps with (Adam's update hardly
    depends on the gradient's scale: a wrong loss weight shows in the gradients, not the weights)."""

    class Recording(trainer_class):
        def optimizer_step(self, optimizer, params=None):
            grads = [p.grad.flatten() for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            self.gradients.append(torch.cat(grads))
            return super().optimizer_step(optimizer, params)

    Recording.gradients = []
    return Recording


@pytest.mark.parametrize("case", sorted(CASES))
def test_micro_batches_train_like_one_large_batch(case, tmp_path):
    from ldmkit.training.autoencoder import AutoencoderTrainer
    from ldmkit.training.ldm import LDMTrainer

    make, extra, copies = CASES[case]
    trainer = AutoencoderTrainer if make is _stage1 else LDMTrainer
    runs = {}
    for name, batch_size, accumulate in (("whole", 8, 1), ("accumulated", 2, 4)):
        cfg = make(tmp_path, name, *extra, f"trainer.batch_size={batch_size}", f"trainer.accumulate_grad_batches={accumulate}")
        recording = _recording(trainer)
        run = recording(cfg, data=_labelled_data(batch_size, copies=copies)).fit()
        runs[name] = (run, recording.gradients, *_final_tensors(run, parameters_only=copies > 1))
    (whole, whole_grads, step_a, a), (accumulated, grads, step_b, b) = runs["whole"], runs["accumulated"]
    assert step_a == step_b == 3  # optimizer steps, each of 8 samples
    assert len(grads) == len(whole_grads) == (6 if case == "autoencoder-gan" else 3)  # one per optimizer step
    for got, want in zip(grads, whole_grads, strict=True):  # the step's gradient: that of its mean loss
        assert float((got - want).norm() / want.norm()) < 1e-5
    assert sorted(a) == sorted(b)
    for key in a:  # a tenth of one Adam step (lr 1e-3) for near-zero gradients
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-4, msg=lambda m, key=key: f"{key}: {m}")
    # the logs are the step's: averaged over the micro-batches
    rows = [line.split(",") for line in (accumulated / "metrics.csv").read_text().splitlines()]
    whole_rows = [line.split(",") for line in (whole / "metrics.csv").read_text().splitlines()]
    column = rows[0].index("train/loss")
    assert [r[0] for r in rows[1:]] == ["1", "2", "3"]
    for row, whole_row in zip(rows[1:], whole_rows[1:], strict=True):
        assert float(row[column]) == pytest.approx(float(whole_row[whole_rows[0].index("train/loss")]), rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_accumulating_run_resumes_exactly(stage, tmp_path):
    """Real shards with 2 DataLoader workers, K=2 (the data position counts micro-batches,
    across epochs): stopped at the checkpoint of step 3 and restarted, bitwise the same as a run
    that was never stopped."""
    shards = faults.make_shards(tmp_path / "data")
    extra = ("trainer.accumulate_grad_batches=2", "trainer.max_steps=6")
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert faults.train_in_process(faults.stage_args(stage, shards, straight, *extra)) == 0
    assert faults.train_in_process(faults.stage_args(stage, shards, stopped, *extra, "trainer.max_steps=3")) == 0
    assert faults.train_in_process(faults.stage_args(stage, shards, stopped, *extra)) == 0
    assert faults.checkpoint_steps(straight)[-1] == 6
    assert faults.differences(faults.final_contents(straight, 6), faults.final_contents(stopped, 6)) == []
