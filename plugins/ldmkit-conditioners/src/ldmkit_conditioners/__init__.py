"""First-party ldmkit conditioners."""

from ldmkit_conditioners.class_label import ClassLabelConditioner
from ldmkit_conditioners.null import NullConditioner

__all__ = ["ClassLabelConditioner", "NullConditioner"]
