"""Robustness properties (in memory and as VNN-LIB files), and VNN-COMP-style benchmark folders of test images.

Both forms state the same property: the box of :func:`lingraft.bounds.input_box` around the sample, unsafe iff
y_label - y_j <= 0 for some j != label. ``lingraft certify --bab-timeout`` uses the in-memory one.

``lingraft export MODEL --out net.onnx --vnnlib-samples N --vnnlib-eps E`` writes, next to ``net.onnx``, one
property per correctly labelled test image and an ``instances.csv``, so the exported (e.g. grafted) network can be
run by ``lingraft verify --instances`` or by any VNN-COMP verifier on exactly the sets ``lingraft certify`` bounds:
the L-inf ball of radius eps around the image clipped to [0, 1] (the box of :func:`lingraft.bounds.input_box`),
unsafe iff some other class scores at least as high as the label.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from lingraft.bounds import input_box
from lingraft.io.files import atomic_write_text
from lingraft.spec.vnnlib import OutputConstraint, Region, VnnlibProperty


def robustness_property(x: Tensor, label: int, eps: float, num_outputs: int) -> VnnlibProperty:
    """The unsafe set of "x is classified as label everywhere in the L-inf ball of radius eps (clipped to [0,1])".

    x: one sample [*in_shape] in [0, 1]; returns a one-region property over the flattened input.
    """
    xl, xu = input_box(x.unsqueeze(0).float().cpu(), eps)
    outputs = []
    for j in range(num_outputs):
        if j == label:
            continue
        row = np.zeros((1, num_outputs))
        row[0, label], row[0, j] = 1.0, -1.0  # unsafe: y_label - y_j <= 0
        outputs.append(OutputConstraint(A=row, b=np.zeros(1)))
    region = Region(lower=xl.reshape(-1).double().numpy(), upper=xu.reshape(-1).double().numpy(), outputs=outputs)
    return VnnlibProperty(num_inputs=int(x.numel()), num_outputs=num_outputs, regions=[region], path=None)


def robustness_vnnlib(x: Tensor, label: int, eps: float, num_outputs: int) -> str:
    """VNN-LIB text of the robustness property of one sample x [*in_shape] (flattened in C order, the ONNX input
    order). Bounds are written with repr(), so the file's box is exactly the float32 box certify bounds."""
    lo, hi = input_box(x.detach().float().cpu().unsqueeze(0), float(eps))
    lows, highs = lo.flatten().tolist(), hi.flatten().tolist()
    n = len(lows)
    lines = [f"; robustness of a sample with label {label} at L-inf eps {eps!r} (box clipped to [0, 1])"]
    lines += [f"(declare-const X_{i} Real)" for i in range(n)]
    lines += [f"(declare-const Y_{j} Real)" for j in range(num_outputs)]
    for i in range(n):
        lines.append(f"(assert (>= X_{i} {lows[i]!r}))")
        lines.append(f"(assert (<= X_{i} {highs[i]!r}))")
    others = " ".join(f"(and (>= Y_{j} Y_{label}))" for j in range(num_outputs) if j != label)
    lines.append(f"(assert (or {others}))")
    return "\n".join(lines) + "\n"


def write_benchmark(model, x: Tensor, y: Tensor, eps: float, onnx_path, timeout: float) -> dict:
    """Properties for the samples the model classifies correctly, next to ``onnx_path``.

    x [N, *in_shape] (the first N test images, dataset index = position), y [N]. Writes
    <folder>/vnnlib/prop_<index>_eps<eps>.vnnlib and <folder>/instances.csv (onnx,vnnlib,timeout; paths relative to
    the folder), atomically; an existing instances.csv is replaced. Misclassified samples get no property (VNN-COMP
    benchmarks skip them: their answer would trivially be sat). Returns {"eps", "properties" (paths),
    "instances" (path), "skipped_misclassified"}.
    """
    onnx_path = Path(onnx_path)
    folder = onnx_path.parent
    with torch.no_grad():
        dev = next((p.device for p in model.parameters()), torch.device("cpu"))
        logits = model(x.to(dev)).cpu()
    keep = [i for i in range(x.shape[0]) if int(logits[i].argmax()) == int(y[i])]
    (folder / "vnnlib").mkdir(parents=True, exist_ok=True)
    rows, paths = [], []
    for i in keep:
        name = f"vnnlib/prop_{i}_eps{eps:g}.vnnlib"
        atomic_write_text(folder / name, robustness_vnnlib(x[i], int(y[i]), eps, int(logits.shape[1])))
        rows.append(f"{onnx_path.name},{name},{timeout:g}")
        paths.append(str(folder / name))
    atomic_write_text(folder / "instances.csv", "\n".join(rows) + "\n")
    return {
        "eps": eps,
        "properties": paths,
        "instances": str(folder / "instances.csv"),
        "skipped_misclassified": x.shape[0] - len(keep),
    }
