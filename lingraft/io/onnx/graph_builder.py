"""The fx side of the ONNX import: the values it tracks, the builder that writes the fx graph, the import state.

Every input-dependent value is an fx tensor ``[B, *P]`` plus a batch flag (see the package docstring). The
builder runs each new node on example tensors ``[EXAMPLE_BATCH, *P]`` at once, which gives every shape.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import fx, nn

from lingraft.errors import UnsupportedModelError
from lingraft.io.onnx.common import InputInfo, node_label

__all__ = ["EXAMPLE_BATCH", "Const", "GraphBuilder", "ImportState", "OnnxGraphModule", "Val"]

EXAMPLE_BATCH = 2  # batch size of the example tensors that carry shapes through the build (2 catches batch mix-ups)
_META_ATTRS = (
    "input_shape",
    "output_shape",
    "onnx_input_name",
    "onnx_output_name",
    "onnx_input_shape",
    "onnx_path",
    "onnx_opset",
)


class OnnxGraphModule(fx.GraphModule):
    """A GraphModule that keeps the ONNX metadata attributes (input_shape, ...) through ``copy.deepcopy``."""

    def __deepcopy__(self, memo):
        res = super().__deepcopy__(memo)
        for k in _META_ATTRS:
            if k in self.__dict__:
                setattr(res, k, copy.deepcopy(self.__dict__[k], memo))
        return res


@dataclass
class Val:
    """An input-dependent value: fx node + example tensor ([EXAMPLE_BATCH, *P]) + batch flag."""

    node: fx.Node
    ex: torch.Tensor
    explicit: bool
    producer: nn.Module | None = None  # the module that computed it (for BatchNorm folding)
    producer_in: torch.Tensor | None = None

    @property
    def oshape(self) -> tuple[int, ...]:
        """The ONNX shape of this value (batch 1 where explicit)."""
        return ((1,) if self.explicit else ()) + tuple(self.ex.shape[1:])


class Const:
    """A constant operand registered as a buffer: fx get_attr node + its tensor."""

    def __init__(self, node: fx.Node, t: torch.Tensor):
        self.node, self.t = node, t


_RESERVED = set(dir(fx.GraphModule)) | set(_META_ATTRS)


def _node_arg(a):
    """An fx call argument: Val/Const -> its fx node (recursing into lists and tuples)."""
    if isinstance(a, (Val, Const)):
        return a.node
    if isinstance(a, (list, tuple)):
        return type(a)(_node_arg(x) for x in a)
    return a


def _example_arg(a):
    """The same argument on the example tensors: Val -> its example, Const -> its tensor."""
    if isinstance(a, Val):
        return a.ex
    if isinstance(a, Const):
        return a.t
    if isinstance(a, (list, tuple)):
        return type(a)(_example_arg(x) for x in a)
    return a


class GraphBuilder:
    """Creates fx nodes and evaluates them on example tensors at the same time (which gives all shapes)."""

    def __init__(self):
        self.graph = fx.Graph()
        self.root = nn.Module()
        self._used: set[str] = set()

    def name(self, base: str) -> str:
        """A fresh attribute-safe name derived from an ONNX name."""
        s = re.sub(r"\W", "_", base or "n").strip("_") or "n"
        if s[0].isdigit():
            s = "n_" + s
        cand, k = s, 1
        while cand in self._used or cand in _RESERVED:
            cand, k = f"{s}_{k}", k + 1
        self._used.add(cand)
        return cand

    def const(self, base: str, t: torch.Tensor) -> Const:
        n = self.name(base)
        t = t.detach().clone()
        self.root.register_buffer(n, t)
        return Const(self.graph.get_attr(n), t)

    def module(self, base: str, mod: nn.Module, v: Val, explicit: bool | None = None) -> Val:
        n = self.name(base)
        mod.eval()
        self.root.add_module(n, mod)
        node = self.graph.call_module(n, (v.node,))
        with torch.no_grad():
            ex = mod(v.ex)
        return Val(node, ex, v.explicit if explicit is None else explicit, mod, v.ex)

    def fn(self, f: Callable, args: Sequence, explicit: bool, kwargs: dict | None = None) -> Val:
        kwargs = kwargs or {}
        node = self.graph.call_function(
            f, tuple(_node_arg(a) for a in args), {k: _node_arg(v) for k, v in kwargs.items()}
        )
        with torch.no_grad():
            ex = f(*[_example_arg(a) for a in args], **{k: _example_arg(v) for k, v in kwargs.items()})
        return Val(node, ex, explicit)


class ImportState:
    """What the importer knows while it walks the ONNX graph: the ONNX name -> value map and the fx builder.

    env maps an ONNX value name to a Val (input-dependent) or an np.ndarray (constant, folded).
    """

    def __init__(self, model, info: InputInfo):
        self.model = model
        self.info = info
        self.g = model.graph
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
        self.b = GraphBuilder()
        self.env: dict[str, Val | np.ndarray] = {}
        self.consumers: dict[str, list] = {}
        for node in self.g.node:
            for i in node.input:
                if i:
                    self.consumers.setdefault(i, []).append(node)
        self.graph_outputs = {o.name for o in self.g.output}
        self.fused: dict[int, Val] = {}  # id(onnx node) -> value that already computes it (MatMul + Add -> Linear)
        self._fuse_target = None  # the Add node that the current MatMul claims as its bias (see fuse_bias)

    def single_use(self, name: str) -> bool:
        """Whether exactly one node reads this ONNX value and it is not a graph output."""
        return len(self.consumers.get(name, [])) == 1 and name not in self.graph_outputs

    def get(self, name: str):
        """The value of an ONNX name that must already be defined."""
        if name not in self.env:
            raise UnsupportedModelError(
                f"ONNX value '{name}' is used before it is defined; the graph is not "
                "topologically sorted (re-export it)"
            )
        return self.env[name]

    def cnst(self, node, i: int, what: str) -> np.ndarray:
        """Input i of node, which must be a constant (`what` names it in errors)."""
        if i >= len(node.input) or not node.input[i]:
            raise UnsupportedModelError(f"{node.op_type} node '{node_label(node)}' lacks its {what}")
        v = self.get(node.input[i])
        if isinstance(v, Val):
            raise UnsupportedModelError(
                f"{node.op_type} node '{node_label(node)}': its {what} depends on the input; lingraft needs it constant"
            )
        return v

    def opt_const(self, node, i: int) -> np.ndarray | None:
        """Optional constant input i of node (None when absent)."""
        if i >= len(node.input) or not node.input[i]:
            return None
        return self.cnst(node, i, f"input {i}")

    @staticmethod
    def tensor(a: np.ndarray) -> torch.Tensor:
        """A torch tensor of the array (floats as float32)."""
        t = torch.from_numpy(np.ascontiguousarray(a))
        return t.float() if t.is_floating_point() else t

    def reshape(self, v: Val, oshape: Sequence[int], explicit: bool) -> Val:
        """View v as the ONNX shape `oshape` in the given form (same per-sample numbers, in row-major order)."""
        fx_shape = tuple(oshape[1:]) if explicit else tuple(oshape)
        if explicit:
            assert oshape[0] == 1
        if tuple(v.ex.shape[1:]) == fx_shape:
            return Val(v.node, v.ex, explicit, v.producer, v.producer_in)
        if len(fx_shape) == 1 and v.ex.dim() > 2:
            return self.b.module("flatten", nn.Flatten(), v, explicit)
        return self.b.fn(torch.reshape, (v, (-1,) + fx_shape), explicit)

    def to_implicit(self, v: Val) -> Val:
        """The same value with its whole ONNX shape per sample."""
        return self.reshape(v, v.oshape, False) if v.explicit else v

    def to_explicit(self, v: Val, node, why: str) -> Val:
        """The same value with ONNX dim 0 as the batch (it must be 1); `why` names the op in errors."""
        if v.explicit:
            return v
        s = v.oshape
        if len(s) >= 1 and s[0] == 1:
            return self.reshape(v, s, True)
        raise UnsupportedModelError(
            f"{node.op_type} node '{node_label(node)}': {why} needs the batch in dim 0, "
            f"but its input has ONNX shape {list(s)}"
        )
