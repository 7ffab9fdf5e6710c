"""Operators that only move values: reshape/flatten, permute, constant padding, concatenation."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from lingraft.bounds.linear_bounds import LinearBounds
from lingraft.bounds.ops.base import AffineMapOp, BoundOp, Bounds, sum_trailing
from lingraft.errors import UnsupportedModelError


class ReshapeOp(BoundOp):
    """Reshape the per-sample value: [B, *in_shape] -> [B, *out_shape] (flatten, view, squeeze, ...)."""

    diagonal = True
    exact_ibp = True
    #: a patch chain may end here when this reshape makes an image plane (the chain checks the node's shape)
    ends_patches = True

    def __init__(self, in_shape, out_shape):
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)

    def forward(self, x):
        return x.reshape(x.shape[0], *self.out_shape)

    def ibp(self, b):
        return self.forward(b[0]), self.forward(b[1])

    def backward(self, lA, uA, input_bounds, **kw):
        f = lambda A: None if A is None else A.reshape(A.shape[0], A.shape[1], *self.in_shape)
        return [(f(lA), f(uA))], 0, 0

    def describe(self):
        return f"Reshape({self.in_shape}->{self.out_shape})"

    def forward_linear(self, ins: list[LinearBounds], refs: list[Bounds], ibp: Bounds) -> LinearBounds:
        return ins[0].map(lambda t: t.reshape(t.shape[0], t.shape[1], *self.out_shape))


class PermuteOp(BoundOp):
    """Permute per-sample dims: dims is a permutation of range(len(shape)) (batch excluded)."""

    diagonal = True
    exact_ibp = True

    def __init__(self, dims):
        self.dims = tuple(int(d) for d in dims)
        self.inv = tuple(sorted(range(len(self.dims)), key=lambda i: self.dims[i]))

    def forward(self, x):
        return x.permute(0, *[d + 1 for d in self.dims])

    def ibp(self, b):
        return self.forward(b[0]), self.forward(b[1])

    def backward(self, lA, uA, input_bounds, **kw):
        f = lambda A: None if A is None else A.permute(0, 1, *[d + 2 for d in self.inv])
        return [(f(lA), f(uA))], 0, 0

    def forward_linear(self, ins: list[LinearBounds], refs: list[Bounds], ibp: Bounds) -> LinearBounds:
        return ins[0].map(lambda t: t.permute(0, 1, *[d + 2 for d in self.dims]))


class PadOp(AffineMapOp):
    """Constant padding of the last dims. pads as in F.pad: (left, right, top, bottom, ...)."""

    diagonal = True
    exact_ibp = True

    def __init__(self, pads, value: float, in_shape):
        self.pads = tuple(int(p) for p in pads)
        self.value = float(value)
        if not math.isfinite(self.value):
            # -inf padding only makes sense in front of a max pool, and an infinite input makes the linear
            # bounds through it infinite or NaN: refuse it up front rather than bound it wrongly
            raise UnsupportedModelError(
                f"Pad with the constant {self.value} is not supported; pad a max pool through its own padding "
                "(nn.MaxPool2d(padding=...) / the ONNX MaxPool pads attribute) instead"
            )
        self.in_shape = tuple(in_shape)

    @property
    def patchable(self) -> bool:  # type: ignore[override]
        """Zero padding of an image plane (no cropping): the patches only move; other values would add biases."""
        return self.value == 0.0 and len(self.pads) == 4 and not any(p < 0 for p in self.pads)

    def patch_backward(self, pp, k):
        """Zero padding: the patches keep their values and move to the unpadded plane's coordinates."""
        left, _, top, _ = self.pads
        pp.y0, pp.x0 = pp.y0 - top, pp.x0 - left

    def forward(self, x):
        return F.pad(x, self.pads, value=self.value)

    def ibp(self, b):
        return self.forward(b[0]), self.forward(b[1])

    def _back(self, A):
        sl = [slice(None)] * A.dim()
        nd = len(self.pads) // 2
        for k in range(nd):
            lo, hi = self.pads[2 * k], self.pads[2 * k + 1]
            dim = A.dim() - 1 - k
            size = A.shape[dim]
            sl[dim] = slice(lo, size - hi)
        if any(p < 0 for p in self.pads):
            raise NotImplementedError("negative padding (cropping) is not supported")
        inner = A[tuple(sl)]
        bias: Tensor | int = 0
        if self.value != 0.0:
            bias = (sum_trailing(A) - sum_trailing(inner)) * self.value
        return inner, bias

    def forward_linear(self, ins: list[LinearBounds], refs: list[Bounds], ibp: Bounds) -> LinearBounds:
        (x,) = ins
        out = x.map(lambda t: F.pad(t, self.pads))
        if self.value != 0.0:  # the padding value is a constant: it goes to the constant row only
            out.mid[:, -1] = F.pad(x.mid[:, -1], self.pads, value=self.value)
        return out


class CatOp(BoundOp):
    """Concatenate inputs along per-sample dim ``dim`` (0-based, batch excluded)."""

    def __init__(self, dim: int, sizes):
        self.dim = int(dim)
        self.sizes = [int(s) for s in sizes]

    def forward(self, *xs):
        return torch.cat(xs, dim=self.dim + 1)

    def ibp(self, *bs):
        return torch.cat([b[0] for b in bs], self.dim + 1), torch.cat([b[1] for b in bs], self.dim + 1)

    def backward(self, lA, uA, input_bounds, **kw):
        ls = [None] * len(self.sizes) if lA is None else torch.split(lA, self.sizes, dim=self.dim + 2)
        us = [None] * len(self.sizes) if uA is None else torch.split(uA, self.sizes, dim=self.dim + 2)
        return list(zip(ls, us)), 0, 0

    def forward_linear(self, ins: list[LinearBounds], refs: list[Bounds], ibp: Bounds) -> LinearBounds:
        mid = torch.cat([x.mid for x in ins], self.dim + 2)
        if all(x.rad is None for x in ins):
            return LinearBounds(mid, None)
        rad = torch.cat([torch.zeros_like(x.mid) if x.rad is None else x.rad for x in ins], self.dim + 2)
        return LinearBounds(mid, rad)
