"""Base class of the bound engine's operators.

Conventions (B = batch, S = number of bound rows / specifications):
  - a node's value for one sample has shape ``shape`` (without batch); bounds are pairs (lower, upper) of
    [B, *shape] tensors;
  - linear coefficient matrices ("A matrices") of the backward pass are [B, S, *shape]: row s of sample b maps
    this node's value to the bound being computed;
  - ``backward`` maps (lA, uA) at this node's output to (lA, uA) at each input and adds a bias [B, S].
    ``lA`` bounds from below and ``uA`` from above; either may be None when that side is not needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

Bounds = tuple[Tensor, Tensor]
OptA = Tensor | None


def pos(t: Tensor) -> Tensor:
    return t.clamp(min=0)


def neg(t: Tensor) -> Tensor:
    return t.clamp(max=0)


def sum_trailing(t: Tensor) -> Tensor:
    """[B, S, *shape] -> [B, S]."""
    return t.reshape(t.shape[0], t.shape[1], -1).sum(-1)


class BoundOp:
    """One operator of the bound graph.

    Subclasses set ``nonlinear`` (needs the bounds of its inputs in ``backward``) and implement ``forward``,
    ``ibp`` and ``backward``.
    """

    nonlinear: bool = False
    #: diagonal ops map a box onto a box exactly (elementwise affine, reshape, pad, permute)
    diagonal: bool = False
    #: ops that are linear maps of their single input
    linear: bool = True

    # Subclasses take their inputs as separate arguments (one Tensor / Bounds each); the Any signature lets
    # them name those arguments (x, or a and b) without breaking the override rules.
    def forward(self, *xs: Any) -> Tensor:
        """The operator's value: xs[i] [B, *in_shape_i] -> [B, *shape]."""
        raise NotImplementedError

    def ibp(self, *bounds: Any) -> Bounds:
        """Interval bounds of the value from the boxes (lower, upper) of the inputs."""
        raise NotImplementedError

    def backward(self, lA: OptA, uA: OptA, input_bounds: Sequence[Bounds | None], **kw):
        """Return (list of (lA_i, uA_i) per input, lbias [B,S] or 0, ubias [B,S] or 0)."""
        raise NotImplementedError

    def to(self, device) -> BoundOp:
        for k, v in list(vars(self).items()):
            if isinstance(v, Tensor):
                setattr(self, k, v.to(device))
        return self

    def describe(self) -> str:
        return type(self).__name__


class AffineMapOp(BoundOp):
    """An operator that is one affine map of its single input: lower and upper coefficients go through the
    same map. Subclasses implement ``_back(A)``: A [B, S, *out_shape] -> (A [B, S, *in_shape], bias [B, S] or 0)."""

    def _back(self, A: Tensor) -> tuple[Tensor, Tensor | int]:
        raise NotImplementedError

    def backward(self, lA: OptA, uA: OptA, input_bounds: Sequence[Bounds | None], **kw):
        la, lb = (None, 0) if lA is None else self._back(lA)
        ua, ub = (None, 0) if uA is None else self._back(uA)
        return [(la, ua)], lb, ub
