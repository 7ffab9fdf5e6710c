"""Pooling: average pooling is a grouped convolution (see graph building); max pooling is relaxed here."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lingraft.bounds.linear_bounds import LinearBounds
from lingraft.bounds.ops.base import BoundOp, Bounds, neg, pos, sum_trailing


class MaxPoolOp(BoundOp):
    """2-D max pooling (dilation 1; padding and ceil_mode as in torch).  x: [B, C, H, W] -> [B, C, H_out, W_out].

    Padding is -inf (max pooling ignores it): every window holds at least one input (torch's rule), and only
    inputs are ever chosen. Relaxation per window: lower bound out >= x_j* with j* the input of largest lower
    bound; upper bound out <= max_j u_j, or out = x_j* exactly when x_j*'s lower bound dominates every other
    upper bound.
    """

    nonlinear = True
    linear = False

    def __init__(self, kernel, stride, in_shape, out_shape, padding=(0, 0), ceil_mode: bool = False):
        self.k = tuple(kernel)
        self.s = tuple(stride)
        self.p = tuple(padding)
        self.ceil_mode = bool(ceil_mode)
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)

    def forward(self, x):
        return F.max_pool2d(x, self.k, self.s, self.p, 1, self.ceil_mode)

    def ibp(self, b):
        return self.forward(b[0]), self.forward(b[1])

    def _windows(self, t):
        """[B, C, H, W] -> [B, C, K, L] values of each window (-inf where a window covers padding)."""
        B, C, H, W = t.shape
        Ho, Wo = self.out_shape[1:]
        # pad top/left by p and bottom/right up to the last window (ceil_mode may need more than p)
        bottom = (Ho - 1) * self.s[0] + self.k[0] - H - self.p[0]
        right = (Wo - 1) * self.s[1] + self.k[1] - W - self.p[1]
        if self.p != (0, 0) or bottom > 0 or right > 0:
            t = F.pad(t, (self.p[1], right, self.p[0], bottom), value=float("-inf"))
        return F.unfold(t, self.k, stride=self.s).reshape(B, C, self.k[0] * self.k[1], -1)

    def choice(self, lo: Tensor, up: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The relaxation's choice per window from the input bounds lo, up [B, C, H, W]: (flat [B, C, Ho*Wo] input
        index of x_j*, the input of largest lower bound; exact [B, C, Ho, Wo]: x_j*'s lower bound is at least every
        other input's upper bound, so out = x_j*; umax [B, C, Ho, Wo]: the largest upper bound)."""
        B, C, H, W = lo.shape
        Ho, Wo = self.out_shape[1:]
        kw = self.k[1]
        lw, uw = self._windows(lo), self._windows(up)  # [B, C, K, L]
        # j* among the inputs only: an input's lower bound of -inf must not tie with the padding's -inf
        jstar = lw.clamp(min=torch.finfo(lw.dtype).min).max(2).indices  # [B, C, L]
        lmax = lw.gather(2, jstar.unsqueeze(2)).squeeze(2)
        umax = uw.max(2).values
        # exact when the best lower bound is at least every other input's upper bound
        u_others = uw.scatter(2, jstar.unsqueeze(2), float("-inf")).max(2).values
        exact = lmax >= u_others
        L = torch.arange(Ho * Wo, device=lo.device)
        row = (L // Wo) * self.s[0] + jstar // kw - self.p[0]
        col = (L % Wo) * self.s[1] + jstar % kw - self.p[1]
        return row * W + col, exact.reshape(B, C, Ho, Wo), umax.reshape(B, C, Ho, Wo)

    def backward(self, lA, uA, input_bounds, **kw):
        lo, up = input_bounds[0]
        B, C, H, W = lo.shape
        Ho, Wo = self.out_shape[1:]
        flat, exact, umax = self.choice(lo, up)

        def to_input(coef):  # coef [B, S, C, Ho, Wo] on x_j* -> [B, S, C, H, W]
            S = coef.shape[1]
            out = torch.zeros(B, S, C, H * W, dtype=coef.dtype, device=coef.device)
            idx = flat.unsqueeze(1).expand(B, S, C, Ho * Wo)
            out.scatter_add_(3, idx, coef.reshape(B, S, C, Ho * Wo))
            return out.reshape(B, S, C, H, W)

        la = ua = None
        lb: Tensor | int = 0
        ub: Tensor | int = 0
        if lA is not None:
            Ap, An = pos(lA), neg(lA)
            # negative coefficients need the upper relaxation: x_j* when exact, else the constant umax
            coef = Ap + torch.where(exact.unsqueeze(1), An, torch.zeros_like(An))
            la = to_input(coef)
            lb = sum_trailing(torch.where(exact.unsqueeze(1), torch.zeros_like(An), An * umax.unsqueeze(1)))
        if uA is not None:
            Ap, An = pos(uA), neg(uA)
            coef = An + torch.where(exact.unsqueeze(1), Ap, torch.zeros_like(Ap))
            ua = to_input(coef)
            ub = sum_trailing(torch.where(exact.unsqueeze(1), torch.zeros_like(Ap), Ap * umax.unsqueeze(1)))
        return [(la, ua)], lb, ub

    def describe(self):
        extra = (f", p={self.p}" if self.p != (0, 0) else "") + (", ceil_mode" if self.ceil_mode else "")
        return f"MaxPool2d(k={self.k}, s={self.s}{extra})"

    def forward_linear_ok(self) -> bool:
        return self.p == (0, 0) and not self.ceil_mode  # forward mode has no padded or ceil-mode windows

    def forward_linear(self, ins: list[LinearBounds], refs: list[Bounds], ibp: Bounds) -> LinearBounds:
        """Lower: the window's input j* of largest lower bound; upper: x_j* where its lower bound is at least
        every other input's upper bound (exact), else the constant max of the upper bounds."""
        (x,) = ins
        lo, up = refs[0]
        B, C, H, W = lo.shape
        Ho, Wo = self.out_shape[1:]
        flat, exact, umax = self.choice(lo, up)  # the backward pass's relaxation: [B, C, L], [B, C, Ho, Wo] x2
        m = x.mid.shape[1]
        idx = flat.unsqueeze(1).expand(B, m, C, Ho * Wo)

        def pick(t: Tensor) -> Tensor:  # [B, m, C, H, W] -> x_j* coefficients [B, m, C, Ho, Wo]
            return t.reshape(B, m, C, H * W).gather(3, idx).reshape(B, m, C, Ho, Wo)

        low = pick(x.lower())
        upp = torch.where(exact.reshape(B, 1, C, Ho, Wo), pick(x.upper()), torch.zeros_like(low))
        upp[:, -1] = torch.where(exact.reshape(B, C, Ho, Wo), upp[:, -1], umax.reshape(B, C, Ho, Wo))
        return LinearBounds.from_sides(low, upp)
