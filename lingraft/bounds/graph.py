"""Build the bound engine's graph from a PyTorch module via torch.fx.

Every node of the traced graph that depends on the input becomes a :class:`GraphNode` holding one operator
from :mod:`lingraft.bounds.ops`; nodes that do not depend on the input are constants and are folded into the
operators that use them. Anything outside the supported vocabulary is reported up front, all at once,
before any bound is computed.
"""

from __future__ import annotations

from typing import Any, TypeGuard

import torch
import torch.fx as fx
from torch import nn

from lingraft.bounds.graft_fusion import fuse_grafted_relus
from lingraft.bounds.module_ops import UnsupportedCall, module_op
from lingraft.bounds.nodes import GraphNode, renumber
from lingraft.bounds.ops import (
    AddOp,
    CatOp,
    ElementwiseAffineOp,
    LinearOp,
    PadOp,
    PermuteOp,
    ReLUOp,
    ReshapeOp,
)
from lingraft.bounds.ops.base import BoundOp
from lingraft.errors import UnsupportedModelError
from lingraft.models.layers import GraftedReLU, Normalize

LEAF_TYPES = (
    nn.Linear,
    nn.Conv2d,
    nn.ReLU,
    GraftedReLU,
    Normalize,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.AvgPool2d,
    nn.MaxPool2d,
    nn.Flatten,
    nn.ZeroPad2d,
    nn.ConstantPad2d,
    nn.Identity,
    nn.Dropout,
)

SUPPORTED = (
    "Linear, Conv2d, ReLU, GraftedReLU, Normalize, BatchNorm (eval), AvgPool2d, MaxPool2d (no padding), "
    "Flatten/Reshape/View/Squeeze/Unsqueeze, Permute/Transpose, constant Pad, Concat, Add/Sub of two tensors "
    "(alpha too), Add/Sub/Mul/Div by constants (no rounding_mode), MatMul/linear by a constant, "
    "modules with interval_bounds()"
)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, LEAF_TYPES) or hasattr(m, "interval_bounds"):
            return True
        return super().is_leaf_module(m, qualname)


class _Recorder(fx.Interpreter):
    """Runs the traced graph once and keeps every node's value."""

    def __init__(self, gm):
        super().__init__(gm)
        self.values: dict[str, Any] = {}

    def run_node(self, n):
        v = super().run_node(n)
        self.values[n.name] = v
        return v


def trace(model: nn.Module) -> fx.GraphModule:
    graph = _Tracer().trace(model)
    return fx.GraphModule(model, graph)


def build_graph(model: nn.Module, in_shape) -> list[GraphNode]:
    """Trace ``model`` for per-sample input shape ``in_shape`` and return its nodes in topological order.

    Raises UnsupportedModelError listing every unsupported operation by name.
    """
    model = model.eval()
    try:
        gm = trace(model)
    except Exception as e:  # noqa: BLE001 - tracing errors are user-facing
        raise UnsupportedModelError(
            f"cannot trace the model with torch.fx ({type(e).__name__}: {e}); use a model built from supported layers"
        ) from None
    rec = _Recorder(gm)
    # batch 2 so that any op that mixes the batch dimension shows up as a shape mismatch
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    with torch.no_grad():
        rec.run(torch.rand(2, *in_shape, device=dev))
    builder = _Builder(gm, rec.values)
    return builder.build()


def _is_tensor(v):
    return isinstance(v, torch.Tensor)


