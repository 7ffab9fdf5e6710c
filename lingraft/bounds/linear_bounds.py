"""Linear bounds of a node as functions of the flat input (forward mode, :mod:`lingraft.bounds.forward`).

Every node z gets a lower and an upper linear function of the flat input x (n = prod(in_shape) inputs),
``A_L x + c_L <= z(x) <= A_U x + c_U`` on the box, stored in centre/radius form with the constant as an extra
coefficient row, so that an affine op needs one pass over the centre and one over the radius
(``W+ L + W- U = W mid - |W| rad``). Each op maps its inputs' linear bounds to its own
(:meth:`lingraft.bounds.ops.base.BoundOp.forward_linear`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class LinearBounds:
    """Linear bounds of one node in centre/radius form.

    mid: [B, n + 1, *shape] ((A_L + A_U) / 2 on rows 0..n-1, (c_L + c_U) / 2 on row n);
    rad: [B, n + 1, *shape] ((A_U - A_L) / 2 and (c_U - c_L) / 2) or None (lower = upper).
    """

    mid: Tensor
    rad: Tensor | None

    def lower(self) -> Tensor:
        """[B, n + 1, *shape]: A_L and c_L."""
        return self.mid if self.rad is None else self.mid - self.rad

    def upper(self) -> Tensor:
        """[B, n + 1, *shape]: A_U and c_U."""
        return self.mid if self.rad is None else self.mid + self.rad

    @staticmethod
    def identity(in_shape: tuple, batch: int = 1, device=None) -> LinearBounds:
        """The input's exact linear bounds: identity coefficients, zero constant; mid [batch, n + 1, *in_shape]
        with n = prod(in_shape)."""
        n = math.prod(in_shape)
        eye = torch.cat([torch.eye(n, device=device), torch.zeros(1, n, device=device)])
        return LinearBounds(eye.reshape(1, n + 1, *in_shape).expand(batch, -1, *in_shape), None)

    @staticmethod
    def from_sides(low: Tensor, up: Tensor) -> LinearBounds:
        """From A_L/c_L and A_U/c_U, both [B, n + 1, *shape]."""
        return LinearBounds((low + up) / 2, (up - low) / 2)

    def map(self, f: Callable[[Tensor], Tensor]) -> LinearBounds:
        """Apply a shape-only map f ([B, n + 1, *shape] -> [B, n + 1, *shape']) to both tensors."""
        return LinearBounds(f(self.mid), None if self.rad is None else f(self.rad))


def add_constant(t: Tensor, c: Tensor | None) -> Tensor:
    """Add c (broadcastable to [B, *shape]) to the constant row n of t [B, n + 1, *shape] (t is fresh)."""
    if c is not None:
        t[:, -1] = t[:, -1] + c
    return t
