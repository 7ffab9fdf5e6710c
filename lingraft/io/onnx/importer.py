"""ONNX import: :func:`load_onnx` turns an ONNX file into an :class:`OnnxGraphModule` for the bound engine.

The :class:`Importer` walks the ONNX graph in order: constant sub-graphs are folded with onnx's reference
evaluator, Shape/Size of input-dependent values become constants, and every other node goes to its ``op_*``
handler (:mod:`lingraft.io.onnx.import_ops`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lingraft.errors import LingraftError, UnsupportedModelError
from lingraft.io.onnx.analysis import analyze, check_supported, input_normalization, onnx_non_finite, raise_problems
from lingraft.io.onnx.attention_fusion import RegionVal, fuse_region, onnx_value
from lingraft.io.onnx.attention_match import AttentionRegion, analysis_view, find_attention_regions
from lingraft.io.onnx.common import first_line, node_attrs, node_label, read_model, real_input
from lingraft.io.onnx.graph_builder import EXAMPLE_BATCH, OnnxGraphModule, Val
from lingraft.io.onnx.import_ops import OpConverters
from lingraft.io.onnx.runtime import run_onnxruntime

__all__ = ["Importer", "list_unsupported_ops", "load_onnx"]

_CHECK_ATOL = 1e-4  # load_onnx(check=True): max |gm - onnxruntime| allowed, times max(1, |output|)


class Importer(OpConverters):
    """Builds the fx graph of one ONNX model (checked beforehand by :func:`check_supported`).

    regions: the local-attention blocks found by :func:`find_attention_regions`; their nodes are evaluated on the
    example (:class:`RegionVal`) and the block becomes one SASA/ACmix module at its exit (:func:`fuse_region`).
    """

    def __init__(self, model, info, regions: list[AttentionRegion] | tuple = ()):
        super().__init__(model, info)
        self.region_of = {id(n): r for r in regions for n in r.nodes}

    def run(self) -> OnnxGraphModule:
        """Convert every node; returns the module with its shape/name metadata set (onnx_path is the caller's)."""
        import onnx

        for init in self.g.initializer:
            self.env[init.name] = onnx.numpy_helper.to_array(init)
        info = self.info
        ph = self.b.graph.placeholder(self.b.name("x"))
        ex = torch.rand(EXAMPLE_BATCH, *info.per_sample, generator=torch.Generator().manual_seed(0))
        self.env[info.name] = Val(ph, ex, info.explicit)

        for node in self.g.node:
            try:
                self.convert(node)
            except LingraftError:
                raise
            except Exception as e:  # torch / numpy shape errors inside a handler
                raise UnsupportedModelError(
                    f"cannot convert ONNX {node.op_type} node '{node_label(node)}': {first_line(e)}"
                ) from None
        return self._module()

    def _module(self) -> OnnxGraphModule:
        """Close the fx graph on the one ONNX output and wrap it with the metadata attributes."""
        if len(self.g.output) != 1:
            raise UnsupportedModelError(f"ONNX model has {len(self.g.output)} outputs; lingraft supports one")
        info = self.info
        out_name = self.g.output[0].name
        out = self.get(out_name)
        if not isinstance(out, Val):
            raise UnsupportedModelError(f"ONNX output '{out_name}' does not depend on the input")
        self.b.graph.output(out.node)
        self.b.graph.lint()
        gm = OnnxGraphModule(self.b.root, self.b.graph, class_name="OnnxModel")
        gm.eval()
        gm.input_shape = tuple(info.per_sample)
        gm.output_shape = tuple(int(d) for d in out.ex.shape[1:])
        gm.onnx_input_name = info.name
        gm.onnx_output_name = out_name
        gm.onnx_input_shape = ((1,) if info.explicit else ()) + tuple(info.per_sample)
        gm.onnx_opset = int(self.opset)
        return gm

    def convert(self, node) -> None:
        """Define node's outputs in env: a folded constant, a static shape, or the Val its handler builds."""
        if id(node) in self.fused:
            self.env[node.output[0]] = self.fused[id(node)]
            return
        if id(node) in self.region_of:
            self.region_step(node, self.region_of[id(node)])
            return
        ins = [self.env.get(i) if i else None for i in node.input]
        dep = [isinstance(v, (Val, RegionVal)) for v in ins]
        op = node.op_type
        if not any(dep):  # constant sub-graph
            self.fold(node)
            return
        if op == "Shape":
            a = node_attrs(node)  # opset 15 start/end clamp like Python slicing
            s = np.array(ins[0].oshape, dtype=np.int64)
            self.env[node.output[0]] = s[a.get("start", 0) : a.get("end", len(s))]
            return
        if op == "Size":
            self.env[node.output[0]] = np.array(int(np.prod(ins[0].oshape)), dtype=np.int64)
            return
        handler = getattr(self, f"op_{op}", None)
        if handler is None:  # analyze() already rejected these; kept as a safety net
            raise_problems([(op, node_label(node), "")])
        res = handler(node, ins, node_attrs(node))
        self.env[node.output[0]] = res
        for extra in node.output[1:]:
            if extra and (extra in self.consumers or extra in self.graph_outputs):
                raise UnsupportedModelError(
                    f"{op} node '{node_label(node)}': its output '{extra}' is used; "
                    "lingraft supports only the first output"
                )

    def region_step(self, node, region: AttentionRegion) -> None:
        """Evaluate a node of a local-attention block on the example; at the block's exit, fuse the block."""
        feeds = {i: onnx_value(self.get(i)) for i in node.input if i}
        for name, val in zip([o for o in node.output if o], self.evaluate(node, feeds)):
            self.env[name] = RegionVal(np.asarray(val))
        if region.exit_name in node.output:
            self.env[region.exit_name] = fuse_region(self, region)

    def fold(self, node) -> None:
        """Evaluate a node whose inputs are all constant with onnx's reference evaluator."""
        missing = [i for i in node.input if i and i not in self.env]
        if missing:
            raise UnsupportedModelError(
                f"{node.op_type} node '{node_label(node)}' reads undefined value '{missing[0]}'; re-export the model"
            )
        outs = self.evaluate(node, {i: self.env[i] for i in node.input if i})
        for name, val in zip([o for o in node.output if o], outs):
            self.env[name] = np.asarray(val)

    def evaluate(self, node, feeds: dict) -> list:
        """The outputs of one node on the given input arrays, from onnx's reference evaluator."""
        import onnx
        from onnx.reference import ReferenceEvaluator

        h = onnx.helper
        graph = h.make_graph(
            [node],
            "fold",
            [h.make_tensor_value_info(i, onnx.TensorProto.UNDEFINED, None) for i in feeds],
            [h.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in node.output if o],
        )
        m = h.make_model(graph, opset_imports=list(self.model.opset_import))
        try:
            return ReferenceEvaluator(m).run(None, feeds)
        except Exception as e:
            raise UnsupportedModelError(
                f"cannot evaluate ONNX {node.op_type} node '{node_label(node)}': {first_line(e)}"
            ) from None


def load_onnx(path, *, check: bool = True, allow_non_finite: bool = False) -> OnnxGraphModule:
    """Convert an ONNX file into a torch.fx.GraphModule that the bound engine can consume.

    Returns a module mapping [B, *gm.input_shape] -> [B, *gm.output_shape] (any B; see the package docstring for
    the batch convention), with attributes input_shape, output_shape, onnx_input_name, onnx_output_name,
    onnx_input_shape (the per-sample feed shape for onnxruntime), onnx_path, onnx_opset, non_finite (None, or
    "initializer 'W' holds NaN" for the first non-finite weight) and normalization (None, or {"mean", "std"} of
    a Sub/Div by constants applied to the input first: the baked-in normalization of an exported model).
    All unsupported input-dependent ops are reported together (UnsupportedModelError) before any conversion.
    A NaN or infinite initializer is refused (LingraftError naming it) unless ``allow_non_finite``; the check is
    then skipped, as it cannot mean anything.
    check=True: compare with onnxruntime on 3 uniform [0, 1] inputs; raises LingraftError if
    max |gm - ort| > 1e-4 * max(1, max |ort|), naming non-finite outputs as the cause when there are any.
    """
    from lingraft.io.loader import non_finite_error

    model = read_model(path)
    regions, refusals = find_attention_regions(model)
    view = analysis_view(model, regions)
    try:
        info = check_supported(view)
    except UnsupportedModelError as e:
        if refusals:  # say first why the Softmax (which the analysis lists) is not a block lingraft can import
            raise UnsupportedModelError(f"{'; '.join(refusals)}; {e}") from None
        raise
    bad = onnx_non_finite(view)
    if bad is not None and not allow_non_finite:
        raise non_finite_error(path, bad)
    gm = Importer(model, info, regions).run()
    gm.onnx_path = str(Path(path))
    gm.non_finite = bad
    gm.normalization = input_normalization(model, info.name)
    if check and bad is None:
        _check_against_onnxruntime(gm, path)
    return gm


def _check_against_onnxruntime(gm: OnnxGraphModule, path) -> None:
    x = torch.rand(3, *gm.input_shape, generator=torch.Generator().manual_seed(1234))
    ref = run_onnxruntime(path, x)
    with torch.no_grad():
        got = gm(x).double().reshape(ref.shape)
    diff = float((got - ref).abs().max()) if ref.numel() else 0.0
    scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
    if diff <= _CHECK_ATOL * scale:
        return
    sides = [n for n, t in (("onnxruntime", ref), ("the import", got)) if not bool(torch.isfinite(t).all())]
    if sides:
        raise LingraftError(
            f"ONNX model {path} gives non-finite outputs (NaN or inf from {' and '.join(sides)}) on uniform [0, 1] "
            "inputs although its weights are finite: its values overflow float32 (weights too large) or it "
            "divides by zero; fix the model (load with check=False to skip the check)"
        )
    raise LingraftError(
        f"ONNX import of {path} does not match onnxruntime (max abs diff {diff:.3g}); "
        "please report this model (load with check=False to skip the check)"
    )


def list_unsupported_ops(path) -> list[tuple[str, str]]:
    """(op_type, node_name) of every input-dependent ONNX node that :func:`load_onnx` cannot convert.

    The nodes of recognised local-attention blocks (SASA, ACmix; see :mod:`lingraft.io.onnx.attention_match`) are
    not listed: the import rebuilds each block as one layer (and refuses it there if its constants do not match).
    Shape-level problems found only while building (e.g. a Conv on a 3-D tensor) are not listed either; load_onnx
    reports those. Unreadable files raise LingraftError.
    """
    model = read_model(path)
    regions, _ = find_attention_regions(model)
    return [(op, name) for op, name, _ in analyze(analysis_view(model, regions), real_input(model).name)]
