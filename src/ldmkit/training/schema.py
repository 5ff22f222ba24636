"""What the ``trainer`` keys take: the types and ranges ``ldmkit train`` checks a composed
config against before anything is built or written. Their defaults live in
``conf/trainer/*.yaml`` (:mod:`ldmkit.training.defaults`), not here.

Declared to the config checker by ldmkit's training stages through
``ldmkit_register_config_keys`` (:mod:`ldmkit.training.stages`), the hook a plugin's stage
uses for keys of its own trainer config. A key checked for every stage: a config names one
trainer preset, whichever stage runs it.
"""

from __future__ import annotations

from ldmkit.compiling import COMPILE_OPTION
from ldmkit.config_checks import (
    Arguments,
    Boolean,
    Choice,
    Device,
    Either,
    Integer,
    ListOf,
    Number,
    Numbers,
    Spec,
    Text,
)
from ldmkit.diffusion.objective import DiffusionObjective
from ldmkit.losses import AutoencoderLoss
from ldmkit.precision import PRECISIONS

__all__ = ["TRAINER_KEYS"]

EVERY = Integer(0, null=True)  # 0 or null: never


class Empty(Spec):
    expected = "an empty list"

    def accepts(self, value: object) -> bool:
        return isinstance(value, list | tuple) and not value

TRAINER_KEYS: dict[str, Spec] = {
    # both stages (conf/trainer/default.yaml)
    "max_steps": Integer(1),
    "max_minutes": Number(0, above=True, null=True),
    "batch_size": Integer(1),
    "accumulate_grad_batches": Integer(1),
    "num_workers": Integer(0),
    "lr": Number(0, above=True),
    "log_every": EVERY,
    "sample_every": EVERY,
    "checkpoint_every": EVERY,
    "val_every": EVERY,
    "keep_checkpoints": Integer(1),
    "embed_frozen": Boolean(),
    "val_batches": Integer(0),
    "val_split": Text(null=True),
    "device": Device(),
    "resume": Boolean(),
    "progress": Boolean(),
    "tensorboard": Boolean(),
    "save_on_signal": Boolean(),
    "grad_clip": Number(0, above=True, null=True),
    "num_threads": Either(Integer(1, null=True), Choice("auto")),
    "precision": Choice(*PRECISIONS),
    "compile": COMPILE_OPTION,
    "compile_backend": Text(),
    "init_from": Text(null=True),
    "init_strict": Boolean(),
    "init_preset": Text(null=True),
    "init_config": Text(null=True),
    "init_architecture": Choice("config", "source"),
    "trainable": Either(Text(null=True), ListOf(Text())),
    "frozen": Either(Text(), Empty(), ListOf(Text())),
    # stage 1 (conf/trainer/autoencoder.yaml)
    "disc_lr": Number(0, above=True, null=True),
    "betas": Numbers(Number(0, 1, below=True), 2),  # Adam: each in [0, 1)
    # stage 2 (conf/trainer/ldm.yaml)
    "weight_decay": Number(0),
    "warmup_steps": Integer(0),
    "latent_cache": Boolean(),
    "bf16_weights": Either(Boolean(), Choice("auto")),
    "sample_steps": Integer(1),
    "sample_count": Integer(1),
    "guidance_scale": Number(0),
    "strategy": Choice("ddp", "fsdp"),
    "ddp_find_unused_parameters": Boolean(),
    "ema.enabled": Boolean(),
    "ema.decay": Number(0, 1),
    "ema.warmup": Boolean(),
    "ema.use_for_sampling": Boolean(),
    "lora.rank": Integer(0),
    "lora.alpha": Number(0, above=True, null=True),
    "lora.dropout": Number(0, 1),
    "lora.targets": Either(ListOf(Text()), Choice(None)),
    "lora.conditioner": Boolean(),
    # nodes of a constructor's keyword arguments, typed by its hints (`auto`: filled in later)
    "loss": Arguments(AutoencoderLoss, auto=("disc_in_channels", "reduction")),
    "objective": Arguments(DiffusionObjective),
}
