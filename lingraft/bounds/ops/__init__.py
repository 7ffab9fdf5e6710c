"""One class per operator of the bound engine (see base.py for the tensor conventions)."""

from lingraft.bounds.ops.base import BoundOp
from lingraft.bounds.ops.elementwise import AddOp, ElementwiseAffineOp
from lingraft.bounds.ops.linear import ConvOp, LinearOp
from lingraft.bounds.ops.opaque import OpaqueOp
from lingraft.bounds.ops.pool import MaxPoolOp
from lingraft.bounds.ops.relu import ReLUOp
from lingraft.bounds.ops.shape import CatOp, PadOp, PermuteOp, ReshapeOp

__all__ = [
    "BoundOp",
    "AddOp",
    "ElementwiseAffineOp",
    "ConvOp",
    "LinearOp",
    "OpaqueOp",
    "MaxPoolOp",
    "ReLUOp",
    "CatOp",
    "PadOp",
    "PermuteOp",
    "ReshapeOp",
]
