"""Registers the text conditioners and their config group with ldmkit."""

from pathlib import Path

import ldmkit


@ldmkit.hookimpl
def ldmkit_register_conditioners(register):
    from ldmkit_text.bert import BertConditioner
    from ldmkit_text.clip_text import ClipTextConditioner
    from ldmkit_text.frozen_text import FrozenTextConditioner

    register("bert", BertConditioner)
    register("frozen_text", FrozenTextConditioner)
    register("clip_text", ClipTextConditioner)


@ldmkit.hookimpl
def ldmkit_register_configs(register):
    register(Path(__file__).parent / "conf")