class _Builder:
    def __init__(self, gm: fx.GraphModule, values: dict):
        self.gm = gm
        self.values = values
        self.modules = dict(gm.named_modules())
        self.nodes: list[GraphNode] = []
        self.index: dict[str, int] = {}  # fx node name -> our node index
        self.aliases: dict[str, str] = {}
        self.unsupported: list[str] = []
        self.failed: set[str] = set()  # input-dependent nodes that could not be converted

    # --- helpers -------------------------------------------------------------------------------------
    def _var(self, a) -> TypeGuard[fx.Node]:
        """Whether ``a`` is a node whose value depends on the input."""
        return isinstance(a, fx.Node) and (self._resolve(a.name) in self.index or a.name in self.failed)

    def _resolve(self, name):
        while name in self.aliases:
            name = self.aliases[name]
        return name

    def _const(self, a):
        if isinstance(a, fx.Node):
            return self.values[a.name]
        return a

    def _shape(self, n: fx.Node):
        v = self.values[n.name]
        return tuple(v.shape[1:])

    def _add(self, n: fx.Node, op: BoundOp, inputs: list[fx.Node], module_name=None):
        idx = [self.index[self._resolve(i.name)] for i in inputs]
        node = GraphNode(n.name, op, idx, self._shape(n), module_name)
        self.index[n.name] = len(self.nodes)
        self.nodes.append(node)

    def _alias(self, n: fx.Node, src: fx.Node):
        self.aliases[n.name] = self._resolve(src.name)

    def _fail(self, n: fx.Node, what: str):
        self.unsupported.append(f"{what} (node '{n.name}')")

    # --- main ----------------------------------------------------------------------------------------
    def build(self) -> list[GraphNode]:
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise UnsupportedModelError(f"the model must take exactly one input tensor, it takes {len(placeholders)}")
        output = None
        for n in self.gm.graph.nodes:
            if n.op == "placeholder":
                self.index[n.name] = 0
                self.nodes.append(GraphNode(n.name, None, [], self._shape(n)))
                continue
            if n.op == "output":
                output = n.args[0]
                continue
            if n.op == "get_attr":
                continue
            var_args = [a for a in _flat_args(n) if self._var(a)]
            if not var_args:
                continue  # constant: folded into its consumers
            v = self.values[n.name]
            if _is_tensor(v) and (v.dim() == 0 or v.shape[0] != 2):
                self._fail(n, f"{_target_name(n)} mixes the batch dimension")
                self.failed.add(n.name)
                continue
            if not _is_tensor(v):
                if isinstance(v, (tuple, list)) and any(_is_tensor(t) for t in v):
                    what = f"module '{n.target}'" if n.op == "call_module" else _target_name(n)
                    self._fail(n, f"{what} returning several tensors")
                    self.failed.add(n.name)
                # else e.g. x.size(0): only used to build shapes, which we take from the recorded values
                continue
            try:
                self._convert(n)
            except _Unsupported as e:
                self._fail(n, str(e))
                self.failed.add(n.name)
            except KeyError:
                # an input failed to convert; this node's own op was accepted, keep checking downstream
                self.failed.add(n.name)
        if self.unsupported:
            raise UnsupportedModelError(
                "unsupported operations: " + "; ".join(self.unsupported) + f". lingraft supports: {SUPPORTED}"
            )
        if not isinstance(output, fx.Node) or not self._var(output):
            raise UnsupportedModelError("the model output must be a single tensor computed from the input")
        out_idx = self.index[self._resolve(output.name)]
        nodes = self._prune(out_idx)
        return fuse_grafted_relus(nodes)

    def _prune(self, out_idx):
        """Keep only ancestors of the output; renumber; fill consumers."""
        keep = set()
        stack = [out_idx]
        while stack:
            i = stack.pop()
            if i in keep:
                continue
            keep.add(i)
            stack.extend(self.nodes[i].inputs)
        return renumber(self.nodes, sorted(keep))

    def _convert(self, n: fx.Node):
        if n.op == "call_module":
            return self._module(n, self.modules[n.target])
        fn = n.target
        name = fn if n.op == "call_method" else getattr(fn, "__name__", str(fn))
        out_shape = self._shape(n)
        if name in _RESHAPE_LIKE:
            # the output shape is read from the recorded values, so any shape arguments are modelled
            x = n.args[0] if n.args else n.kwargs.get("input")
            if not self._var(x):
                raise _Unsupported(f"{name} whose input is not the input-dependent tensor")
            in_shape = self._shape(x)
            if in_shape == out_shape:
                return self._alias(n, x)
            return self._add(n, ReshapeOp(in_shape, out_shape), [x])
        if name not in _SIGNATURES:
            raise _Unsupported(_target_name(n))
        a = _bind(n, name)
        if name in ("relu", "relu_"):
            return self._add(n, ReLUOp(out_shape), [a["input"]])
        if name in _ARITH:
            return self._arith(n, name, a)
        x = a.get("input")
        in_shape = self._shape(x) if self._var(x) else None
        if name in ("permute", "transpose", "pad"):
            if not self._var(x):
                raise _Unsupported(f"{name} whose input is not the input-dependent tensor")
            return self._pad(n, a, x) if name == "pad" else self._permute(n, name, a, x)
        if name in ("cat", "concat", "concatenate"):
            tensors = a["tensors"]
            if not all(self._var(t) for t in tensors):
                raise _Unsupported(f"{name} of a constant with the input-dependent tensor")
            dim = int(a["dim"]) % (len(out_shape) + 1)
            if dim == 0:
                raise _Unsupported(f"{name} along the batch dimension")
            sizes = [self._shape(t)[dim - 1] for t in tensors]
            return self._add(n, CatOp(dim - 1, sizes), list(tensors))
        # matmul / linear: the input-dependent tensor times a constant matrix
        w_arg = a["other"] if name == "matmul" else a["weight"]
        if not self._var(x) or self._var(w_arg) or (name == "linear" and self._var(a["bias"])):
            raise _Unsupported(f"{name} with an input-dependent right operand, weight or bias")
        w = self._const(w_arg)
        if not _is_tensor(w) or w.dim() != 2:
            raise _Unsupported(f"{name} with a constant that is not a matrix")
        if name == "matmul":
            return self._add(n, LinearOp(w.t().contiguous(), None), [x])
        return self._add(n, LinearOp(w, self._const(a["bias"])), [x])

    def _permute(self, n: fx.Node, name: str, a: dict, x: fx.Node):
        """permute / transpose of the input-dependent tensor x (the batch dimension must stay first)."""
        nd = len(self._shape(x)) + 1
        if name == "permute":
            dims = a["dims"]
            dims = dims[0] if len(dims) == 1 and isinstance(dims[0], (list, tuple)) else dims
            dims = [int(d) % nd for d in dims]
        else:
            d0, d1 = int(a["dim0"]) % nd, int(a["dim1"]) % nd
            dims = list(range(nd))
            dims[d0], dims[d1] = dims[d1], dims[d0]
        if dims[0] != 0:
            raise _Unsupported(f"{name} that moves the batch dimension")
        return self._add(n, PermuteOp([d - 1 for d in dims[1:]]), [x])

    def _pad(self, n: fx.Node, a: dict, x: fx.Node):
        """Constant padding of the input-dependent tensor x."""
        if a["mode"] != "constant":
            raise _Unsupported(f"pad mode {a['mode']!r}")
        return self._add(n, PadOp(a["pad"], a["value"] or 0.0, self._shape(x)), [x])

    def _arith(self, n, name, a):
        """+, -, *, / and negation where at least one operand depends on the input."""
        out_shape = self._shape(n)
        if name in ("neg", "__neg__"):
            return self._add(n, ElementwiseAffineOp(-1.0, 0.0, out_shape), [a["input"]])
        p, q = a["input"], a["other"]
        alpha = a.get("alpha", 1)
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
            raise _Unsupported(f"{name} with a non-numeric alpha")
        if a.get("rounding_mode") is not None:
            raise _Unsupported(f"{name} with rounding_mode={a['rounding_mode']!r}")
        kind = _ARITH[name]
        vp, vq = self._var(p), self._var(q)
        if vp and vq:
            if self._shape(p) != out_shape or self._shape(q) != out_shape:
                raise _Unsupported(f"{name} with broadcasting between input-dependent tensors")
            if kind in ("add", "sub"):
                return self._add(n, AddOp(alpha if kind == "add" else -alpha), [p, q])
            raise _Unsupported(f"{name} of two input-dependent tensors (bilinear)")
        x, c, x_first = (p, self._const(q), True) if vp else (q, self._const(p), False)
        if self._shape(x) != out_shape:
            raise _Unsupported(f"{name} with a constant that broadcasts the input to a larger shape")
        if _is_tensor(c) and c.dim() > len(out_shape):  # constant carries a batch dim of 1
            if any(d != 1 for d in c.shape[: c.dim() - len(out_shape)]):
                raise _Unsupported(f"{name} with a batch-sized constant")
            c = c.reshape(c.shape[c.dim() - len(out_shape) :])
        c = torch.as_tensor(c, dtype=torch.float32)
        # y = p + alpha*q (add), p - alpha*q (sub), p*q (mul), p/q (div), with exactly one of p, q constant
        if kind == "add":
            op = ElementwiseAffineOp(1.0, alpha * c, out_shape) if x_first else ElementwiseAffineOp(alpha, c, out_shape)
        elif kind == "sub":
            op = (
                ElementwiseAffineOp(1.0, -alpha * c, out_shape)
                if x_first
                else ElementwiseAffineOp(-alpha, c, out_shape)
            )
        elif kind == "mul":
            op = ElementwiseAffineOp(c, 0.0, out_shape)
        else:
            if not x_first:
                raise _Unsupported("division of a constant by an input-dependent tensor")
            op = ElementwiseAffineOp(1.0 / c, 0.0, out_shape)
        return self._add(n, op, [x])

    def _module(self, n, m: nn.Module):
        t = n.target
        if len(n.args) != 1 or n.kwargs or not self._var(n.args[0]):
            raise _Unsupported(f"module call '{t}' with other arguments than the input-dependent tensor")
        if m._forward_hooks or m._forward_pre_hooks:
            raise _Unsupported(f"module '{t}' with forward hooks (they may change what it computes)")
        x = n.args[0]
        in_shape, out_shape = self._shape(x), self._shape(n)
        if isinstance(m, (nn.Identity, nn.Dropout)) or (isinstance(m, nn.Flatten) and in_shape == out_shape):
            return self._alias(n, x)
        return self._add(n, module_op(m, t, in_shape, out_shape), [x], t)


