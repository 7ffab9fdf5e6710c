"""ONNX import (an ONNX file -> a ``torch.fx.GraphModule`` in the bound engine's vocabulary) and export.

Modules: ``common`` (file reading, node attributes, the input), ``analysis`` (unsupported-op listing),
``graph_builder`` / ``import_ops`` / ``importer`` (the import), ``attention_match`` / ``attention_fusion`` (local
attention blocks), ``fx_writer`` / ``exporter`` (the export),
``runtime`` (onnxruntime).

Import (:func:`load_onnx`) builds the fx graph node by node from the ONNX graph. The result uses only what the
bound engine understands: ``nn.Linear``, ``nn.Conv2d``, ``nn.ReLU``, ``nn.BatchNorm1d/2d`` (eval; folded into
the preceding Conv/Linear when that layer feeds only the BN), ``nn.AvgPool2d``, ``nn.MaxPool2d``, ``nn.Flatten``,
``nn.ZeroPad2d`` / ``nn.ConstantPad2d``, ``operator.add/sub`` (tensor +/- tensor or constant),
``operator.mul/truediv`` (by a constant), ``torch.reshape(x, (-1, ...))``, ``torch.permute`` (dim 0 fixed),
``torch.squeeze/unsqueeze`` (non-batch dims), ``torch.cat`` (dim >= 1), ``torch.neg``, and ``get_attr`` buffers.
Sub-graphs that do not depend on the input (Constant, Shape -> Gather -> Concat chains, ...) are folded with
onnx's reference evaluator. MatMul + Add with constant weights becomes one ``nn.Linear``. A local-attention block
(SASA, ACmix as lingraft exports them: Gather windows, Softmax, products of input-dependent tensors) is checked
against the layer's computation and rebuilt as one ``OnnxSASA`` / ``OnnxACmix`` module (``attention_match``,
``attention_fusion``); other Softmax/Gather nodes are refused.

Batch convention. VNN-COMP files usually have a fixed batch of 1. When the ONNX input has rank >= 2 and its dim
0 is 1 or symbolic, dim 0 is the batch; otherwise (e.g. the ``[1]`` input of test_small.onnx, or ``[5, 3]``) the
whole ONNX tensor is ONE sample and the module adds a batch dim in front. Either way the module takes
``[B, *gm.input_shape]`` and returns ``[B, *gm.output_shape]`` for any B, computing the ONNX function per sample.

Internally every input-dependent value is an fx tensor ``[B, *P]`` plus a flag: *explicit* (its ONNX shape is
``[1, *P]``, ONNX dim 0 is the batch) or *implicit* (its ONNX shape is ``P``). Both describe the same per-sample
numbers; the flag only says how ONNX axes map to fx dims (explicit: same index; implicit: +1).

Export (:func:`export_onnx`) traces the model with torch.fx (Normalize and GraftedReLU as leaves) and writes
the standard ops itself with ``onnx.helper`` (Gemm, Conv, Relu, Sub/Div for normalization, Mul/Relu/Add for
grafted ReLUs, ...); models it cannot express fall back to torch's TorchScript exporter (``dynamo=False``; the
dynamo exporter needs the ``onnxscript`` package, which lingraft does not depend on). The file has a fixed
batch of 1 by default (the VNN-COMP convention), or a symbolic ``batch`` dim with ``dynamic_batch=True``.
"""

from lingraft.io.onnx.analysis import SUPPORTED_ONNX_OPS
from lingraft.io.onnx.exporter import export_onnx
from lingraft.io.onnx.graph_builder import OnnxGraphModule
from lingraft.io.onnx.importer import list_unsupported_ops, load_onnx
from lingraft.io.onnx.runtime import run_onnxruntime

__all__ = [
    "SUPPORTED_ONNX_OPS",
    "OnnxGraphModule",
    "export_onnx",
    "list_unsupported_ops",
    "load_onnx",
    "run_onnxruntime",
]
