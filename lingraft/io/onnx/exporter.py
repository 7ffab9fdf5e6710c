"""ONNX export: :func:`export_onnx` writes a lingraft model as an ONNX file and checks it with onnxruntime.

The fx writer (:mod:`lingraft.io.onnx.fx_writer`) is tried first; models it cannot express fall back to torch's
TorchScript exporter (``dynamo=False``; the dynamo exporter needs the ``onnxscript`` package, which lingraft does
not depend on).
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

from lingraft.errors import LingraftError, UsageError
from lingraft.io.files import atomic_write
from lingraft.io.onnx.common import first_line
from lingraft.io.onnx.fx_writer import ExportUnsupported, FxToOnnx
from lingraft.io.onnx.runtime import ort_session

__all__ = ["export_onnx"]


def _export_torchscript(model: nn.Module, x: torch.Tensor, opset: int, dynamic_batch: bool) -> Any:
    """Fallback: torch's legacy TorchScript exporter (still in torch 2.13 with dynamo=False)."""
    import io as _io

    import onnx

    buf = _io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (x,),
                buf,
                dynamo=False,
                opset_version=opset,
                input_names=["input"],
                output_names=["output"],
                do_constant_folding=True,
                dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}} if dynamic_batch else None,
            )
    except Exception as e:
        raise LingraftError(f"cannot export the model to ONNX: {first_line(e)}") from None
    return onnx.load_from_string(buf.getvalue())


def _as_batch(check_inputs, input_shape: tuple) -> torch.Tensor:
    """check_inputs as [N, *input_shape] (one sample gets a batch dim); UsageError on any other shape."""
    ci = torch.as_tensor(check_inputs)
    if tuple(ci.shape) == input_shape:
        ci = ci.unsqueeze(0)
    if tuple(ci.shape[1:]) != input_shape:
        raise UsageError(
            f"check_inputs has shape {list(check_inputs.shape)}; expected [N, {', '.join(map(str, input_shape))}]"
        )
    return ci


def _write_proto(model: nn.Module, x: torch.Tensor, path, opset: int, dynamic_batch: bool) -> tuple[Any, str]:
    """Build (fx writer, else TorchScript), check and atomically write the ONNX model; returns (proto, exporter).

    x: [2, *input_shape] on the model's device (batch 2: a reshape that mixes samples shows up as a changed dim 0).
    """
    import onnx

    exporter = "lingraft-fx"
    try:
        proto = FxToOnnx(model, x, opset, dynamic_batch).trace()
    except ExportUnsupported:
        exporter = "torchscript"
        proto = _export_torchscript(model, x[:1], opset, dynamic_batch)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:
        raise LingraftError(f"the exported ONNX model is invalid ({exporter}): {first_line(e)}") from None
    data = proto.SerializeToString()
    atomic_write(path, lambda f: f.write(data))
    return proto, exporter


def _max_abs_diff(model: nn.Module, path, xs: torch.Tensor, dev: torch.device) -> float:
    """max |onnxruntime(path) - model| over the samples xs [N, *input_shape] (fed one at a time)."""
    sess = ort_session(path)
    iname = sess.get_inputs()[0].name
    ref = []
    for i in range(xs.shape[0]):
        ref.append(sess.run(None, {iname: xs[i : i + 1].numpy()})[0])
    got_ort = torch.from_numpy(np.concatenate(ref)).double()
    with torch.no_grad():
        want = model(xs.to(dev)).double().cpu()
    return float((got_ort.reshape(want.shape) - want).abs().max())


def export_onnx(
    model: nn.Module,
    path,
    input_shape: tuple,
    *,
    opset: int = 13,
    check_inputs: torch.Tensor | None = None,
    tol: float = 1e-5,
    dynamic_batch: bool = False,
) -> dict:
    """Write `model` (per-sample input shape `input_shape`, e.g. (C, H, W)) as an ONNX file at `path`.

    The file takes "input" [1, *input_shape] (or ["batch", *input_shape] with dynamic_batch=True) in the model's
    own input space (Normalize is written as Sub/Div), and returns "output". GraftedReLU layers become
    Mul/Relu/Mul/Add/Add (plain Relu when no neuron is grafted). The file is written atomically, then checked with
    onnxruntime on 4 uniform [0, 1] inputs and on `check_inputs` ([N, *input_shape] or one sample); if
    max |onnx - torch| > tol the file is deleted and LingraftError raised.
    Returns {"path", "opset", "max_abs_diff", "num_nodes", "input_name", "output_name", "input_shape"
    (per sample), "onnx_input_shape", "exporter" ("lingraft-fx" or "torchscript")}.
    """
    import onnx

    input_shape = tuple(int(s) for s in input_shape)
    max_opset = onnx.defs.onnx_opset_version()
    if not 11 <= opset <= max_opset:
        raise UsageError(f"ONNX opset {opset} is not supported; use 11..{max_opset}")
    if check_inputs is not None:
        check_inputs = _as_batch(check_inputs, input_shape)
    try:
        dev = next(model.parameters()).device
    except StopIteration:
        dev = torch.device("cpu")
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        x = torch.rand(2, *input_shape, generator=torch.Generator().manual_seed(0)).to(dev)
        proto, exporter = _write_proto(model, x, path, opset, dynamic_batch)

        # check with onnxruntime: random inputs + the caller's real inputs
        xs = torch.rand(4, *input_shape, generator=torch.Generator().manual_seed(1))
        if check_inputs is not None:
            xs = torch.cat([xs, check_inputs.detach().float().cpu()])
        try:
            diff = _max_abs_diff(model, path, xs, dev)
        except Exception as e:
            _unlink(path)
            raise LingraftError(f"onnxruntime cannot run the exported model: {first_line(e)}") from None
        if not diff <= tol:
            _unlink(path)
            raise LingraftError(
                f"ONNX export check failed: max |onnx - torch| = {diff:.3g} > tol {tol:g}; the file {path} was deleted"
            )
    finally:
        for m, t in modes.items():
            m.training = t
    g = proto.graph
    return {
        "path": str(path),
        "opset": opset,
        "max_abs_diff": diff,
        "num_nodes": len(g.node),
        "input_name": g.input[0].name,
        "output_name": g.output[0].name,
        "input_shape": input_shape,
        "onnx_input_shape": ["batch" if dynamic_batch else 1, *input_shape],
        "exporter": exporter,
    }


def _unlink(path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
