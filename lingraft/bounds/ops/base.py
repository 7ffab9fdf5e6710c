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
from typing import TYPE_CHECKING, Any

from torch import Tensor

from lingraft.bounds.tolerance import flush_subnormals

if TYPE_CHECKING:
    from lingraft.bounds.linear_bounds import LinearBounds
    from lingraft.bounds.patches import PatchPass

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

    Subclasses implement ``forward``, ``ibp`` and ``backward`` and declare what the engine may ask of them with
    the capability attributes below (the engine never asks for the concrete class; docs/adding_an_operator.md).
    """

    #: ``backward`` needs the bounds of its inputs (those of the rows ``needed_rows`` names)
    nonlinear: bool = False
    #: maps a box onto a box exactly (elementwise affine, reshape, pad, permute)
    diagonal: bool = False
    #: ops that are linear maps of their single input
    linear: bool = True
    #: IBP keeps exact per-neuron ranges exact: each output neuron is a monotone function of one input neuron
    exact_ibp: bool = False
    #: one affine map of its single input: its IBP of a box is the exact range of every neuron
    affine: bool = False
    #: the backward pass stops here and concretizes against this node's own interval (``out_bounds``)
    cuts_backward: bool = False
    #: has neurons branch and bound may split (``unstable_mask``, ``relaxation``); grafted neurons never are
    splittable: bool = False
    #: has relaxation parameters alpha-CROWN optimises (lower slopes; ``relaxation`` and ``backward(alpha=)``)
    has_alpha: bool = False
    #: the patch-mode backward pass goes through it (``patch_backward``; see lingraft/bounds/patches.py)
    patchable: bool = False
    #: a patch-mode pass may start at it (``patch_start``): each neuron sees a window of the input plane
    starts_patches: bool = False
    #: a patch-mode chain may end at it (a reshape into an image plane): the dense pass continues below
    ends_patches: bool = False

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

    @property
    def num_grafted(self) -> int:
        """Neurons replaced by exact linear maps (never relaxed, never split)."""
        return 0

    def never_split(self) -> Tensor | None:
        """[*shape] bool: the neurons branch and bound must never split (grafted ones: exact); None: no such."""
        return None

    def needed_rows(self) -> Tensor | None:
        """Flat indices of the input neurons whose bounds ``backward`` needs (nonlinear ops); None = all."""
        return None

    def identity_backward(self, rows: Tensor, batch: int, out_shape) -> tuple[Tensor, Tensor] | None:
        """Coefficients at the input of the unit rows ``rows`` [R] of the output, without materialising the
        identity: (A [B, R, *in_shape], bias [B, R]); None = start the pass from the identity instead."""
        return None

    def unstable_mask(self, lo: Tensor, up: Tensor) -> Tensor:
        """[B, *shape] bool: the neurons branch and bound may split, given input bounds lo, up [B, *shape]."""
        raise NotImplementedError(f"{type(self).__name__} has no neurons to split")

    def relaxation(self, lo: Tensor, up: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(upper slope, upper intercept, default lower slope, unstable mask), all [B, *shape] (has_alpha)."""
        raise NotImplementedError(f"{type(self).__name__} has no relaxation parameters")

    def patch_start(self, rows: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Patches of the output neurons ``rows`` [R] at the input (starts_patches): values [1, R, C, kh, kw],
        top-left y0 [R], x0 [R] in the input plane, bias [1, R]."""
        raise NotImplementedError(f"{type(self).__name__} cannot start a patch-mode pass")

    def patch_backward(self, pp: PatchPass, k: int) -> None:
        """One step of the patch-mode pass through node ``k`` (patchable): updates the patches and biases in ``pp``."""
        raise NotImplementedError(f"{type(self).__name__} has no patch-mode backward")

    def patch_size(self, kh: int, kw: int) -> tuple[int, int]:
        """Size of a patch at this op's input when it is kh x kw at its output (patchable or starts_patches ops;
        a start op's kernel is ``patch_size(1, 1)``). The engine uses it to choose the cheaper pass."""
        return kh, kw

    def forward_linear_ok(self) -> bool:
        """Whether :meth:`forward_linear` handles this op (forward mode, :mod:`lingraft.bounds.forward`): by
        default, whether its class defines one; an op that handles only some configurations narrows it."""
        return type(self).forward_linear is not BoundOp.forward_linear

    def forward_linear(self, ins: list[LinearBounds], refs: list[Bounds], ibp: Bounds) -> LinearBounds:
        """Forward mode: this node's linear bounds in the input ([B, n + 1, *shape] centre/radius) from its
        inputs' (``ins``), their tightest intervals (``refs``, [B, *in_shape_i] pairs) and this node's interval
        (``ibp``, from ``refs``). Sound on the box whenever the inputs' are."""
        raise NotImplementedError(f"{type(self).__name__} has no forward-mode linear bounds")

    def _map_tensors(self, f) -> BoundOp:
        """Replace every tensor attribute v of this op by f(v)."""
        for k, v in list(vars(self).items()):
            if isinstance(v, Tensor):
                setattr(self, k, f(v))
        return self

    def to(self, device) -> BoundOp:
        return self._map_tensors(lambda v: v.to(device))

    def flush_subnormals(self) -> BoundOp:
        """Set subnormal entries of this op's constant tensors (weights, biases) to 0 (see
        :func:`lingraft.bounds.tolerance.flush_subnormals`); tensors that require grad are left alone."""
        return self._map_tensors(lambda v: v if v.requires_grad else flush_subnormals(v))

    def describe(self) -> str:
        return type(self).__name__


class AffineMapOp(BoundOp):
    """An operator that is one affine map of its single input: lower and upper coefficients go through the
    same map. Subclasses implement ``_back(A)``: A [B, S, *out_shape] -> (A [B, S, *in_shape], bias [B, S] or 0)."""

    affine = True

    def _back(self, A: Tensor) -> tuple[Tensor, Tensor | int]:
        raise NotImplementedError

    def backward(self, lA: OptA, uA: OptA, input_bounds: Sequence[Bounds | None], **kw):
        la, lb = (None, 0) if lA is None else self._back(lA)
        ua, ub = (None, 0) if uA is None else self._back(uA)
        return [(la, ua)], lb, ub
