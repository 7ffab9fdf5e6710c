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
from lingraft.bounds.module_ops import UnsupportedCall
from lingraft.bounds.nodes import GraphNode, renumber
from lingraft.bounds.ops.base import BoundOp
from lingraft.bounds.registry import LEAF_TYPES, SUPPORTED, Signature, function_entry, is_leaf_module, module_op
from lingraft.errors import UnsupportedModelError

__all__ = ["LEAF_TYPES", "SUPPORTED", "GraphNode", "build_graph", "trace"]


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if is_leaf_module(m):
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

    # --- helpers (the BuildContext of lingraft.bounds.function_ops) -----------------------------------
    def var(self, a) -> TypeGuard[fx.Node]:
        """Whether ``a`` is a node whose value depends on the input."""
        return isinstance(a, fx.Node) and (self._resolve(a.name) in self.index or a.name in self.failed)

    def _resolve(self, name):
        while name in self.aliases:
            name = self.aliases[name]
        return name

    def const(self, a):
        if isinstance(a, fx.Node):
            return self.values[a.name]
        return a

    def shape(self, n: fx.Node) -> tuple:
        v = self.values[n.name]
        return tuple(v.shape[1:])

    def add(self, n: fx.Node, op: BoundOp, inputs: list[fx.Node], module_name=None) -> None:
        idx = [self.index[self._resolve(i.name)] for i in inputs]
        node = GraphNode(n.name, op, idx, self.shape(n), module_name)
        self.index[n.name] = len(self.nodes)
        self.nodes.append(node)

    def alias(self, n: fx.Node, src: fx.Node) -> None:
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
                self.nodes.append(GraphNode(n.name, None, [], self.shape(n)))
                continue
            if n.op == "output":
                output = n.args[0]
                continue
            if n.op == "get_attr":
                continue
            var_args = [a for a in _flat_args(n) if self.var(a)]
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
        if not isinstance(output, fx.Node) or not self.var(output):
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
        """Add the operator of the input-dependent call n (its registry entry's factory / converter)."""
        if n.op == "call_module":
            return self._module(n, self.modules[n.target])
        fn = n.target
        name = str(fn) if n.op == "call_method" else str(getattr(fn, "__name__", fn))
        entry, sig = function_entry(name) or (None, None)
        if entry is None or entry.convert is None:
            raise _Unsupported(_target_name(n))
        return entry.convert(self, n, name, None if sig is None else _bind(n, sig))

    def _module(self, n, m: nn.Module):
        t = n.target
        if len(n.args) != 1 or n.kwargs or not self.var(n.args[0]):
            raise _Unsupported(f"module call '{t}' with other arguments than the input-dependent tensor")
        if m._forward_hooks or m._forward_pre_hooks:
            raise _Unsupported(f"module '{t}' with forward hooks (they may change what it computes)")
        x = n.args[0]
        op = module_op(m, t, self.shape(x), self.shape(n))
        if op is None:  # Identity, Dropout (eval), a Flatten that keeps the shape
            return self.alias(n, x)
        return self.add(n, op, [x], t)


_Unsupported = UnsupportedCall


def _bind(n: fx.Node, sig: Signature) -> dict:
    """Map a call's positional and keyword arguments onto the names of its registry signature."""
    params, defaults = sig
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
