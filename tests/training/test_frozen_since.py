"""A run checkpointed while a parameter was trained that the model built now keeps frozen
(bert's unused ``to_logits`` until ldmkit froze it, so that DDP could train bert): resuming is
one line saying why and how to go on (``trainer.init_from``), which then works."""

from __future__ import annotations

import pytest
import torch

from ldmkit.config import compose_config
from ldmkit.data import prepare
from ldmkit.training import TrainingError, train
from tests.data.conftest import make_image_folder


def _train(overrides):
    threads = torch.get_num_threads()
    try:
        return train(compose_config(overrides))
    finally:
        torch.set_num_threads(threads)


def test_resume_after_a_parameter_was_frozen_says_how_to_go_on(tmp_path, monkeypatch):
    from ldmkit_text import transformer

    make_image_folder(tmp_path / "images", per_class=2, size=(8, 8))
    prepare("image_folder", tmp_path / "shards", path=str(tmp_path / "images"), shard_size=4, progress=False)
    common = ["stage=ldm", "trainer=ldm_tiny", "first_stage=identity", "denoiser=unet_tiny", "conditioner=bert",
              "conditioner.n_layer=1", "conditioner.max_seq_len=8", "data=image_folder",
              f"data.path={tmp_path / 'shards'}", "image_size=8", "trainer.batch_size=2", "trainer.num_workers=0",
              "trainer.sample_every=null", "trainer.val_every=null", "trainer.progress=false",
              "trainer.tensorboard=false", "trainer.num_threads=1"]  # fmt: skip
    built = transformer.TextTransformer.__init__

    def as_before(self, *args, **kwargs):  # what ldmkit built before the freeze
        built(self, *args, **kwargs)
        self.to_logits.requires_grad_(True)

    with monkeypatch.context() as patch:
        patch.setattr(transformer.TextTransformer, "__init__", as_before)
        run = _train([*common, f"run_dir={tmp_path / 'old'}", "trainer.max_steps=2"])
    checkpoint = run / "checkpoints" / "step_000000002"
    with pytest.raises(TrainingError) as err:
        _train([*common, f"run_dir={run}", "trainer.max_steps=4"])
    assert str(err.value) == (
        f"checkpoint {checkpoint} was written while conditioner.transformer.to_logits.bias, "
        "conditioner.transformer.to_logits.weight were trained (its EMA averages them), and the model built "
        "now keeps them frozen (did trainer.trainable / trainer.frozen change since the run started? or their "
        "component freezes them now), so the run cannot resume exactly; start a new run from its weights: "
        f"trainer.init_from={checkpoint} run_dir=<a new folder>"
    )
    new = _train([*common, f"run_dir={tmp_path / 'new'}", f"trainer.init_from={checkpoint}", "trainer.max_steps=1"])
    assert (new / "checkpoints" / "step_000000001").is_dir()
