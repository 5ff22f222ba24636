"""Registers the conditioners and their config group with ldmkit."""

from pathlib import Path

import ldmkit


@ldmkit.hookimpl
def ldmkit_register_conditioners(register):
    from ldmkit_conditioners.class_label import ClassLabelConditioner
    from ldmkit_conditioners.inpaint import InpaintConditioner
    from ldmkit_conditioners.low_res import LowResConditioner
    from ldmkit_conditioners.multi import MultiConditioner
    from ldmkit_conditioners.null import NullConditioner
    from ldmkit_conditioners.semantic_map import SemanticMapConditioner

    register("none", NullConditioner)
    register("class_label", ClassLabelConditioner)
    register("semantic_map", SemanticMapConditioner)
    register("low_res", LowResConditioner)
    register("inpaint", InpaintConditioner)
    register("multi", MultiConditioner)


@ldmkit.hookimpl
def ldmkit_register_configs(register):
    register(Path(__file__).parent / "conf")
