"""When a float32 lower bound counts as a proof: one rule for verify and certify.

The bound engine works in float32. A lower bound ``L`` of a quantity ``q`` (a specification row ``C y``) is
sound in exact arithmetic, but the float32 value actually computed differs from it by the rounding errors of
every operation on the way: each product and sum rounds to within half a float32 step (float32 machine epsilon
is 1.2e-7, so a step is about ``1.2e-7 * |value|``), and the backward pass sums many terms (bias contributions,
``A x`` at the box corners, per-layer intercepts) whose magnitudes can be far larger than the final result.
The error therefore scales with the MAGNITUDES involved, not with the margin: with outputs near 1088, one
float32 step is 1.2e-4, and a float32 CROWN bound has been seen to clear a threshold b = 1088.33949 by 1.1e-4
while onnxruntime gives 1088.33948 <= b at a point of the box (a violated property "proved" safe by a purely
absolute tolerance of 1e-5).

The rule: a margin ``m = L - b`` (lower bound minus threshold, computed in float64 from the float32 bound)
proves ``q > b`` only if

    m > proof_margin(scale) = ABS_TOL + REL_TOL * scale,

where ``scale`` is the magnitude of the numbers that were rounded: at least ``max(|L|, |b|)``, and in verify
also the magnitude of the specification row at the box centre, ``|C| |y(centre)|`` (which catches a difference
of two large outputs whose bound is near 0). ``REL_TOL = 1e-5`` is about 80 float32 steps of the scale: room for
the rounding accumulated over a deep network's backward pass, while costing nothing on ordinary margins
(1e-5 of the outputs' size). ``ABS_TOL = 1e-5`` covers quantities near zero.

Subnormal float32 numbers (``0 < |v| < 1.18e-38``) in a network's weights are set to 0 before bounding
(:func:`flush_subnormals`): arithmetic on them takes a slow path on x86 CPUs (on VNN-COMP's cifar_biasfield
networks, about 7,000 such weights made every CROWN pass 1.4-1.5x slower), and each one moves a term by less
than ``1.18e-38`` times the value it multiplies, 33 orders of magnitude inside ``REL_TOL`` of that term.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: absolute part of the proof margin (the whole margin for quantities near 0)
ABS_TOL = 1e-5
#: relative part: proof margin per unit of magnitude (about 80 float32 steps)
REL_TOL = 1e-5


def flush_subnormals(t: Tensor) -> Tensor:
    """t with its subnormal entries (nonzero, below float32's smallest normal 1.18e-38 in magnitude; the same
    threshold for float64 tensors) set to 0: a new tensor where there were any, else t itself. Only for
    constants such as weights (see the module docstring for why the proof margin covers the change)."""
    if not t.is_floating_point():
        return t
    tiny = torch.finfo(torch.float32).tiny
    sub = (t != 0) & (t.abs() < tiny)
    return torch.where(sub, torch.zeros_like(t), t) if bool(sub.any()) else t


def proof_margin(scale: Tensor) -> Tensor:
    """How far a lower bound must clear its threshold to count: ``ABS_TOL + REL_TOL * |scale|`` (same shape)."""
    return ABS_TOL + REL_TOL * scale.abs()


def is_proved(lower_margin: Tensor, scale: Tensor) -> Tensor:
    """lower_margin (lower bound minus threshold) and scale (magnitude of the numbers involved; broadcastable)
    -> bool: the margin clears :func:`proof_margin`. NaN margins or scales never count as proved."""
    return torch.as_tensor(lower_margin) > proof_margin(torch.as_tensor(scale))
