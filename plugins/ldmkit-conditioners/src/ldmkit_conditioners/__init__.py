"""First-party ldmkit conditioners."""

from ldmkit_conditioners.class_label import ClassLabelConditioner
from ldmkit_conditioners.inpaint import InpaintConditioner
from ldmkit_conditioners.low_res import LowResConditioner
from ldmkit_conditioners.multi import MultiConditioner
from ldmkit_conditioners.null import NullConditioner
from ldmkit_conditioners.rescaler import SpatialRescaler
from ldmkit_conditioners.semantic_map import SemanticMapConditioner

__all__ = [
    "ClassLabelConditioner",
    "InpaintConditioner",
    "LowResConditioner",
    "MultiConditioner",
    "NullConditioner",
    "SemanticMapConditioner",
    "SpatialRescaler",
]
