"""One class per operator of the bound engine (see base.py for the tensor conventions)."""

from .base import BoundOp
from .elementwise import AddOp, ElementwiseAffineOp
from .linear import ConvOp, LinearOp
from .opaque import OpaqueOp
from .pool import MaxPoolOp
from .relu import ReLUOp
from .shape import CatOp, PadOp, PermuteOp, ReshapeOp

__all__ = ["BoundOp", "AddOp", "ElementwiseAffineOp", "ConvOp", "LinearOp", "OpaqueOp", "MaxPoolOp",
           "ReLUOp", "CatOp", "PadOp", "PermuteOp", "ReshapeOp"]
