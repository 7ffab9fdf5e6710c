"""Elementwise affine maps y = x * scale + shift (Normalize, eval BatchNorm, mul/div/add/sub by constants)."""

from __future__ import annotations

import torch
from torch import Tensor

from lingraft.bounds.linear_bounds import LinearBounds, add_constant
from lingraft.bounds.ops.base import AffineMapOp, BoundOp, Bounds, sum_trailing


class ElementwiseAffineOp(AffineMapOp):
    """y = x * scale + shift, with ``scale`` and ``shift`` broadcastable to the per-sample shape.

    x: [B, *shape] -> y: [B, *shape].  Diagonal: maps a box onto a box exactly.
    """

    diagonal = True
    exact_ibp = True
    patchable = True

    def __init__(self, scale: Tensor | float, shift: Tensor | float, shape):
        shape = tuple(shape)
        self.scale = torch.as_tensor(scale, dtype=torch.float32).detach().expand(shape).clone()
        self.shift = torch.as_tensor(shift, dtype=torch.float32).detach().expand(shape).clone()

    def forward(self, x):
        return x * self.scale + self.shift

    def ibp(self, b):
        lo, up = b
        c, r = (up + lo) / 2, (up - lo) / 2
        yc = c * self.scale + self.shift
        yr = r * self.scale.abs()
        return yc - yr, yc + yr

    def _back(self, A):
        return A * self.scale, sum_trailing(A * self.shift)

    def patch_backward(self, pp, k):
        """Scale the patches by ``scale`` at their positions; the shift goes into the biases."""
        sc, sh = pp.gather(self.scale.unsqueeze(0)), pp.gather(self.shift.unsqueeze(0))
        pp.lb = pp.lb + (pp.lP * sh).flatten(2).sum(-1)
        pp.ub = pp.ub + (pp.uP * sh).flatten(2).sum(-1)
        pp.lP, pp.uP = pp.lP * sc, pp.uP * sc

    def describe(self):
        return "ElementwiseAffine"

    def forward_linear(self, ins: list[LinearBounds], refs: list[Bounds], ibp: Bounds) -> LinearBounds:
        (x,) = ins
        mid = add_constant(x.mid * self.scale, self.shift)
        return LinearBounds(mid, None if x.rad is None else x.rad * self.scale.abs())


class AddOp(BoundOp):
    """y = x1 + alpha * x2 for two variable inputs (a residual connection; alpha = -1 is a subtraction).

    x1, x2: [B, *shape] -> y: [B, *shape].  Linear, so each input's coefficients are the output's, scaled:
    the lower-bound coefficients of the output stay lower-bound coefficients of each input (a negative
    alpha flips the sign of the coefficients, never the side they bound).
    """

    def __init__(self, alpha: float = 1.0):
        self.alpha = float(alpha)

    def forward(self, a, b):
        return a + self.alpha * b if self.alpha != 1.0 else a + b

    def ibp(self, b1, b2):
        if self.alpha >= 0:
            return b1[0] + self.alpha * b2[0], b1[1] + self.alpha * b2[1]
        return b1[0] + self.alpha * b2[1], b1[1] + self.alpha * b2[0]

    def backward(self, lA, uA, input_bounds, **kw):
        if self.alpha == 1.0:
            return [(lA, uA), (lA, uA)], 0, 0
        scaled = tuple(None if A is None else A * self.alpha for A in (lA, uA))
        return [(lA, uA), scaled], 0, 0

    def describe(self):
        return "Add" if self.alpha == 1.0 else ("Sub" if self.alpha == -1.0 else f"Add(alpha={self.alpha:g})")

    def forward_linear(self, ins: list[LinearBounds], refs: list[Bounds], ibp: Bounds) -> LinearBounds:
        a, b = ins
        mid = a.mid + self.alpha * b.mid
        if a.rad is None and b.rad is None:
            return LinearBounds(mid, None)
        w = abs(self.alpha)
        rad = a.rad if b.rad is None else (w * b.rad if a.rad is None else a.rad + w * b.rad)
        return LinearBounds(mid, rad)
