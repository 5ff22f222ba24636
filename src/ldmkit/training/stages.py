"""ldmkit's own training stages, registered through ``ldmkit_register_stages`` exactly as a
third-party stage is (the plugin manager loads this module as a built-in plugin). Their
evaluators register themselves with them the same way (:mod:`ldmkit.evaluation.stages`).

The trainers are imported when a stage runs, not when the stages are listed; what the
``trainer`` keys take (:mod:`ldmkit.training.schema`) when a config is checked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ldmkit.hookspecs import hookimpl


def train_autoencoder(cfg: Any, *, data: Any = None) -> Path:
    """Stage 1: the first stage (:class:`ldmkit.training.autoencoder.AutoencoderTrainer`)."""
    from ldmkit.training.autoencoder import train_autoencoder

    return train_autoencoder(cfg, data=data)


def train_ldm(cfg: Any, *, data: Any = None) -> Path:
    """Stage 2: the latent diffusion model (:class:`ldmkit.training.ldm.LDMTrainer`)."""
    from ldmkit.training.ldm import train_ldm

    return train_ldm(cfg, data=data)


@hookimpl
def ldmkit_register_stages(register):
    # trainer_config "default": the primary config's choice, which both stages have always
    # used when no `trainer=` is given (conf/trainer/autoencoder.yaml and ldm.yaml are presets)
    register("autoencoder", train_autoencoder, trainer_config="default")
    register("ldm", train_ldm, trainer_config="default")


@hookimpl
def ldmkit_register_config_keys(register):
    from ldmkit.training.schema import TRAINER_KEYS

    register("trainer", TRAINER_KEYS)
