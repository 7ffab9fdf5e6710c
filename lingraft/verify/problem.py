"""One VNN-LIB region as tensors: float32 input boxes and the output specification.

A region is UNSAFE iff some x in its box gives outputs y with ``A_g y <= b_g`` (all rows) for some output
conjunction g. All rows of all conjunctions are stacked into ``C [S, n_out]``, ``b [S]`` with ``group [S]`` naming
the conjunction of each row. A margin ``m_r = (C y)_r - b_r > 0`` says row r is violated; conjunction g is
REFUTED on a set of inputs iff some row r of g has ``m_r > 0`` everywhere on it, and the region is safe iff
every conjunction is refuted.

Boxes: the bound engine works in float32, so the box used for BOUNDS is rounded OUTWARD to float32 (it contains
the exact float64 box: a proof on it is a proof on the real box), and the box used for ATTACKS is rounded
INWARD (every float32 point in it lies in the real box, so a counterexample passes the competition's check).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..errors import LingraftError
from ..spec.vnnlib import Region

#: a row counts as violated (a conjunction refuted) only when its lower bound beats b by more than this:
#: it absorbs float32 rounding in the bound computation, so ``unsat`` never rests on a rounding error
PROVE_TOL = 1e-5


@dataclass
class RegionSpec:
    """Tensors for one region.

    x_L, x_U: [1, *in_shape] float32 outward-rounded box (for bounds).
    a_L, a_U: [1, *in_shape] float32 inward-rounded box (for attacks; a_L <= a_U unless the box is thinner
    than the float32 spacing, see :func:`region_spec`).
    C: [S, n_out] float32; b: [S] float64 (kept exact: proofs compare float32 bounds with it in float64);
    group: [S] long conjunction index in 0..G-1.
    """

    region: Region
    x_L: Tensor
    x_U: Tensor
    a_L: Tensor
    a_U: Tensor
    C: Tensor
    b: Tensor
    group: Tensor
    G: int

    @property
    def S(self) -> int:
        return int(self.C.shape[0])

    def to(self, device) -> "RegionSpec":
        for k in ("x_L", "x_U", "a_L", "a_U", "C", "b", "group"):
            setattr(self, k, getattr(self, k).to(device))
        return self

    def margins(self, y: Tensor) -> Tensor:
        """Row margins (C y - b): y [N, n_out] -> [N, S]; a row is violated where > 0."""
        return y.reshape(y.shape[0], -1) @ self.C.T.to(y.dtype) - self.b.to(y.dtype)

    def lower_margin(self, lower: Tensor) -> Tensor:
        """Lower bounds of C y [B, S] -> lower bounds of the margins, in float64 [B, S]."""
        return lower.double() - self.b

    def violation(self, y: Tensor) -> Tensor:
        """How far each output is from the unsafe set: min over conjunctions of max over their rows of the
        margin. y [N, n_out] -> [N]; <= 0 means y is unsafe (a counterexample)."""
        return group_max(self.margins(y), self.group, self.G).min(dim=1).values

    def refuted(self, lower_margin: Tensor) -> Tensor:
        """Which conjunctions the lower bounds refute: lower_margin [B, S] (from :meth:`lower_margin`)
        -> [B, G] bool (True = no input of that domain satisfies the conjunction)."""
        return group_max(lower_margin, self.group, self.G) > PROVE_TOL


def group_max(m: Tensor, group: Tensor, G: int) -> Tensor:
    """Max of m [N, S] over the rows of each group -> [N, G] (-inf for a group without rows)."""
    out = torch.full((m.shape[0], G), float("-inf"), dtype=m.dtype, device=m.device)
    return out.scatter_reduce(1, group.unsqueeze(0).expand(m.shape[0], -1), m, reduce="amax", include_self=True)


def _round_box(lower: np.ndarray, upper: np.ndarray, outward: bool) -> tuple[np.ndarray, np.ndarray]:
    """float64 box -> float32 box containing it (outward) or contained in it (inward)."""
    lo = lower.astype(np.float32)
    up = upper.astype(np.float32)
    if outward:
        lo = np.where(lo.astype(np.float64) > lower, np.nextafter(lo, np.float32(-np.inf)), lo)
        up = np.where(up.astype(np.float64) < upper, np.nextafter(up, np.float32(np.inf)), up)
    else:
        lo = np.where(lo.astype(np.float64) < lower, np.nextafter(lo, np.float32(np.inf)), lo)
        up = np.where(up.astype(np.float64) > upper, np.nextafter(up, np.float32(-np.inf)), up)
        # a box thinner than the float32 spacing has no float32 point inside: use the nearest one
        bad = lo > up
        if bad.any():
            near = ((lower + upper) / 2).astype(np.float32)
            lo = np.where(bad, near, lo)
            up = np.where(bad, near, up)
    return lo.astype(np.float32), up.astype(np.float32)


def region_spec(region: Region, in_shape: tuple, n_out: int) -> RegionSpec:
    """Build the tensors of one region for a network with per-sample input shape ``in_shape``."""
    n_in = int(np.prod(in_shape))
    if region.lower.size != n_in:
        raise LingraftError(f"property has {region.lower.size} inputs but the network takes {n_in} "
                            "(use the property file that matches the network)")
    if not (np.all(np.isfinite(region.lower)) and np.all(np.isfinite(region.upper))):
        raise LingraftError("property leaves some input unbounded; every X_i needs a lower and an upper bound")
    rows, bs, groups = [], [], []
    for g, oc in enumerate(region.outputs):
        if oc.A.shape[1] != n_out:
            raise LingraftError(f"property has {oc.A.shape[1]} outputs but the network has {n_out} "
                                "(use the property file that matches the network)")
        if oc.A.shape[0] == 0:
            # an empty conjunction is always true: every point is unsafe; a row 0 <= 1 encodes that
            rows.append(np.zeros((1, n_out)))
            bs.append(np.ones(1))
            groups += [g]
            continue
        rows.append(oc.A)
        bs.append(oc.b)
        groups += [g] * oc.A.shape[0]
    # refuting row r needs A_r y > b_r everywhere: a positive lower bound of the margin A_r y - b_r
    A = np.concatenate(rows, 0)
    b = np.concatenate(bs, 0)
    xl, xu = _round_box(region.lower, region.upper, outward=True)
    al, au = _round_box(region.lower, region.upper, outward=False)
    shape = (1, *in_shape)
    return RegionSpec(region=region,
                      x_L=torch.from_numpy(xl).reshape(shape), x_U=torch.from_numpy(xu).reshape(shape),
                      a_L=torch.from_numpy(al).reshape(shape), a_U=torch.from_numpy(au).reshape(shape),
                      C=torch.from_numpy(A.astype(np.float32)), b=torch.from_numpy(b.astype(np.float64)),
                      group=torch.tensor(groups, dtype=torch.long), G=len(region.outputs))
