"""A leaf module bounded only by its own interval method (e.g. local self-attention).

The backward pass stops at such a node and concretizes its coefficients against the node's output
interval: sound, and as tight as the module's ``interval_bounds`` allows.
"""

from __future__ import annotations

import torch

from lingraft.bounds.linear_bounds import LinearBounds
from lingraft.bounds.ops.base import BoundOp, Bounds, neg, pos, sum_trailing


class OpaqueOp(BoundOp):
    """Wraps ``module`` with ``interval_bounds(lower, upper) -> (lower, upper)``."""

    nonlinear = True
    linear = False
    cuts_backward = True

    def __init__(self, module):
        self.module = module

    def forward(self, x):
        return self.module(x)

    def ibp(self, b):
        return self.module.interval_bounds(b[0], b[1])

    def backward(self, lA, uA, input_bounds, out_bounds=None, **kw):
        lo, up = out_bounds
        lo, up = lo.unsqueeze(1), up.unsqueeze(1)
        lb = 0 if lA is None else sum_trailing(pos(lA) * lo + neg(lA) * up)
        ub = 0 if uA is None else sum_trailing(pos(uA) * up + neg(uA) * lo)
        return [(None, None)], lb, ub

    def to(self, device):
        self.module.to(device)
        return self

    def describe(self):
        return f"Opaque({type(self.module).__name__})"

    def forward_linear(self, ins: list[LinearBounds], refs: list[Bounds], ibp: Bounds) -> LinearBounds:
        """Cut: the node's interval as constant bounds."""
        lo, up = ibp
        B = lo.shape[0]
        m = ins[0].mid.shape[1]
        mid = torch.zeros(B, m, *lo.shape[1:], dtype=lo.dtype, device=lo.device)
        rad = torch.zeros_like(mid)
        mid[:, -1], rad[:, -1] = (up + lo) / 2, (up - lo) / 2
        return LinearBounds(mid, rad)
