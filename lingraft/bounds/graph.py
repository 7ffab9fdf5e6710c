"""Build the bound engine's graph from a PyTorch module via torch.fx.

Every node of the traced graph that depends on the input becomes a :class:`GraphNode` holding one operator
from :mod:`lingraft.bounds.ops`; nodes that do not depend on the input are constants and are folded into the
operators that use them. Anything outside the supported vocabulary is reported up front, all at once,
before any bound is computed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypeGuard

import torch
import torch.fx as fx
from torch import nn

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


@dataclass
class GraphNode:
    """One operator applied to earlier nodes. ``shape`` is the per-sample output shape (no batch)."""

    name: str
    op: BoundOp | None  # None for the input node
    inputs: list[int]
    shape: tuple
    module_name: str | None = None
    consumers: list[int] = field(default_factory=list)

    @property
    def bound_op(self) -> BoundOp:
        """The operator of a node that has one (every node but the input)."""
        if self.op is None:
            raise RuntimeError(f"graph node {self.name!r} is the input; it has no operator")
        return self.op


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
        return _renumber(self.nodes, sorted(keep))

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
        if isinstance(m, nn.Linear):
            return self._add(n, LinearOp(m.weight, m.bias), [x], t)
        if isinstance(m, nn.Conv2d):
            if m.padding_mode != "zeros":
                raise _Unsupported(f"Conv2d ('{t}') with padding_mode={m.padding_mode!r}")
            if tuple(m.dilation) != (1, 1):
                raise _Unsupported(f"Conv2d ('{t}') with dilation={tuple(m.dilation)}")
            if m.padding == "same":
                if any(k % 2 == 0 for k in m.kernel_size):
                    raise _Unsupported(f"Conv2d ('{t}') with padding='same' and an even kernel")
                pad = tuple((k - 1) // 2 for k in m.kernel_size)
            elif m.padding == "valid":
                pad = (0, 0)
            elif isinstance(m.padding, str):  # torch itself accepts no other string
                raise _Unsupported(f"Conv2d ('{t}') with padding={m.padding!r}")
            else:
                pad = tuple(m.padding)
            return self._add(n, ConvOp(m.weight, m.bias, m.stride, pad, m.groups, in_shape, out_shape), [x], t)
        if isinstance(m, nn.ReLU):
            return self._add(n, ReLUOp(out_shape), [x], t)
        if isinstance(m, GraftedReLU):
            if not bool(((m.mask == 0) | (m.mask == 1)).all()):
                raise _Unsupported(
                    f"GraftedReLU ('{t}') whose mask is not 0/1 (a damaged or hand-edited "
                    "checkpoint: re-run lingraft graft)"
                )
            return self._add(
                n,
                ReLUOp(out_shape, m.mask.reshape(out_shape) > 0.5, m.a.reshape(out_shape), m.b.reshape(out_shape)),
                [x],
                t,
            )
        if isinstance(m, Normalize):
            C = in_shape[0] if len(in_shape) >= 1 else 1
            mean, std = m.mean, m.std
            if mean.numel() > 1:
                shp = (C,) + (1,) * (len(in_shape) - 1)
                mean, std = mean.reshape(shp), std.reshape(shp)
            return self._add(n, ElementwiseAffineOp(1.0 / std, -mean / std, out_shape), [x], t)
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            if m.training or m.running_mean is None or m.running_var is None:
                raise _Unsupported("BatchNorm in training mode or without running statistics")
            inv = 1.0 / torch.sqrt(m.running_var + m.eps)
            w = m.weight if m.weight is not None else torch.ones_like(inv)
            b = m.bias if m.bias is not None else torch.zeros_like(inv)
            scale, shift = w * inv, b - m.running_mean * w * inv
            shp = (in_shape[0],) + (1,) * (len(in_shape) - 1)
            return self._add(n, ElementwiseAffineOp(scale.reshape(shp), shift.reshape(shp), out_shape), [x], t)
        if isinstance(m, nn.AvgPool2d):
            k = _pair(m.kernel_size)
            s = _pair(m.stride if m.stride is not None else m.kernel_size)
            p = _pair(m.padding)
            if m.ceil_mode or (p != (0, 0) and not m.count_include_pad) or m.divisor_override:
                raise _Unsupported("AvgPool2d with ceil_mode, divisor_override or count_include_pad=False")
            C = in_shape[0]
            mean_kernel = torch.full((C, 1) + k, 1.0 / (k[0] * k[1]))
            return self._add(n, ConvOp(mean_kernel, None, s, p, C, in_shape, out_shape), [x], t)
        if isinstance(m, nn.MaxPool2d):
            k, s, p = _pair(m.kernel_size), _pair(m.stride if m.stride is not None else m.kernel_size), _pair(m.padding)
            if p != (0, 0) or _pair(m.dilation) != (1, 1) or m.ceil_mode or m.return_indices:
                raise _Unsupported(f"MaxPool2d ('{t}') with padding, dilation, ceil_mode or return_indices")
            return self._add(n, MaxPoolOp(k, s, in_shape, out_shape), [x], t)
        if isinstance(m, nn.Flatten):
            if in_shape == out_shape:
                return self._alias(n, x)
            return self._add(n, ReshapeOp(in_shape, out_shape), [x], t)
        if isinstance(m, (nn.ZeroPad2d, nn.ConstantPad2d)):
            value = getattr(m, "value", 0.0)
            return self._add(n, PadOp(m.padding, value, in_shape), [x], t)
        if isinstance(m, (nn.Identity, nn.Dropout)):
            return self._alias(n, x)
        if hasattr(m, "interval_bounds"):
            return self._add(n, OpaqueOp(m), [x], t)
        raise _Unsupported(f"module {type(m).__name__} ('{t}')")


class _Unsupported(Exception):
    """An operation the engine cannot bound; its message names it for the UnsupportedModelError."""


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


def fuse_grafted_relus(nodes: list[GraphNode]) -> list[GraphNode]:
    """Rewrite relu(s*x) + t*x (+ c) back into one grafted ReLU operator.

    That is how a GraftedReLU is written in ONNX (Mul, Relu, Mul, Add, Add) and how an imported grafted network
    arrives. Fused, its grafted neurons (s = 0) are exact linear maps a = t, b = c that need no pre-activation
    bounds and are never branched on, and the patch-mode conv passes apply again. Only the exact pattern is
    fused: s in {0, 1} per neuron, t = c = 0 where s = 1, every intermediate node used once.
    """

    def scale_only(i):
        """nodes[i]'s op when it is x * scale (no shift) used once, else None."""
        op = nodes[i].op
        if not isinstance(op, ElementwiseAffineOp) or len(nodes[i].consumers) != 1 or bool(op.shift.any()):
            return None
        return op

    replaced: dict[int, GraphNode] = {}  # index of the pattern's last node -> fused node
    removed: set[int] = set()
    for k, nd in enumerate(nodes):
        if not isinstance(nd.op, AddOp) or nd.op.alpha != 1.0 or len(set(nd.inputs)) != 2:
            continue
        for r, m2 in (nd.inputs, nd.inputs[::-1]):
            rop = nodes[r].op
            if not isinstance(rop, ReLUOp) or rop.mask is not None or len(nodes[r].consumers) != 1:
                continue
            m1 = nodes[r].inputs[0]
            op1, op2 = scale_only(m1), scale_only(m2)
            if op1 is None or op2 is None or nodes[m1].inputs != nodes[m2].inputs or m1 in removed or m2 in removed:
                continue
            sc, t = op1.scale, op2.scale
            if not bool(((sc == 0) | (sc == 1)).all()) or bool((t[sc == 1] != 0).any()):
                continue
            last, c = k, torch.zeros_like(t)
            if len(nd.consumers) == 1:
                opc = nodes[nd.consumers[0]].op
                if (
                    isinstance(opc, ElementwiseAffineOp)
                    and bool((opc.scale == 1).all())
                    and not bool((opc.shift.expand_as(t)[sc == 1] != 0).any())
                ):
                    last, c = nd.consumers[0], opc.shift.expand_as(t).clone()
            graft = sc == 0
            fused = GraphNode(
                nodes[r].name,
                ReLUOp(nodes[r].shape, graft, t, c),
                list(nodes[m1].inputs),
                nodes[r].shape,
                nodes[r].module_name,
            )
            replaced[last] = fused
            removed |= {m1, r, m2, k} - {last}
            break
    if not replaced:
        return nodes
    return _renumber(
        [replaced.get(i, nd) for i, nd in enumerate(nodes)], [i for i in range(len(nodes)) if i not in removed]
    )


def _renumber(nodes: list[GraphNode], order: list[int]) -> list[GraphNode]:
    """Keep nodes[order] (ascending, closed under inputs), renumber their inputs and refill consumers."""
    remap = {old: new for new, old in enumerate(order)}
    out = []
    for old in order:
        nd = nodes[old]
        nd.inputs = [remap[i] for i in nd.inputs]
        nd.consumers = []
        out.append(nd)
    for i, nd in enumerate(out):
        for j in nd.inputs:
            out[j].consumers.append(i)
    return out


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


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
