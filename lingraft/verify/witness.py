"""Re-checking candidate counterexamples before ``sat`` is reported.

A candidate from the search (a float32 point of the inward-rounded box whose PyTorch outputs look unsafe) is
accepted only if an independent concrete forward pass agrees: onnxruntime on the original ONNX file when the
model came from one (the reference the competition uses), otherwise a plain PyTorch forward pass in float64.
The check is :meth:`lingraft.spec.vnnlib.VnnlibProperty.is_violated_by_float32`: zero tolerance on the outputs,
and x must be in the box or be the float32 rounding of a point of it (a box thinner than the float32 spacing,
e.g. the point X_0 = 0.1, holds no float32 number, and the network can only be run on float32 inputs).
:func:`float32_note` tells the two cases apart for the result.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import Tensor, nn

from lingraft.io.onnx import run_onnxruntime
from lingraft.spec.vnnlib import VnnlibProperty


def concrete_outputs(x: Tensor, model: nn.Module, onnx_path: str | None) -> np.ndarray:
    """Reference outputs for x [N, *in_shape]: onnxruntime if onnx_path is given, else the model in float64.
    Returns float64 [N, n_out]."""
    if onnx_path is not None:
        return run_onnxruntime(onnx_path, x.detach().cpu()).reshape(x.shape[0], -1).numpy()
    m64 = copy.deepcopy(model).double().cpu()
    with torch.no_grad():
        return m64(x.detach().cpu().double()).reshape(x.shape[0], -1).numpy()


def confirm(
    candidates: Tensor,
    violation: Tensor,
    prop: VnnlibProperty,
    model: nn.Module,
    onnx_path: str | None,
    max_checks: int = 4,
) -> tuple[np.ndarray, np.ndarray] | None:
    """The first candidate (x [N, *in_shape], sorted best first, with violation [N]) that the reference
    forward pass confirms as a counterexample, as (x [n_in], y [n_out]) float64; None if none does.
    Only candidates with violation <= 0 are checked, at most ``max_checks`` of them."""
    sel = torch.nonzero(violation <= 0).flatten()[:max_checks]
    if sel.numel() == 0:
        return None
    xs = candidates[sel]
    ys = concrete_outputs(xs, model, onnx_path)
    for i in range(xs.shape[0]):
        x = xs[i].detach().cpu().double().numpy().reshape(-1)
        if prop.is_violated_by_float32(x, ys[i]):
            return x, ys[i].astype(np.float64)
    return None


#: the note of a ``sat`` result whose x is only the float32 rounding of a point of the box
FLOAT32_NOTE = "counterexample checked to float32 precision"


def float32_note(prop: VnnlibProperty, cex: tuple[np.ndarray, np.ndarray]) -> str:
    """'' if the counterexample passes the exact check, else :data:`FLOAT32_NOTE` (it passed only the
    float32-aware box check of :func:`confirm`)."""
    return "" if prop.is_violated_by(*cex) else FLOAT32_NOTE
