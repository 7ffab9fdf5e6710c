"""The bound operator of each supported torch function / tensor method (fx ``call_function`` / ``call_method``).

A converter takes the graph builder (:class:`BuildContext`: which values depend on the input, their per-sample
shapes, the values of constants), the fx node, the call's name and its arguments bound by name (the signature
comes from :mod:`lingraft.bounds.registry`; None for calls whose arguments are not read), and adds the node's
operator, or aliases the node to its input; it raises :class:`UnsupportedCall` naming what it cannot model.
"""

from __future__ import annotations

from typing import Any, Protocol, TypeGuard

import torch
import torch.fx as fx

from lingraft.bounds.module_ops import UnsupportedCall
from lingraft.bounds.ops import AddOp, CatOp, ElementwiseAffineOp, LinearOp, PadOp, PermuteOp, ReLUOp, ReshapeOp
from lingraft.bounds.ops.base import BoundOp


class BuildContext(Protocol):
    """What a converter may ask of the graph builder (:class:`lingraft.bounds.graph._Builder`)."""

    def var(self, a: Any) -> TypeGuard[fx.Node]:
        """Whether ``a`` is a node whose value depends on the input."""
        ...

    def const(self, a: Any) -> Any:
        """The value of a constant argument (a recorded node value or a literal)."""
        ...

    def shape(self, n: fx.Node) -> tuple:
        """The per-sample shape of node n's value (batch dim excluded)."""
        ...

    def add(self, n: fx.Node, op: BoundOp, inputs: list[fx.Node], module_name: str | None = None) -> None:
        """Add node n computing ``op`` of ``inputs`` (input-dependent nodes)."""
        ...

    def alias(self, n: fx.Node, src: fx.Node) -> None:
        """Node n has src's value (a call that passes its input through)."""
        ...


def _is_tensor(v) -> bool:
    return isinstance(v, torch.Tensor)


def reshape_like(b: BuildContext, n: fx.Node, name: str, a: dict | None) -> None:
    """flatten / reshape / view / squeeze / ...: the output shape is read from the recorded values, so any shape
    arguments are modelled. [B, *in_shape] -> [B, *out_shape]."""
    x = n.args[0] if n.args else n.kwargs.get("input")
    if not b.var(x):
        raise UnsupportedCall(f"{name} whose input is not the input-dependent tensor")
    in_shape, out_shape = b.shape(x), b.shape(n)
    if in_shape == out_shape:
        return b.alias(n, x)
    return b.add(n, ReshapeOp(in_shape, out_shape), [x])


def relu(b: BuildContext, n: fx.Node, name: str, a: dict) -> None:
    """F.relu / torch.relu / x.relu(): [B, *shape] -> [B, *shape]."""
    return b.add(n, ReLUOp(b.shape(n)), [a["input"]])


def permute(b: BuildContext, n: fx.Node, name: str, a: dict) -> None:
    """permute / transpose of the input-dependent tensor (the batch dimension must stay first)."""
    x = a.get("input")
    if not b.var(x):
        raise UnsupportedCall(f"{name} whose input is not the input-dependent tensor")
    nd = len(b.shape(x)) + 1
    if name == "permute":
        dims = a["dims"]
        dims = dims[0] if len(dims) == 1 and isinstance(dims[0], (list, tuple)) else dims
        dims = [int(d) % nd for d in dims]
    else:
        d0, d1 = int(a["dim0"]) % nd, int(a["dim1"]) % nd
        dims = list(range(nd))
        dims[d0], dims[d1] = dims[d1], dims[d0]
    if dims[0] != 0:
        raise UnsupportedCall(f"{name} that moves the batch dimension")
    return b.add(n, PermuteOp([d - 1 for d in dims[1:]]), [x])


def pad(b: BuildContext, n: fx.Node, name: str, a: dict) -> None:
    """Constant padding (F.pad) of the input-dependent tensor."""
    x = a.get("input")
    if not b.var(x):
        raise UnsupportedCall(f"{name} whose input is not the input-dependent tensor")
    if a["mode"] != "constant":
        raise UnsupportedCall(f"pad mode {a['mode']!r}")
    return b.add(n, PadOp(a["pad"], a["value"] or 0.0, b.shape(x)), [x])