_Unsupported = UnsupportedCall


_RESHAPE_LIKE = {"flatten", "reshape", "view", "squeeze", "unsqueeze", "contiguous", "view_as", "reshape_as"}

#: function/method name -> operand kind for the elementwise arithmetic the builder models
_ARITH = {
    "add": "add",
    "iadd": "add",
    "sub": "sub",
    "isub": "sub",
    "mul": "mul",
    "imul": "mul",
    "truediv": "div",
    "div": "div",
    "neg": "neg",
    "__neg__": "neg",
}

#: function/method name -> (parameter names in call order, defaults of the ones that may be left out).
#: A ``*`` name takes the remaining positional arguments. Arguments are bound by these names, so positional
#: and keyword calls are read alike, and a keyword the builder does not model is refused by name.
_SIGNATURES: dict[str, tuple[tuple[str, ...], dict]] = {
    "relu": (("input", "inplace"), {"inplace": False}),
    "relu_": (("input",), {}),
    "add": (("input", "other", "alpha"), {"alpha": 1}),
    "sub": (("input", "other", "alpha"), {"alpha": 1}),
    "iadd": (("input", "other"), {}),
    "isub": (("input", "other"), {}),
    "mul": (("input", "other"), {}),
    "imul": (("input", "other"), {}),
    "truediv": (("input", "other"), {}),
    "div": (("input", "other", "rounding_mode"), {"rounding_mode": None}),
    "neg": (("input",), {}),
    "__neg__": (("input",), {}),
    "permute": (("input", "*dims"), {}),
    "transpose": (("input", "dim0", "dim1"), {}),
    "pad": (("input", "pad", "mode", "value"), {"mode": "constant", "value": None}),
    "cat": (("tensors", "dim"), {"dim": 0}),
    "concat": (("tensors", "dim"), {"dim": 0}),
    "concatenate": (("tensors", "dim"), {"dim": 0}),
    "matmul": (("input", "other"), {}),
    "linear": (("input", "weight", "bias"), {"bias": None}),
}


