"""Registers the text conditioners and their config group with ldmkit."""

from pathlib import Path

import ldmkit


@ldmkit.hookimpl
def ldmkit_register_conditioners(register):
    from ldmkit_text.bert import BertConditioner
    from ldmkit_text.frozen_text import FrozenTextConditioner

    register("bert", BertConditioner)
    register("frozen_text", FrozenTextConditioner)


@ldmkit.hookimpl
def ldmkit_register_configs(register):
    register(Path(__file__).parent / "conf")