def cat(b: BuildContext, n: fx.Node, name: str, a: dict) -> None:
    """Concatenation of input-dependent tensors along a non-batch dim."""
    tensors = a["tensors"]
    out_shape = b.shape(n)
    if not all(b.var(t) for t in tensors):
        raise UnsupportedCall(f"{name} of a constant with the input-dependent tensor")
    dim = int(a["dim"]) % (len(out_shape) + 1)
    if dim == 0:
        raise UnsupportedCall(f"{name} along the batch dimension")
    sizes = [b.shape(t)[dim - 1] for t in tensors]
    return b.add(n, CatOp(dim - 1, sizes), list(tensors))


def matmul(b: BuildContext, n: fx.Node, name: str, a: dict) -> None:
    """matmul / F.linear: the input-dependent tensor times a constant matrix (on the last dim)."""
    x = a.get("input")
    w_arg = a["other"] if name == "matmul" else a["weight"]
    if not b.var(x) or b.var(w_arg) or (name == "linear" and b.var(a["bias"])):
        raise UnsupportedCall(f"{name} with an input-dependent right operand, weight or bias")
    w = b.const(w_arg)
    if not _is_tensor(w) or w.dim() != 2:
        raise UnsupportedCall(f"{name} with a constant that is not a matrix")
    if name == "matmul":
        return b.add(n, LinearOp(w.t().contiguous(), None), [x])
    return b.add(n, LinearOp(w, b.const(a["bias"])), [x])


#: function/method name -> operand kind for the elementwise arithmetic the builder models
ARITH_KIND = {
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


def arith(b: BuildContext, n: fx.Node, name: str, a: dict) -> None:
    """+, -, *, / and negation where at least one operand depends on the input: an AddOp of two input-dependent
    tensors, else an ElementwiseAffineOp with the constant operand."""
    out_shape = b.shape(n)
    if name in ("neg", "__neg__"):
        return b.add(n, ElementwiseAffineOp(-1.0, 0.0, out_shape), [a["input"]])
    p, q = a["input"], a["other"]
    alpha = a.get("alpha", 1)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise UnsupportedCall(f"{name} with a non-numeric alpha")
    if a.get("rounding_mode") is not None:
        raise UnsupportedCall(f"{name} with rounding_mode={a['rounding_mode']!r}")
    kind = ARITH_KIND[name]
    vp, vq = b.var(p), b.var(q)
    if vp and vq:
        if b.shape(p) != out_shape or b.shape(q) != out_shape:
            raise UnsupportedCall(f"{name} with broadcasting between input-dependent tensors")
        if kind in ("add", "sub"):
            return b.add(n, AddOp(alpha if kind == "add" else -alpha), [p, q])
        raise UnsupportedCall(f"{name} of two input-dependent tensors (bilinear)")
    x, c, x_first = (p, b.const(q), True) if vp else (q, b.const(p), False)
    if b.shape(x) != out_shape:
        raise UnsupportedCall(f"{name} with a constant that broadcasts the input to a larger shape")
    if _is_tensor(c) and c.dim() > len(out_shape):  # constant carries a batch dim of 1
        if any(d != 1 for d in c.shape[: c.dim() - len(out_shape)]):
            raise UnsupportedCall(f"{name} with a batch-sized constant")
        c = c.reshape(c.shape[c.dim() - len(out_shape) :])
    c = torch.as_tensor(c, dtype=torch.float32)
    return b.add(n, _affine_with_constant(kind, c, alpha, x_first, out_shape), [x])


def _affine_with_constant(kind: str, c, alpha, x_first: bool, out_shape) -> ElementwiseAffineOp:
    """y = p + alpha*q (add), p - alpha*q (sub), p*q (mul), p/q (div), with exactly one of p, q the constant c
    (x_first: p is the input-dependent one)."""
    if kind == "add":
        return ElementwiseAffineOp(1.0, alpha * c, out_shape) if x_first else ElementwiseAffineOp(alpha, c, out_shape)
    if kind == "sub":
        return ElementwiseAffineOp(1.0, -alpha * c, out_shape) if x_first else ElementwiseAffineOp(-alpha, c, out_shape)
    if kind == "mul":
        return ElementwiseAffineOp(c, 0.0, out_shape)
    if not x_first:
        raise UnsupportedCall("division of a constant by an input-dependent tensor")
    return ElementwiseAffineOp(1.0 / c, 0.0, out_shape)
