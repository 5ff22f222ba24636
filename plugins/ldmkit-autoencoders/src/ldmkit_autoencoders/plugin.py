"""Registers the first stages ``identity``, ``kl`` and ``vq`` and their config group."""

from pathlib import Path

import ldmkit


@ldmkit.hookimpl
def ldmkit_register_first_stages(register):
    from ldmkit_autoencoders.identity import IdentityFirstStage
    from ldmkit_autoencoders.kl import KLAutoencoder
    from ldmkit_autoencoders.vq import VQAutoencoder

    register("identity", IdentityFirstStage)
    register("kl", KLAutoencoder)
    register("vq", VQAutoencoder)


@ldmkit.hookimpl
def ldmkit_register_configs(register):
    register(Path(__file__).parent / "conf")
