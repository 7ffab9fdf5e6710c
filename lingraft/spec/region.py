"""One VNN-LIB region as tensors: float32 input boxes and the output specification.

A region is UNSAFE iff some x in its box gives outputs y with ``A_g y <= b_g`` (all rows) for some output
conjunction g. All rows of all conjunctions are stacked into ``C [S, n_out]``, ``b [S]`` with ``group [S]`` naming
the conjunction of each row. A margin ``m_r = (C y)_r - b_r > 0`` says row r is violated; conjunction g is
REFUTED on a set of inputs iff some row r of g has ``m_r > 0`` everywhere on it, and the region is safe iff
every conjunction is refuted. A row counts as violated on a set only when its float32 lower bound clears b by the
proof margin of :mod:`lingraft.bounds.tolerance` (``ABS_TOL + REL_TOL * scale``, scale = the magnitudes rounded
on the way: ``max(|lower bound of C y|, |b|, |C| |y(box centre)|)``), so ``unsat`` never rests on rounding.

Boxes: the bound engine works in float32, so the box used for BOUNDS is rounded OUTWARD to float32 (it contains
the exact float64 box: a proof on it is a proof on the real box), and the box used for ATTACKS is rounded
INWARD (every float32 point in it lies in the real box, so a counterexample passes the competition's check).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from lingraft.bounds.tolerance import ABS_TOL, is_proved, proof_margin
from lingraft.errors import LingraftError
from lingraft.spec.vnnlib import Region

#: the absolute part of the proof margin (see :mod:`lingraft.bounds.tolerance`; the margin a row's lower bound
#: must clear also grows with the magnitudes involved: :meth:`RegionSpec.refuted`)
PROVE_TOL = ABS_TOL


@dataclass
class RegionSpec:
    """Tensors for one region.

    x_L, x_U: [1, *in_shape] float32 outward-rounded box (for bounds).
    a_L, a_U: [1, *in_shape] float32 inward-rounded box (for attacks; a_L <= a_U unless the box is thinner
    than the float32 spacing, see :func:`region_spec`).
    C: [S, n_out] float32; b: [S] float64 (kept exact: proofs compare float32 bounds with it in float64);
    group: [S] long conjunction index in 0..G-1; out_scale: [S] float64 ``|C| |y(box centre)|``, the size of
    each row's terms at the box centre (part of the proof margin's scale; None = unknown, taken as 0; set by
    :meth:`set_output_scale`).
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
    out_scale: Tensor | None = None

    @property
    def S(self) -> int:
        return int(self.C.shape[0])

    def to(self, device) -> RegionSpec:
        for k in ("x_L", "x_U", "a_L", "a_U", "C", "b", "group", "out_scale"):
            if getattr(self, k) is not None:
                setattr(self, k, getattr(self, k).to(device))
        return self

    def set_output_scale(self, model) -> RegionSpec:
        """Record ``|C| |y(c)|`` at the centre c of the box (model: the network, on the spec's device)."""
        with torch.no_grad():
            y = model((self.x_L + self.x_U) / 2).reshape(1, -1).double()
        # a non-finite output at the centre leaves the magnitudes unknown: nothing may be proved by a margin
        self.out_scale = torch.nan_to_num((y.abs() @ self.C.double().abs().T)[0], nan=float("inf"))
        return self

    def _base_scale(self) -> Tensor:
        """[S] float64: max(|b|, out_scale)."""
        s = self.b.abs()
        return s if self.out_scale is None else torch.maximum(s, self.out_scale.to(s))

    def scale(self, lower_margin: Tensor) -> Tensor:
        """Magnitude of the numbers behind each row's bound: lower_margin [B, S] -> [B, S] float64
        ``max(|lower bound of C y|, |b|, out_scale)`` (the scale of :func:`lingraft.bounds.tolerance.proof_margin`)."""
        return torch.maximum((lower_margin.double() + self.b).abs(), self._base_scale())

    def target(self, rows: Tensor | None = None) -> Tensor:
        """[1, S] (or [1, len(rows)]) float32 lower bounds of C y at which the bound optimization may stop: b plus
        twice the proof margin (enough for :meth:`refuted`)."""
        base = self._base_scale()
        t = self.b + 2 * proof_margin(base)
        return (t if rows is None else t[rows]).float().unsqueeze(0)

    @property
    def confirm_slack(self) -> float:
        """A float32 forward pass that misses the unsafe set by less than this (the largest proof margin of a row)
        may still be unsafe in the reference pass: such candidates are worth re-checking."""
        pm = proof_margin(self._base_scale())
        pm = pm[torch.isfinite(pm)]
        return float(pm.max()) if pm.numel() else 0.0

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
        -> [B, G] bool (True = no input of that domain satisfies the conjunction): some row of the conjunction
        has a margin above its proof margin (:func:`lingraft.bounds.tolerance.is_proved`, scale :meth:`scale`)."""
        proved = is_proved(lower_margin.double(), self.scale(lower_margin))
        return group_max(proved.double(), self.group, self.G) > 0


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
        raise LingraftError(
            f"property has {region.lower.size} inputs but the network takes {n_in} "
            "(use the property file that matches the network)"
        )
    if not (np.all(np.isfinite(region.lower)) and np.all(np.isfinite(region.upper))):
        raise LingraftError("property leaves some input unbounded; every X_i needs a lower and an upper bound")
    rows, bs, groups = [], [], []
    for g, oc in enumerate(region.outputs):
        if oc.A.shape[1] != n_out:
            raise LingraftError(
                f"property has {oc.A.shape[1]} outputs but the network has {n_out} "
                "(use the property file that matches the network)"
            )
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
    return RegionSpec(
        region=region,
        x_L=torch.from_numpy(xl).reshape(shape),
        x_U=torch.from_numpy(xu).reshape(shape),
        a_L=torch.from_numpy(al).reshape(shape),
        a_U=torch.from_numpy(au).reshape(shape),
        C=torch.from_numpy(A.astype(np.float32)),
        b=torch.from_numpy(b.astype(np.float64)),
        group=torch.tensor(groups, dtype=torch.long),
        G=len(region.outputs),
    )
