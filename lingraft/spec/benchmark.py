"""Robustness properties as VNN-LIB files, and VNN-COMP-style benchmark folders built from test images.

``lingraft export MODEL --out net.onnx --vnnlib-samples N --vnnlib-eps E`` writes, next to ``net.onnx``, one
property per correctly labelled test image and an ``instances.csv``, so the exported (e.g. grafted) network can be
run by ``lingraft verify --instances`` or by any VNN-COMP verifier on exactly the sets ``lingraft certify`` bounds:
the L-inf ball of radius eps around the image clipped to [0, 1] (the box of :func:`lingraft.bounds.input_box`),
unsafe iff some other class scores at least as high as the label.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ..bounds import input_box
from ..io import atomic_write_text


def robustness_vnnlib(x: Tensor, label: int, eps: float, num_outputs: int) -> str:
    """VNN-LIB text of the robustness property of one sample x [*in_shape] (flattened in C order, the ONNX input
    order). Bounds are written with repr(), so the file's box is exactly the float32 box certify bounds."""
    lo, hi = input_box(x.detach().float().cpu().unsqueeze(0), float(eps))
    lo, hi = lo.flatten().tolist(), hi.flatten().tolist()
    n = len(lo)
    lines = [f"; robustness of a sample with label {label} at L-inf eps {eps!r} (box clipped to [0, 1])"]
    lines += [f"(declare-const X_{i} Real)" for i in range(n)]
    lines += [f"(declare-const Y_{j} Real)" for j in range(num_outputs)]
    for i in range(n):
        lines.append(f"(assert (>= X_{i} {lo[i]!r}))")
        lines.append(f"(assert (<= X_{i} {hi[i]!r}))")
    others = " ".join(f"(and (>= Y_{j} Y_{label}))" for j in range(num_outputs) if j != label)
    lines.append(f"(assert (or {others}))")
    return "\n".join(lines) + "\n"


def write_benchmark(folder, onnx_name: str, x: Tensor, y: Tensor, indices, eps: float, num_outputs: int,
                    timeout: float) -> list[str]:
    """Write folder/vnnlib/prop_<index>_eps<eps>.vnnlib for each sample (x [N, *in_shape], y [N], dataset
    indices [N]) and folder/instances.csv (onnx,vnnlib,timeout; paths relative to the folder). Returns the
    property paths. Files are written atomically; an existing instances.csv is replaced."""
    folder = Path(folder)
    (folder / "vnnlib").mkdir(parents=True, exist_ok=True)
    rows, paths = [], []
    for k, idx in enumerate(indices):
        name = f"vnnlib/prop_{int(idx)}_eps{eps:g}.vnnlib"
        atomic_write_text(folder / name, robustness_vnnlib(x[k], int(y[k]), eps, num_outputs))
        rows.append(f"{onnx_name},{name},{timeout:g}")
        paths.append(str(folder / name))
    atomic_write_text(folder / "instances.csv", "\n".join(rows) + "\n")
    return paths


def correctly_classified(model, x: Tensor, y: Tensor) -> Tensor:
    """Bool mask [N] of the samples the model classifies correctly (no property is written for the others:
    VNN-COMP benchmarks skip them, their answer would trivially be sat)."""
    with torch.no_grad():
        dev = next((p.device for p in model.parameters()), torch.device("cpu"))
        return (model(x.to(dev)).argmax(1).cpu() == y)
