"""ReLU and grafted ReLU.

A grafted neuron (mask m = 1) computes a*x + b exactly: it gets no relaxation and needs no pre-activation
bounds. The other neurons use the CROWN relaxation of ReLU: for an unstable neuron (l < 0 < u) the upper
line through (l, 0) and (u, u), and a lower line alpha*x with alpha in [0, 1] (CROWN's adaptive choice:
alpha = 1 if u > -l else 0; alpha-CROWN optimizes it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import BoundOp, pos, neg, sum_trailing


class ReLUOp(BoundOp):
    """relu(x) per neuron, or a*x + b on grafted neurons.  x: [B, *shape] -> [B, *shape].

    mask/a/b: [*shape] tensors or None (plain ReLU).
    """

    nonlinear = True
    linear = False

    def __init__(self, shape, mask: Tensor | None = None, a: Tensor | None = None, b: Tensor | None = None):
        self.shape = tuple(shape)
        if mask is not None and bool(mask.any()):
            self.mask = mask.detach().bool()
            self.a = (a.detach() * self.mask)
            self.b = (b.detach() * self.mask)
        else:
            self.mask = None
            self.a = self.b = None

    @property
    def num_grafted(self) -> int:
        return 0 if self.mask is None else int(self.mask.sum())

    @property
    def fully_grafted(self) -> bool:
        return self.mask is not None and bool(self.mask.all())

    def needed_rows(self) -> Tensor | None:
        """Flat indices of neurons whose pre-activation bounds are needed (the non-grafted ones); None = all."""
        if self.mask is None:
            return None
        return torch.nonzero(~self.mask.flatten(), as_tuple=False).flatten()

    def forward(self, x):
        y = F.relu(x)
        if self.mask is not None:
            y = torch.where(self.mask, x * self.a + self.b, y)
        return y

    def ibp(self, bnd):
        lo, up = bnd
        yl, yu = F.relu(lo), F.relu(up)
        if self.mask is not None:
            gl = torch.minimum(lo * self.a, up * self.a) + self.b
            gu = torch.maximum(lo * self.a, up * self.a) + self.b
            yl = torch.where(self.mask, gl, yl)
            yu = torch.where(self.mask, gu, yu)
        return yl, yu

    def unstable_mask(self, lo: Tensor, up: Tensor) -> Tensor:
        """[B, *shape] bool: non-grafted neurons whose pre-activation interval crosses zero."""
        m = (lo < 0) & (up > 0)
        if self.mask is not None:
            m = m & ~self.mask
        return m

    def relaxation(self, lo: Tensor, up: Tensor):
        """Upper line (slope, intercept), default lower slope, and the unstable mask. All [B, *shape]."""
        # grafted neurons may carry +-inf bounds (never computed); keep the arithmetic finite
        if self.mask is not None:
            lo = torch.where(self.mask, torch.zeros_like(lo), lo)
            up = torch.where(self.mask, torch.zeros_like(up), up)
        unstable = (lo < 0) & (up > 0)
        active = lo >= 0
        denom = torch.where(unstable, up - lo, torch.ones_like(up))
        u_slope = torch.where(unstable, up / denom, active.to(lo.dtype))
        u_int = torch.where(unstable, -u_slope * lo, torch.zeros_like(lo))
        l_slope = torch.where(unstable, (up > -lo).to(lo.dtype), active.to(lo.dtype))
        return u_slope, u_int, l_slope, unstable

    def backward(self, lA, uA, input_bounds, alpha=None, **kw):
        lo, up = input_bounds[0]
        u_slope, u_int, l_slope, unstable = self.relaxation(lo, up)
        u_slope, u_int = u_slope.unsqueeze(1), u_int.unsqueeze(1)
        if self.mask is not None:
            m = self.mask
            u_slope = torch.where(m, self.a, u_slope)
            u_int = torch.where(m, self.b, u_int)
        lb = ub = 0
        la = ua = None
        for side in ("l", "u"):
            A = lA if side == "l" else uA
            if A is None:
                continue
            # lower slope: the optimized alpha on unstable neurons when given, the adaptive choice otherwise
            ls = l_slope.unsqueeze(1)
            if alpha is not None and alpha.get(side) is not None:
                ls = torch.where(unstable.unsqueeze(1), alpha[side], ls)
            li = torch.zeros_like(ls)
            if self.mask is not None:
                ls = torch.where(self.mask, self.a, ls)
                li = torch.where(self.mask, self.b, li)
            Ap, An = pos(A), neg(A)
            if side == "l":
                la = Ap * ls + An * u_slope
                lb = sum_trailing(Ap * li + An * u_int)
            else:
                ua = Ap * u_slope + An * ls
                ub = sum_trailing(Ap * u_int + An * li)
        return [(la, ua)], lb, ub

    def describe(self):
        return f"ReLU({'x'.join(map(str, self.shape))}" + (f", grafted={self.num_grafted})" if self.mask is not None else ")")
