"""The parsed form of a VNN-LIB property: input boxes (regions) with disjunctions of linear output constraints."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lingraft.errors import LingraftError


@dataclass
class OutputConstraint:
    """A conjunction of linear output inequalities: ``A @ y <= b`` for all rows.

    A: [k, num_outputs] float64; b: [k] float64. ``k == 0`` means "always true" (every output is unsafe).
    """

    A: np.ndarray
    b: np.ndarray

    def holds(self, y: np.ndarray, tol: float = 0.0) -> bool:
        """True iff ``A @ y <= b + tol`` in every row. y: [num_outputs]."""
        y = np.asarray(y, dtype=np.float64).reshape(-1)
        return bool(np.all(self.A @ y <= self.b + tol))


@dataclass
class Region:
    """One disjunct of the property: an input box and a disjunction of output conjunctions.

    lower, upper: [num_inputs] float64 with lower <= upper.
    outputs: unsafe iff ANY of these OutputConstraints holds.
    """

    lower: np.ndarray
    upper: np.ndarray
    outputs: list[OutputConstraint]

    def contains(self, x: np.ndarray, tol: float = 0.0) -> bool:
        """True iff ``lower - tol <= x <= upper + tol`` elementwise. x: [num_inputs]."""
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        return bool(np.all(x >= self.lower - tol) and np.all(x <= self.upper + tol))

    def contains_float32(self, x: np.ndarray) -> bool:
        """True iff x is in the box, or x is a float32 vector that is the float32 rounding (to nearest) of a
        point of the box: each x_i's rounding interval (half a float32 step either side) meets
        ``[lower_i, upper_i]``. A network run in float32 can only be fed such points: a box that holds no float32
        number (e.g. the point box X_0 = 0.1) is otherwise impossible to give a counterexample for.
        x: [num_inputs]."""
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        if self.contains(x):
            return True
        with np.errstate(over="ignore", invalid="ignore"):
            x32 = x.astype(np.float32)
            if not np.array_equal(x32.astype(np.float64), x):  # not float32 numbers
                return False
            below = np.nextafter(x32, np.float32(-np.inf)).astype(np.float64)
            above = np.nextafter(x32, np.float32(np.inf)).astype(np.float64)
            lo, hi = (x + below) / 2, (x + above) / 2  # exact in float64
        return bool(np.all(hi >= self.lower) and np.all(lo <= self.upper))


@dataclass
class VnnlibProperty:
    """A parsed VNN-LIB property (the unsafe set).

    Unsafe iff some region's box contains x with f(x) satisfying one of that region's outputs.
    An empty ``regions`` list means the unsafe set is empty (the property holds trivially).
    """

    num_inputs: int
    num_outputs: int
    regions: list[Region]
    path: str | None

    def is_violated_by(self, x: np.ndarray, y: np.ndarray, tol: float = 0.0) -> bool:
        """True iff (x, y) is a counterexample: x in some region's box and y satisfies one of its outputs.

        x: [num_inputs] (any shape with that many elements); y: [num_outputs]. ``tol`` loosens both the
        box and the output inequalities.
        """
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        y = np.asarray(y, dtype=np.float64).reshape(-1)
        if x.size != self.num_inputs or y.size != self.num_outputs:
            raise LingraftError(
                f"counterexample has {x.size} inputs / {y.size} outputs but the property declares "
                f"{self.num_inputs} / {self.num_outputs} (use the matching property file)"
            )
        for region in self.regions:
            if region.contains(x, tol) and any(oc.holds(y, tol) for oc in region.outputs):
                return True
        return False

    def is_violated_by_float32(self, x: np.ndarray, y: np.ndarray) -> bool:
        """Like :meth:`is_violated_by` (zero tolerance on the outputs), but x only has to be the float32 rounding
        of a point of a region's box (:meth:`Region.contains_float32`): the check for counterexamples of a
        network that runs in float32. x: [num_inputs]; y: [num_outputs]."""
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        y = np.asarray(y, dtype=np.float64).reshape(-1)
        if x.size != self.num_inputs or y.size != self.num_outputs:
            return self.is_violated_by(x, y)  # raises the size error
        return any(region.contains_float32(x) and any(oc.holds(y) for oc in region.outputs) for region in self.regions)


# ----------------------------------------------------------------------------------------------
# Source loading and S-expression reading
# ----------------------------------------------------------------------------------------------
