"""The input set a bound holds over: a box, optionally intersected with an L2 ball.

Every linear bound the engine builds ends as ``A . x + c`` with x in the input set; :meth:`InputSet.concretize`
turns it into a number per (sample, row). The set travels with each call instead of living on the network, so one
:class:`~lingraft.bounds.engine.BoundedNetwork` can bound different sets at the same time (re-entrant).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class InputSet:
    """x in [lower, upper] (both [B, *in_shape]) and, when ``l2_center`` is set, ||x - l2_center||_2 <= l2_eps.

    Both sets contain the inputs, so a linear function's minimum over each is a lower bound over the
    intersection: the tighter of the two is kept.
    """

    lower: Tensor
    upper: Tensor
    l2_center: Tensor | None = None
    l2_eps: float = 0.0

    @property
    def batch(self) -> int:
        return self.lower.shape[0]

    def concretize(self, A: Tensor, sign: int) -> Tensor:
        """min (sign=-1) or max (sign=+1) of A . x over the set. A: [B, S, *in_shape]; returns [B, S]."""
        B, S = A.shape[:2]
        Af = A.reshape(B, S, -1)
        c = ((self.upper + self.lower) / 2).reshape(B, -1, 1)
        r = ((self.upper - self.lower) / 2).reshape(B, -1, 1)
        v = torch.bmm(Af, c).squeeze(-1) + sign * torch.bmm(Af.abs(), r).squeeze(-1)
        if self.l2_center is not None:
            v2 = torch.bmm(Af, self.l2_center.reshape(B, -1, 1)).squeeze(-1) + sign * self.l2_eps * Af.norm(dim=-1)
            v = torch.maximum(v, v2) if sign < 0 else torch.minimum(v, v2)
        return v

    def concretize_windows(self, lA: Tensor, uA: Tensor, window) -> tuple[Tensor, Tensor]:
        """Patch form: lower / upper bounds [B', R] of ``lA . x`` / ``uA . x`` where lA, uA [B', R, C, kh, kw] are
        coefficients on a window of the input each, and ``window(t)`` gathers the same windows of a tensor t
        [B, *in_shape] (-> [B', R, C, kh, kw]; zero outside the image, where the coefficients are zero too)."""
        c = window((self.upper + self.lower) / 2)
        r = window((self.upper - self.lower) / 2)
        lower = (lA * c).flatten(2).sum(-1) - (lA.abs() * r).flatten(2).sum(-1)
        upper = (uA * c).flatten(2).sum(-1) + (uA.abs() * r).flatten(2).sum(-1)
        if self.l2_center is not None:
            xc = window(self.l2_center)
            lower = torch.maximum(lower, (lA * xc).flatten(2).sum(-1) - self.l2_eps * lA.flatten(2).norm(dim=-1))
            upper = torch.minimum(upper, (uA * xc).flatten(2).sum(-1) + self.l2_eps * uA.flatten(2).norm(dim=-1))
        return lower, upper

    def select(self, idx) -> InputSet:
        """The set of the samples ``idx`` (an index tensor, or a slice such as ``slice(b, b + 1)``)."""
        center = None if self.l2_center is None else self.l2_center[idx]
        return InputSet(self.lower[idx], self.upper[idx], center, self.l2_eps)

    def to(self, device) -> InputSet:
        """The set as float32 tensors on ``device``."""
        center = None if self.l2_center is None else self.l2_center.to(device, torch.float32)
        return InputSet(
            self.lower.to(device, torch.float32), self.upper.to(device, torch.float32), center, float(self.l2_eps)
        )