def _bind(n: fx.Node, name: str) -> dict:
    """Map a call's positional and keyword arguments onto the names in :data:`_SIGNATURES`."""
    params, defaults = _SIGNATURES[name]
    args, out = list(n.args), dict(defaults)
    for i, p in enumerate(params):
        if p.startswith("*"):
            out[p[1:]] = tuple(args[i:])
            args = args[:i]
            break
        if i < len(args):
            out[p] = args[i]
    if len(args) > len([p for p in params if not p.startswith("*")]):
        raise _Unsupported(f"{_target_name(n)} with {len(args)} positional arguments")
    for k, v in n.kwargs.items():
        key = k
        if key == "self" or (key == "x" and "input" in params):  # method receivers / F.relu(x=...)
            key = "input"
        if key not in params and f"*{key}" not in params:
            raise _Unsupported(f"{_target_name(n)} with keyword argument {k}=")
        if f"*{key}" in params:
            if not isinstance(v, (list, tuple)):
                raise _Unsupported(f"{_target_name(n)} with {k}= that is not a sequence")
            v = tuple(v)
        out[key] = v
    missing = [p.lstrip("*") for p in params if p.lstrip("*") not in out]
    if missing:
        raise _Unsupported(f"{_target_name(n)} without {', '.join(missing)}")
    return out


def _flat_args(n: fx.Node):
    out = []

    def visit(a):
        if isinstance(a, fx.Node):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            for b in a:
                visit(b)
        elif isinstance(a, dict):
            for b in a.values():
                visit(b)

    visit(n.args)
    visit(n.kwargs)
    return out


def _target_name(n: fx.Node) -> str:
    if n.op == "call_method":
        return f"method {n.target}"
    return f"function {getattr(n.target, '__name__', str(n.target))}"
