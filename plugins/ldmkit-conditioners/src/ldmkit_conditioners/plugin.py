"""Registers the conditioners and their config group with ldmkit."""

from pathlib import Path

import ldmkit


@ldmkit.hookimpl
def ldmkit_register_conditioners(register):
    from ldmkit_conditioners.class_label import ClassLabelConditioner
    from ldmkit_conditioners.null import NullConditioner

    register("none", NullConditioner)
    register("class_label", ClassLabelConditioner)


@ldmkit.hookimpl
def ldmkit_register_configs(register):
    register(Path(__file__).parent / "conf")
