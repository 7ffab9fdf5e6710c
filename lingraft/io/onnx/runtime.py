"""Running an ONNX file with onnxruntime (the reference the importer and exporter check themselves against)."""

from __future__ import annotations

import os

import numpy as np
import torch

from lingraft.errors import LingraftError
from lingraft.io.onnx.common import first_line, input_info

__all__ = ["ort_session", "run_onnxruntime"]


def ort_session(path_or_bytes):
    """A single-threaded, quiet CPU onnxruntime session for a file path or serialized model bytes."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    src = str(path_or_bytes) if isinstance(path_or_bytes, (str, os.PathLike)) else path_or_bytes
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def run_onnxruntime(path, x: torch.Tensor) -> torch.Tensor:
    """Run the ONNX file on a batch x: [B, *per-sample shape] -> float64 [B, *per-sample out] (one sample at a
    time, so files with a fixed batch of 1 work). The per-sample shapes follow load_onnx's batch convention."""
    import onnx

    try:
        sess = ort_session(path)
    except Exception as e:
        raise LingraftError(f"onnxruntime cannot load {path}: {first_line(e)}") from None
    inp = sess.get_inputs()[0]
    model = onnx.load(str(path), load_external_data=False)
    info = input_info(model)
    feed_shape = ((1,) if info.explicit else ()) + info.per_sample
    outs = []
    for b in range(x.shape[0]):
        xi = x[b].detach().cpu().numpy().astype(info.np_dtype).reshape(feed_shape)
        y = sess.run(None, {inp.name: xi})[0]
        outs.append(torch.from_numpy(np.asarray(y, dtype=np.float64)).reshape(-1))
    return torch.stack(outs) if outs else torch.zeros(0, dtype=torch.float64)
