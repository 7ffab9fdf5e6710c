"""THE table of what the bound engine supports: torch modules, torch functions / tensor methods, ONNX op types.

Each :class:`OpEntry` names the torch module types (with a factory in :mod:`lingraft.bounds.module_ops`) and the
function / method names (with their parameter signatures and a converter in :mod:`lingraft.bounds.function_ops`)
that become one kind of bound operator, the operator classes they build, and the ONNX op types that the importer
(one ``op_<OpType>`` method each in ``lingraft/io/onnx/import_ops.py``) turns into those torch calls. The graph
builder's leaf modules and its "lingraft supports" message, and the ONNX importer's accepted ops
(``lingraft.io.onnx.analysis.SUPPORTED_ONNX_OPS``) are all derived from :data:`REGISTRY`, so they cannot disagree.
A constraint both sides must enforce is one function called by both (e.g. :func:`module_ops.pool_problem`).
See docs/adding_an_operator.md.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx
from torch import nn

from lingraft.bounds import function_ops as fo
from lingraft.bounds import module_ops as mo
from lingraft.bounds.function_ops import BuildContext
from lingraft.bounds.ops import (
    AddOp,
    CatOp,
    ConvOp,
    ElementwiseAffineOp,
    LinearOp,
    MaxPoolOp,
    OpaqueOp,
    PadOp,
    PermuteOp,
    ReLUOp,
    ReshapeOp,
)
from lingraft.bounds.ops.base import AffineMapOp, BoundOp
from lingraft.models.layers import GraftedReLU, Normalize

#: (parameter names in call order, defaults of the ones that may be left out); a ``*`` name takes the remaining
#: positional arguments. Arguments are bound by these names, so positional and keyword calls read alike, and a
#: keyword the builder does not model is refused by name.
Signature = tuple[tuple[str, ...], dict[str, Any]]
ModuleFactory = Callable[[Any, str, tuple, tuple], BoundOp | None]
Converter = Callable[[BuildContext, fx.Node, str, Any], None]


def _sig(*params: str, **defaults: Any) -> Signature:
    return tuple(params), dict(defaults)


@dataclass(frozen=True, eq=False)
class OpEntry:
    """One row of the registry: the torch calls that become one kind of bound operator and their ONNX op types."""

    #: short name, used in the "lingraft supports" message and as the test id
    name: str
    #: the bound operator classes it builds (none: the value passes through)
    ops: tuple[type[BoundOp], ...] = ()
    #: torch module types traced as leaves; module_factory(m, qualified name, in_shape, out_shape) -> op or None
    modules: tuple[type[nn.Module], ...] = ()
    module_factory: ModuleFactory | None = None
    #: modules matched by a predicate instead of a type (e.g. any module with ``interval_bounds``)
    module_predicate: Callable[[nn.Module], bool] | None = None
    #: fx call_function / call_method names -> signature (None: arguments not bound); convert(builder, node, name, args)
    functions: Mapping[str, Signature | None] = field(default_factory=dict)
    convert: Converter | None = None
    #: ONNX op types the importer turns into these torch calls
    onnx: tuple[str, ...] = ()
    #: onnx_check(op_type, attributes) -> why the importer must refuse the node, or None (calls the shared check)
    onnx_check: Callable[[str, Mapping[str, Any]], str | None] | None = None
    #: restrictions, for the "lingraft supports" message
    note: str = ""

    def accepts(self, m: nn.Module) -> bool:
        """Whether module m belongs to this entry."""
        return isinstance(m, self.modules) or (self.module_predicate is not None and self.module_predicate(m))

    def describe(self) -> str:
        return f"{self.name} ({self.note})" if self.note else self.name


def _onnx_pool_problem(op_type: str, a: Mapping[str, Any]) -> str | None:
    """ONNX MaxPool / AveragePool attributes -> :func:`module_ops.pool_problem` (explicit pads only: auto_pad
    SAME pads depend on the input size and are checked on the module)."""
    p = list(a.get("pads", [0, 0, 0, 0]))
    padded = (1, 1) if any(p) else (0, 0)
    kind = "MaxPool2d" if op_type == "MaxPool" else "AvgPool2d"
    dilation = tuple(a.get("dilations", [1, 1]))
    count = bool(a.get("count_include_pad", 0))
    return mo.pool_problem(kind, padded, dilation, bool(a.get("ceil_mode", 0)), count_include_pad=count)


_RESHAPE_NAMES = ("flatten", "reshape", "view", "squeeze", "unsqueeze", "contiguous", "view_as", "reshape_as")
_CAT = _sig("tensors", "dim", dim=0)
_BINARY = _sig("input", "other")

#: the registry; modules are matched in this order (the first entry that accepts a module wins)
REGISTRY: tuple[OpEntry, ...] = (
    OpEntry(
        "Identity/Dropout",
        modules=(nn.Identity, nn.Dropout),
        module_factory=mo.identity,
        onnx=("Identity", "Dropout", "Cast"),
    ),
    OpEntry(
        "Linear",
        (LinearOp,),
        modules=(nn.Linear,),
        module_factory=mo.linear,
        functions={"matmul": _BINARY, "linear": _sig("input", "weight", "bias", bias=None)},
        convert=fo.matmul,
        onnx=("Gemm", "MatMul"),
        note="MatMul/linear by a constant",
    ),
    OpEntry("Conv2d", (ConvOp,), modules=(nn.Conv2d,), module_factory=mo.conv, onnx=("Conv",)),
    OpEntry(
        "ReLU",
        (ReLUOp,),
        modules=(nn.ReLU,),
        module_factory=mo.relu,
        functions={"relu": _sig("input", "inplace", inplace=False), "relu_": _sig("input")},
        convert=fo.relu,
        onnx=("Relu",),
    ),
    OpEntry("GraftedReLU", (ReLUOp,), modules=(GraftedReLU,), module_factory=mo.grafted_relu),
    OpEntry("Normalize", (ElementwiseAffineOp,), modules=(Normalize,), module_factory=mo.normalize),
    OpEntry(
        "BatchNorm",
        (ElementwiseAffineOp,),
        modules=(nn.BatchNorm1d, nn.BatchNorm2d),
        module_factory=mo.batch_norm,
        onnx=("BatchNormalization",),
        note="eval",
    ),
    OpEntry(
        "AvgPool2d",
        (ConvOp,),
        modules=(nn.AvgPool2d,),
        module_factory=mo.avg_pool,
        onnx=("AveragePool", "GlobalAveragePool"),
        onnx_check=_onnx_pool_problem,
        note="no ceil_mode; padding only with count_include_pad",
    ),
    OpEntry(
        "MaxPool2d",
        (MaxPoolOp,),
        modules=(nn.MaxPool2d,),
        module_factory=mo.max_pool,
        onnx=("MaxPool",),
        onnx_check=_onnx_pool_problem,
        note="no dilation",
    ),
    OpEntry(
        "Flatten/Reshape/View/Squeeze/Unsqueeze",
        (ReshapeOp,),
        modules=(nn.Flatten,),
        module_factory=mo.flatten,
        functions=dict.fromkeys(_RESHAPE_NAMES),
        convert=fo.reshape_like,
        onnx=("Flatten", "Reshape", "Squeeze", "Unsqueeze"),
    ),
    OpEntry(
        "Permute/Transpose",
        (PermuteOp,),
        functions={"permute": _sig("input", "*dims"), "transpose": _sig("input", "dim0", "dim1")},
        convert=fo.permute,
        onnx=("Transpose",),
    ),
    OpEntry(
        "Pad",
        (PadOp,),
        modules=(nn.ZeroPad2d, nn.ConstantPad2d),
        module_factory=mo.pad,
        functions={"pad": _sig("input", "pad", "mode", "value", mode="constant", value=None)},
        convert=fo.pad,
        onnx=("Pad",),
        note="constant",
    ),
    OpEntry(
        "Concat",
        (CatOp,),
        functions={"cat": _CAT, "concat": _CAT, "concatenate": _CAT},
        convert=fo.cat,
        onnx=("Concat",),
    ),
    OpEntry(
        "Add/Sub/Mul/Div/Neg",
        (AddOp, ElementwiseAffineOp),
        functions={
            "add": _sig("input", "other", "alpha", alpha=1),
            "sub": _sig("input", "other", "alpha", alpha=1),
            "iadd": _BINARY,
            "isub": _BINARY,
            "mul": _BINARY,
            "imul": _BINARY,
            "truediv": _BINARY,
            "div": _sig("input", "other", "rounding_mode", rounding_mode=None),
            "neg": _sig("input"),
            "__neg__": _sig("input"),
        },
        convert=fo.arith,
        onnx=("Add", "Sub", "Mul", "Div", "Neg", "Sum"),
        note="of two tensors: Add/Sub, alpha too; by constants: all, no rounding_mode",
    ),
    OpEntry(
        "modules with interval_bounds()",
        (OpaqueOp,),
        module_predicate=lambda m: hasattr(m, "interval_bounds"),
        module_factory=mo.opaque,
    ),
)

#: BoundOp classes no registry entry builds directly (abstract bases)
INTERNAL_OPS: tuple[type[BoundOp], ...] = (AffineMapOp,)

#: every module type the graph builder keeps as a leaf of the fx trace
LEAF_TYPES: tuple[type[nn.Module], ...] = tuple(t for e in REGISTRY for t in e.modules)

#: the "lingraft supports: ..." part of the graph builder's error message
SUPPORTED: str = ", ".join(e.describe() for e in REGISTRY)


def _function_table() -> dict[str, tuple[OpEntry, Signature | None]]:
    table: dict[str, tuple[OpEntry, Signature | None]] = {}
    for e in REGISTRY:
        for name, sig in e.functions.items():
            if name in table:
                raise RuntimeError(f"registry: function {name!r} in both {table[name][0].name!r} and {e.name!r}")
            table[name] = (e, sig)
    return table


_FUNCTIONS = _function_table()


def function_entry(name: str) -> tuple[OpEntry, Signature | None] | None:
    """(entry, signature) of the torch function / tensor method ``name`` (fx target name), None if unsupported."""
    return _FUNCTIONS.get(name)


def is_leaf_module(m: nn.Module) -> bool:
    """Whether the fx trace keeps module m as one call (a registry module) instead of tracing into it."""
    return any(e.accepts(m) for e in REGISTRY if e.module_factory is not None)


def module_op(m: nn.Module, name: str, in_shape: tuple, out_shape: tuple) -> BoundOp | None:
    """The operator computing module ``m`` (qualified name ``name``) on [B, *in_shape] -> [B, *out_shape], or None
    when m passes its input through (Identity, Dropout in eval, a Flatten that keeps the shape)."""
    for e in REGISTRY:
        if e.module_factory is not None and e.accepts(m):
            return e.module_factory(m, name, in_shape, out_shape)
    raise mo.UnsupportedCall(f"module {type(m).__name__} ('{name}')")


def onnx_entries() -> dict[str, OpEntry]:
    """ONNX op type -> the registry entry of the torch calls the importer turns it into."""
    out: dict[str, OpEntry] = {}
    for e in REGISTRY:
        for t in e.onnx:
            if t in out:
                raise RuntimeError(f"registry: ONNX op {t!r} in both {out[t].name!r} and {e.name!r}")
            out[t] = e
    return out
