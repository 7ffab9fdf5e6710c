"""ONNX import (an ONNX file -> a ``torch.fx.GraphModule`` in the bound engine's vocabulary) and export.

Import (:func:`load_onnx`) builds the fx graph node by node from the ONNX graph. The result uses only what the
bound engine understands: ``nn.Linear``, ``nn.Conv2d``, ``nn.ReLU``, ``nn.BatchNorm1d/2d`` (eval; folded into
the preceding Conv/Linear when that layer feeds only the BN), ``nn.AvgPool2d``, ``nn.MaxPool2d``, ``nn.Flatten``,
``nn.ZeroPad2d`` / ``nn.ConstantPad2d``, ``operator.add/sub`` (tensor +/- tensor or constant),
``operator.mul/truediv`` (by a constant), ``torch.reshape(x, (-1, ...))``, ``torch.permute`` (dim 0 fixed),
``torch.squeeze/unsqueeze`` (non-batch dims), ``torch.cat`` (dim >= 1), ``torch.neg``, and ``get_attr`` buffers.
Sub-graphs that do not depend on the input (Constant, Shape -> Gather -> Concat chains, ...) are folded with
onnx's reference evaluator. MatMul + Add with constant weights becomes one ``nn.Linear``.

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

from __future__ import annotations

import copy
import operator
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from lingraft.errors import LingraftError, UnsupportedModelError, UsageError
from lingraft.io.files import atomic_write
from lingraft.models.layers import GraftedReLU, Normalize

__all__ = ["load_onnx", "list_unsupported_ops", "export_onnx", "SUPPORTED_ONNX_OPS", "OnnxGraphModule"]

#: ONNX ops accepted on input-dependent tensors (anything may appear in constant sub-graphs, which are folded).
SUPPORTED_ONNX_OPS = frozenset({
    "Add", "AveragePool", "BatchNormalization", "Cast", "Concat", "Conv", "Div", "Dropout", "Flatten", "Gemm",
    "GlobalAveragePool", "Identity", "MatMul", "MaxPool", "Mul", "Neg", "Pad", "Relu", "Reshape", "Shape", "Size",
    "Squeeze", "Sub", "Sum", "Transpose", "Unsqueeze",
})

_EXB = 2  # batch size of the example tensors that carry shapes through the build (2 catches batch mix-ups)
_CHECK_ATOL = 1e-4  # load_onnx(check=True): max |gm - onnxruntime| allowed, times max(1, |output|)
_META_ATTRS = ("input_shape", "output_shape", "onnx_input_name", "onnx_output_name", "onnx_input_shape",
               "onnx_path", "onnx_opset")


class OnnxGraphModule(fx.GraphModule):
    """A GraphModule that keeps the ONNX metadata attributes (input_shape, ...) through ``copy.deepcopy``."""

    def __deepcopy__(self, memo):
        res = super().__deepcopy__(memo)
        for k in _META_ATTRS:
            if k in self.__dict__:
                setattr(res, k, copy.deepcopy(self.__dict__[k], memo))
        return res


# ----------------------------------------------------------------------------------------------------------------
# reading and static analysis


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return (s[0] if s else type(e).__name__)[:300]


def _read_model(path) -> Any:
    """Load and check an ONNX file; any problem -> LingraftError with one line."""
    import onnx

    p = Path(path)
    if not p.exists():
        raise LingraftError(f"ONNX file not found: {p}; check the path")
    if p.is_dir():
        raise LingraftError(f"ONNX path is a directory: {p}; give the .onnx file itself")
    if p.stat().st_size == 0:
        raise LingraftError(f"ONNX file is empty: {p}; re-export the model")
    try:
        model = onnx.load(str(p))
    except Exception as e:  # DecodeError, bad external data, ...
        raise LingraftError(f"cannot parse {p} as ONNX ({type(e).__name__}: {_first_line(e)}); "
                            "is it an ONNX model file?") from None
    max_opset = onnx.defs.onnx_opset_version()
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx") and not 7 <= imp.version <= max_opset:
            raise LingraftError(f"{p} uses ONNX opset {imp.version}; lingraft reads opsets 7..{max_opset}: "
                                "re-export it (e.g. opset 13)")
    if len(model.graph.node) == 0 or len(model.graph.output) == 0:
        raise LingraftError(f"{p} is not a usable ONNX model (no graph nodes/outputs); is it an ONNX model file?")
    try:
        onnx.checker.check_model(str(p))
    except Exception as e:
        raise LingraftError(f"invalid ONNX model {p}: {_first_line(e)}; re-export it") from None
    return model


def _attrs(node) -> dict[str, Any]:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _node_label(node) -> str:
    return node.name or (f"<{node.output[0]}>" if node.output else "<unnamed>")


@dataclass
class _InputInfo:
    name: str
    dims: list            # the ONNX dims (int, or str for symbolic)
    explicit: bool        # dim 0 is the batch
    per_sample: tuple     # the shape without batch
    np_dtype: Any


def _real_input(model):
    """The one graph input that is not an initializer (old IR versions list initializers as inputs too)."""
    g = model.graph
    inits = {i.name for i in g.initializer}
    real = [i for i in g.input if i.name not in inits]
    if len(real) != 1:
        raise UnsupportedModelError(f"ONNX model has {len(real)} inputs ({', '.join(i.name for i in real)}); "
                                    "lingraft supports exactly one input tensor")
    return real[0]


def _input_info(model) -> _InputInfo:
    import onnx

    vi = _real_input(model)
    if not vi.type.HasField("tensor_type"):
        raise UnsupportedModelError(f"ONNX input '{vi.name}' is not a tensor; lingraft needs one float tensor input")
    tt = vi.type.tensor_type
    dtypes = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64,
              onnx.TensorProto.FLOAT16: np.float16}
    if tt.elem_type not in dtypes:
        raise UnsupportedModelError(f"ONNX input '{vi.name}' has element type "
                                    f"{onnx.TensorProto.DataType.Name(tt.elem_type)}; lingraft needs a float input")
    if not tt.HasField("shape"):
        raise UnsupportedModelError(f"ONNX input '{vi.name}' has no shape; re-export with a fixed input shape")
    dims = [d.dim_value if (d.HasField("dim_value") and d.dim_value > 0) else (d.dim_param or "?")
            for d in tt.shape.dim]
    explicit = len(dims) >= 2 and (isinstance(dims[0], str) or dims[0] == 1)
    per = dims[1:] if explicit else dims
    if any(isinstance(d, str) for d in per):
        raise UnsupportedModelError(f"ONNX input '{vi.name}' has dynamic non-batch dims {dims}; lingraft needs a "
                                    "fixed per-sample shape (only dim 0 may be symbolic): re-export with static shapes")
    return _InputInfo(vi.name, dims, explicit, tuple(int(d) for d in per), dtypes[tt.elem_type])


def _static_problem(node, dep: list[bool]) -> str | None:
    """Why an input-dependent node cannot be converted ('' = op not supported at all), or None when fine."""
    if node.domain not in ("", "ai.onnx"):
        return f"domain {node.domain}"
    op = node.op_type
    if op not in SUPPORTED_ONNX_OPS:
        return ""
    a = _attrs(node)
    d = dep + [False] * 6
    if op in ("MatMul", "Mul") and d[0] and d[1]:
        return "two input-dependent operands"
    if op == "Div" and d[1]:
        return "division by an input-dependent tensor"
    if op == "Gemm":
        if d[1] or d[2]:
            return "input-dependent weights"
        if a.get("transA", 0):
            return "transA=1 on the input"
    if op in ("Conv", "BatchNormalization", "Pad", "Reshape", "Squeeze", "Unsqueeze") and any(d[1:]):
        return "input-dependent weights/parameters"
    if op == "Conv" and a.get("group", 1) != 1:
        return f"group={a['group']}"
    if op in ("Conv", "MaxPool", "AveragePool") and any(x != 1 for x in a.get("dilations", [])):
        return "dilation != 1"
    if op == "Pad":
        mode = a.get("mode", b"constant")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if mode != "constant":
            return f"mode={mode}"
    if op == "BatchNormalization" and a.get("training_mode", 0):
        return "training_mode=1"
    if op == "Concat" and not all(dep):
        return "concatenation with a constant"
    return None


def _analyze(model, input_name: str) -> list[tuple[str, str, str]]:
    """Walk the graph once: (op_type, node label, detail) for every input-dependent node we cannot convert."""
    g = model.graph
    data = {input_name}
    problems = []
    for node in g.node:
        dep = [bool(i) and i in data for i in node.input]
        if not any(dep):
            continue  # constant sub-graph: folded
        if node.op_type in ("Shape", "Size") and node.domain in ("", "ai.onnx"):
            continue  # shapes are static, so their outputs are constants
        data.update(o for o in node.output if o)
        why = _static_problem(node, dep)
        if why is not None:
            problems.append((node.op_type, _node_label(node), why))
    return problems


def _problems_message(problems) -> str:
    parts = [f"{op} (node '{name}'" + (f", {why})" if why else ")") for op, name, why in problems]
    return ("unsupported ONNX ops: " + ", ".join(parts) + "; lingraft supports: "
            + ", ".join(sorted(SUPPORTED_ONNX_OPS)) + " (on input-dependent tensors)")


def _raise_problems(problems) -> None:
    if problems:
        raise UnsupportedModelError(_problems_message(problems))


def _check_supported(model) -> _InputInfo:
    """Collect every problem (unsupported ops, dynamic input dims) before converting anything; one error."""
    problems = _analyze(model, _real_input(model).name)
    try:
        info, shape_error = _input_info(model), None
    except UnsupportedModelError as e:
        info, shape_error = None, str(e)
    msgs = ([_problems_message(problems)] if problems else []) + ([shape_error] if shape_error else [])
    if msgs:
        raise UnsupportedModelError("; ".join(msgs))
    return info


def list_unsupported_ops(path) -> list[tuple[str, str]]:
    """(op_type, node_name) of every input-dependent ONNX node that :func:`load_onnx` cannot convert.

    Shape-level problems found only while building (e.g. a Conv on a 3-D tensor) are not listed; load_onnx
    reports those. Unreadable files raise LingraftError.
    """
    model = _read_model(path)
    return [(op, name) for op, name, _ in _analyze(model, _real_input(model).name)]


# ----------------------------------------------------------------------------------------------------------------
# the importer


@dataclass
class _Val:
    """An input-dependent value: fx node + example tensor ([_EXB, *P]) + batch flag (see the module docstring)."""

    node: fx.Node
    ex: torch.Tensor
    explicit: bool
    producer: nn.Module | None = None     # the module that computed it (for BatchNorm folding)
    producer_in: torch.Tensor | None = None

    @property
    def oshape(self) -> tuple[int, ...]:
        """The ONNX shape of this value (batch 1 where explicit)."""
        return ((1,) if self.explicit else ()) + tuple(self.ex.shape[1:])


class _Const:
    """A constant operand registered as a buffer: fx get_attr node + its tensor."""

    def __init__(self, node: fx.Node, t: torch.Tensor):
        self.node, self.t = node, t


_RESERVED = set(dir(fx.GraphModule)) | set(_META_ATTRS)


class _Builder:
    """Creates fx nodes and evaluates them on example tensors at the same time (which gives all shapes)."""

    def __init__(self):
        self.graph = fx.Graph()
        self.root = nn.Module()
        self._used: set[str] = set()

    def name(self, base: str) -> str:
        s = re.sub(r"\W", "_", base or "n").strip("_") or "n"
        if s[0].isdigit():
            s = "n_" + s
        cand, k = s, 1
        while cand in self._used or cand in _RESERVED:
            cand, k = f"{s}_{k}", k + 1
        self._used.add(cand)
        return cand

    def const(self, base: str, t: torch.Tensor) -> _Const:
        n = self.name(base)
        t = t.detach().clone()
        self.root.register_buffer(n, t)
        return _Const(self.graph.get_attr(n), t)

    def module(self, base: str, mod: nn.Module, v: _Val, explicit: bool | None = None) -> _Val:
        n = self.name(base)
        mod.eval()
        self.root.add_module(n, mod)
        node = self.graph.call_module(n, (v.node,))
        with torch.no_grad():
            ex = mod(v.ex)
        return _Val(node, ex, v.explicit if explicit is None else explicit, mod, v.ex)

    def fn(self, f: Callable, args: Sequence, explicit: bool, kwargs: dict | None = None) -> _Val:
        def node_arg(a):
            if isinstance(a, (_Val, _Const)):
                return a.node
            if isinstance(a, (list, tuple)):
                return type(a)(node_arg(x) for x in a)
            return a

        def ex_arg(a):
            if isinstance(a, _Val):
                return a.ex
            if isinstance(a, _Const):
                return a.t
            if isinstance(a, (list, tuple)):
                return type(a)(ex_arg(x) for x in a)
            return a

        kwargs = kwargs or {}
        node = self.graph.call_function(f, tuple(node_arg(a) for a in args),
                                        {k: node_arg(v) for k, v in kwargs.items()})
        with torch.no_grad():
            ex = f(*[ex_arg(a) for a in args], **{k: ex_arg(v) for k, v in kwargs.items()})
        return _Val(node, ex, explicit)


class _Importer:
    def __init__(self, model, info: _InputInfo):
        self.model = model
        self.info = info
        self.g = model.graph
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
        self.b = _Builder()
        self.env: dict[str, _Val | np.ndarray] = {}
        self.consumers: dict[str, list] = {}
        for node in self.g.node:
            for i in node.input:
                if i:
                    self.consumers.setdefault(i, []).append(node)
        self.graph_outputs = {o.name for o in self.g.output}
        self.fused: dict[int, _Val] = {}  # id(onnx node) -> value that already computes it (MatMul + Add -> Linear)

    # ---- helpers ----------------------------------------------------------------------------------------------
    def single_use(self, name: str) -> bool:
        return len(self.consumers.get(name, [])) == 1 and name not in self.graph_outputs

    def get(self, name: str):
        if name not in self.env:
            raise UnsupportedModelError(f"ONNX value '{name}' is used before it is defined; the graph is not "
                                        "topologically sorted (re-export it)")
        return self.env[name]

    def cnst(self, node, i: int, what: str) -> np.ndarray:
        if i >= len(node.input) or not node.input[i]:
            raise UnsupportedModelError(f"{node.op_type} node '{_node_label(node)}' lacks its {what}")
        v = self.get(node.input[i])
        if isinstance(v, _Val):
            raise UnsupportedModelError(f"{node.op_type} node '{_node_label(node)}': its {what} depends on the "
                                        "input; lingraft needs it constant")
        return v

    def opt_const(self, node, i: int) -> np.ndarray | None:
        if i >= len(node.input) or not node.input[i]:
            return None
        return self.cnst(node, i, f"input {i}")

    @staticmethod
    def tensor(a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(a))
        return t.float() if t.is_floating_point() else t

    def reshape(self, v: _Val, oshape: Sequence[int], explicit: bool) -> _Val:
        """View v as the ONNX shape `oshape` in the given form (same per-sample numbers, in row-major order)."""
        fx_shape = tuple(oshape[1:]) if explicit else tuple(oshape)
        if explicit:
            assert oshape[0] == 1
        if tuple(v.ex.shape[1:]) == fx_shape:
            return _Val(v.node, v.ex, explicit, v.producer, v.producer_in)
        if len(fx_shape) == 1 and v.ex.dim() > 2:
            return self.b.module("flatten", nn.Flatten(), v, explicit)
        return self.b.fn(torch.reshape, (v, (-1,) + fx_shape), explicit)

    def to_implicit(self, v: _Val) -> _Val:
        return self.reshape(v, v.oshape, False) if v.explicit else v

    def to_explicit(self, v: _Val, node, why: str) -> _Val:
        if v.explicit:
            return v
        s = v.oshape
        if len(s) >= 1 and s[0] == 1:
            return self.reshape(v, s, True)
        raise UnsupportedModelError(f"{node.op_type} node '{_node_label(node)}': {why} needs the batch in dim 0, "
                                    f"but its input has ONNX shape {list(s)}")

    def fx_axis(self, v: _Val, axis: int) -> int:
        return axis if v.explicit else axis + 1

    # ---- main -----------------------------------------------------------------------------------------------
    def run(self) -> OnnxGraphModule:
        import onnx

        for init in self.g.initializer:
            self.env[init.name] = onnx.numpy_helper.to_array(init)
        info = self.info
        ph = self.b.graph.placeholder(self.b.name("x"))
        ex = torch.rand(_EXB, *info.per_sample, generator=torch.Generator().manual_seed(0))
        self.env[info.name] = _Val(ph, ex, info.explicit)

        for node in self.g.node:
            try:
                self.convert(node)
            except LingraftError:
                raise
            except Exception as e:  # torch / numpy shape errors inside a handler
                raise UnsupportedModelError(f"cannot convert ONNX {node.op_type} node '{_node_label(node)}': "
                                            f"{_first_line(e)}") from None

        if len(self.g.output) != 1:
            raise UnsupportedModelError(f"ONNX model has {len(self.g.output)} outputs; lingraft supports one")
        out_name = self.g.output[0].name
        out = self.get(out_name)
        if not isinstance(out, _Val):
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
        if id(node) in self.fused:
            self.env[node.output[0]] = self.fused[id(node)]
            return
        ins = [self.env.get(i) if i else None for i in node.input]
        dep = [isinstance(v, _Val) for v in ins]
        op = node.op_type
        if not any(dep):  # constant sub-graph
            self.fold(node)
            return
        if op == "Shape":
            a = _attrs(node)  # opset 15 start/end clamp like Python slicing
            s = np.array(ins[0].oshape, dtype=np.int64)
            self.env[node.output[0]] = s[a.get("start", 0): a.get("end", len(s))]
            return
        if op == "Size":
            self.env[node.output[0]] = np.array(int(np.prod(ins[0].oshape)), dtype=np.int64)
            return
        handler = getattr(self, f"op_{op}", None)
        if handler is None:  # _analyze already rejected these; kept as a safety net
            _raise_problems([(op, _node_label(node), "")])
        res = handler(node, ins, _attrs(node))
        self.env[node.output[0]] = res
        for extra in node.output[1:]:
            if extra and (extra in self.consumers or extra in self.graph_outputs):
                raise UnsupportedModelError(f"{op} node '{_node_label(node)}': its output '{extra}' is used; "
                                            "lingraft supports only the first output")

    def fold(self, node) -> None:
        """Evaluate a node whose inputs are all constant with onnx's reference evaluator."""
        import onnx
        from onnx.reference import ReferenceEvaluator

        feeds = {i: self.env[i] for i in node.input if i}
        missing = [i for i in node.input if i and i not in self.env]
        if missing:
            raise UnsupportedModelError(f"{node.op_type} node '{_node_label(node)}' reads undefined value "
                                        f"'{missing[0]}'; re-export the model")
        h = onnx.helper
        graph = h.make_graph([node], "fold", [h.make_tensor_value_info(i, onnx.TensorProto.UNDEFINED, None)
                                              for i in feeds],
                             [h.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in node.output if o])
        m = h.make_model(graph, opset_imports=list(self.model.opset_import))
        try:
            outs = ReferenceEvaluator(m).run(None, feeds)
        except Exception as e:
            raise UnsupportedModelError(f"cannot evaluate constant ONNX {node.op_type} node '{_node_label(node)}': "
                                        f"{_first_line(e)}") from None
        for name, val in zip([o for o in node.output if o], outs):
            self.env[name] = np.asarray(val)

    # ---- elementwise ------------------------------------------------------------------------------------------
    def binary(self, node, kind: str, a, b) -> _Val:
        """ONNX broadcasting add/sub/mul/div between values and constants, mapped onto fx [B, ...] tensors."""
        sa = a.oshape if isinstance(a, _Val) else tuple(a.shape)
        sb = b.oshape if isinstance(b, _Val) else tuple(b.shape)
        out = tuple(np.broadcast_shapes(sa, sb))
        r = len(out)
        vals = [x for x in (a, b) if isinstance(x, _Val)]
        explicit = r >= 1 and out[0] == 1 and any(v.explicit and len(v.oshape) == r for v in vals)

        def align(x):
            s = x.oshape if isinstance(x, _Val) else tuple(x.shape)
            target = (1,) * (r - len(s)) + tuple(s)
            if isinstance(x, _Val):
                return self.reshape(x, target, explicit)
            arr = np.asarray(x).reshape(target[1:] if explicit else target)
            while arr.ndim > 0 and arr.shape[0] == 1:  # leading 1s broadcast anyway (right alignment)
                arr = arr[0]
            if arr.ndim == 0:
                return float(arr)
            return self.b.const(f"{_node_label(node)}_c", self.tensor(arr.astype(np.float32)))

        xa, xb = align(a), align(b)
        if kind == "add":
            if not isinstance(xa, _Val):
                xa, xb = xb, xa
            return self.b.fn(operator.add, (xa, xb), explicit)
        if kind == "sub":
            if isinstance(xa, _Val):
                return self.b.fn(operator.sub, (xa, xb), explicit)
            neg = self.b.fn(torch.neg, (xb,), explicit)  # c - x = (-x) + c
            return self.b.fn(operator.add, (neg, xa), explicit)
        if kind == "mul":
            if not isinstance(xa, _Val):
                xa, xb = xb, xa
            return self.b.fn(operator.mul, (xa, xb), explicit)
        return self.b.fn(operator.truediv, (xa, xb), explicit)

    def op_Add(self, node, ins, a):
        return self.binary(node, "add", *ins[:2])

    def op_Sub(self, node, ins, a):
        return self.binary(node, "sub", *ins[:2])

    def op_Mul(self, node, ins, a):
        return self.binary(node, "mul", *ins[:2])

    def op_Div(self, node, ins, a):
        return self.binary(node, "div", *ins[:2])

    def op_Sum(self, node, ins, a):
        acc = ins[0]
        for x in ins[1:]:
            acc = self.binary(node, "add", acc, x)
        if not isinstance(acc, _Val):
            raise UnsupportedModelError(f"Sum node '{_node_label(node)}' has no input-dependent operand")
        return acc

    def op_Neg(self, node, ins, a):
        return self.b.fn(torch.neg, (ins[0],), ins[0].explicit)

    def op_Relu(self, node, ins, a):
        return self.b.module(node.name or "relu", nn.ReLU(), ins[0])

    def op_Identity(self, node, ins, a):
        return ins[0]

    op_Dropout = op_Identity

    def op_Cast(self, node, ins, a):
        import onnx

        if a.get("to") not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16):
            raise UnsupportedModelError(f"Cast node '{_node_label(node)}' casts the input to a non-float type; "
                                        "lingraft supports float casts only")
        return ins[0]

    # ---- linear layers ----------------------------------------------------------------------------------------
    def linear(self, node, v: _Val, w: np.ndarray, bias: np.ndarray | None) -> _Val:
        """nn.Linear on the last fx dim; w: [out, in] (float64 ok)."""
        out_f, in_f = w.shape
        lin = nn.Linear(in_f, out_f, bias=bias is not None)
        with torch.no_grad():
            lin.weight.copy_(torch.as_tensor(np.array(w, dtype=np.float32)))
            if bias is not None:
                lin.bias.copy_(torch.as_tensor(np.array(bias, dtype=np.float32).reshape(out_f)))
        return self.b.module(node.name or node.op_type.lower(), lin, v)

    def fuse_bias(self, node, out_rank: int, k: int) -> np.ndarray | None:
        """If node's only consumer is Add(out, const) with a bias along the last dim, claim it."""
        out = node.output[0]
        if not self.single_use(out):
            return None
        nxt = self.consumers[out][0]
        if nxt.op_type != "Add" or nxt.domain not in ("", "ai.onnx") or len(nxt.input) != 2:
            return None
        other = nxt.input[1] if nxt.input[0] == out else nxt.input[0]
        c = self.env.get(other)
        if c is None or isinstance(c, _Val) or not np.issubdtype(np.asarray(c).dtype, np.floating):
            return None
        c = np.asarray(c)
        if c.size != k or c.ndim > out_rank or (c.ndim > 0 and c.shape[-1] != k):
            return None
        self._fuse_target = nxt
        return c.reshape(k)

    def op_MatMul(self, node, ins, a):
        x, y = ins[0], ins[1]
        self._fuse_target = None
        if isinstance(x, _Val):  # x @ W
            w = np.asarray(y)
            while w.ndim > 2 and w.shape[0] == 1:
                w = w[0]
            if w.ndim > 2:
                raise UnsupportedModelError(f"MatMul node '{_node_label(node)}': batched constant weights "
                                            f"{list(w.shape)} are not supported")
            if x.explicit and len(x.oshape) == 1:
                x = self.to_implicit(x)
            if len(x.oshape) == 0:
                raise UnsupportedModelError(f"MatMul node '{_node_label(node)}' on a scalar")
            if w.ndim == 1:  # [..., n] @ [n] -> [...]
                lin = self.linear(node, x, w.reshape(1, -1), None)
                return self.b.fn(torch.squeeze, (lin, lin.ex.dim() - 1), lin.explicit)
            out_rank = len(x.oshape)
            bias = self.fuse_bias(node, out_rank, w.shape[1])
            res = self.linear(node, x, w.T, bias)
        else:  # W @ x
            w = np.asarray(x)
            v = y
            if w.ndim != 2:
                raise UnsupportedModelError(f"MatMul node '{_node_label(node)}': constant left operand of shape "
                                            f"{list(w.shape)}; lingraft supports a 2-D matrix")
            if v.explicit and len(v.oshape) <= 2:  # the contracted/column dims would include the batch dim
                v = self.to_implicit(v)
            if len(v.oshape) == 1:  # [k, n] @ [n] -> [k]
                bias = self.fuse_bias(node, 1, w.shape[0])
                res = self.linear(node, v, w, bias)
            else:  # [k, n] @ [..., n, m] -> [..., k, m] via transposes
                d = v.ex.dim()
                t = self.b.fn(torch.transpose, (v, d - 2, d - 1), v.explicit)
                lin = self.linear(node, t, w, None)
                res = self.b.fn(torch.transpose, (lin, d - 2, d - 1), v.explicit)
        if self._fuse_target is not None:
            self.fused[id(self._fuse_target)] = res
        return res

    def op_Gemm(self, node, ins, a):
        x = ins[0]
        if len(x.oshape) != 2:
            raise UnsupportedModelError(f"Gemm node '{_node_label(node)}' on ONNX shape {list(x.oshape)}; "
                                        "Gemm needs a 2-D input")
        wb = self.cnst(node, 1, "weight").astype(np.float64)
        wb = wb.T if a.get("transB", 0) else wb  # [n, k]
        w = float(a.get("alpha", 1.0)) * wb.T   # [k, n]
        k = w.shape[0]
        c = self.opt_const(node, 2)
        bias = None
        rest = None
        if c is not None:
            c = float(a.get("beta", 1.0)) * np.asarray(c, dtype=np.float64)
            if c.size == 1:
                bias = np.full(k, c.reshape(()))
            elif c.size == k and c.shape[-1] == k:
                bias = c.reshape(k)
            else:
                rest = c
        res = self.linear(node, x, w, bias)
        if rest is not None:
            res = self.binary(node, "add", res, rest)
        return res

    # ---- conv / norm / pooling ----------------------------------------------------------------------------
    @staticmethod
    def _pads2d(node, a, in_hw, kernel, strides) -> tuple[int, int, int, int]:
        """(top, left, bottom, right) from ONNX pads / auto_pad."""
        auto = a.get("auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            res = []
            for i in range(2):
                out = -(-in_hw[i] // strides[i])
                total = max((out - 1) * strides[i] + kernel[i] - in_hw[i], 0)
                small = total // 2
                res.append((small, total - small) if auto == "SAME_UPPER" else (total - small, small))
            return res[0][0], res[1][0], res[0][1], res[1][1]
        if auto == "VALID":
            return 0, 0, 0, 0
        p = list(a.get("pads", [0, 0, 0, 0]))
        if len(p) != 4:
            raise UnsupportedModelError(f"{node.op_type} node '{_node_label(node)}' pads {p}; lingraft supports 2-D")
        return p[0], p[1], p[2], p[3]

    def op_Conv(self, node, ins, a):
        x = self.to_explicit(ins[0], node, "Conv")
        w = self.cnst(node, 1, "weight")
        if w.ndim != 4 or x.ex.dim() != 4:
            raise UnsupportedModelError(f"Conv node '{_node_label(node)}' is not 2-D (weight {list(w.shape)}); "
                                        "lingraft supports Conv2d only")
        b = self.opt_const(node, 2)
        kh, kw = w.shape[2:]
        strides = list(a.get("strides", [1, 1]))
        t, l, bt, r = self._pads2d(node, a, x.ex.shape[2:], (kh, kw), strides)
        if (t, l) != (bt, r):
            x = self.b.module(f"{node.name or 'conv'}_pad", nn.ZeroPad2d((l, r, t, bt)), x)
            t = l = 0
        conv = nn.Conv2d(w.shape[1], w.shape[0], (kh, kw), stride=tuple(strides), padding=(t, l),
                         bias=b is not None)
        with torch.no_grad():
            conv.weight.copy_(self.tensor(w.astype(np.float32)))
            if b is not None:
                conv.bias.copy_(self.tensor(b.astype(np.float32)))
        return self.b.module(node.name or "conv", conv, x)

    def op_BatchNormalization(self, node, ins, a):
        x = self.to_explicit(ins[0], node, "BatchNormalization")
        scale, bias, mean, var = (self.cnst(node, i, n).astype(np.float64)
                                  for i, n in ((1, "scale"), (2, "bias"), (3, "mean"), (4, "var")))
        eps = float(a.get("epsilon", 1e-5))
        factor = scale / np.sqrt(var + eps)
        prod = x.producer
        src = node.input[0]
        foldable = (self.single_use(src) and x.producer_in is not None and x.node.op == "call_module"
                    and ((isinstance(prod, nn.Conv2d) and x.ex.dim() == 4)
                         or (isinstance(prod, nn.Linear) and x.ex.dim() == 2)))
        if foldable:  # exact algebra, rounded once: W' = W * f, b' = (b - mean) * f + beta
            with torch.no_grad():
                wt = prod.weight.detach().double()
                f = torch.as_tensor(factor)
                prod.weight.copy_((wt * f.reshape((-1,) + (1,) * (wt.dim() - 1))).float())
                b0 = prod.bias.detach().double() if prod.bias is not None else torch.zeros(wt.shape[0],
                                                                                          dtype=torch.float64)
                nb = (b0 - torch.as_tensor(mean)) * f + torch.as_tensor(bias)
                if prod.bias is None:
                    prod.bias = nn.Parameter(nb.float())
                else:
                    prod.bias.copy_(nb.float())
                ex = prod(x.producer_in)
            return _Val(x.node, ex, x.explicit, prod, x.producer_in)
        c = x.ex.shape[1]
        if x.ex.dim() == 4:
            bn = nn.BatchNorm2d(c, eps=eps)
        elif x.ex.dim() in (2, 3):
            bn = nn.BatchNorm1d(c, eps=eps)
        else:
            raise UnsupportedModelError(f"BatchNormalization node '{_node_label(node)}' on ONNX shape "
                                        f"{list(x.oshape)}; lingraft supports 2-D to 4-D inputs")
        with torch.no_grad():
            bn.weight.copy_(torch.as_tensor(scale, dtype=torch.float32))
            bn.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))
            bn.running_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
            bn.running_var.copy_(torch.as_tensor(var, dtype=torch.float32))
        return self.b.module(node.name or "bn", bn, x)

    def _pool(self, node, a, cls, **extra):
        x = self.to_explicit(self.get(node.input[0]), node, node.op_type)
        if x.ex.dim() != 4:
            raise UnsupportedModelError(f"{node.op_type} node '{_node_label(node)}' is not 2-D "
                                        f"(input {list(x.oshape)}); lingraft supports 2-D pooling")
        k = list(a["kernel_shape"])
        s = list(a.get("strides", [1] * len(k)))
        t, l, bt, r = self._pads2d(node, a, x.ex.shape[2:], k, s)
        if (t, l) != (bt, r):
            raise UnsupportedModelError(f"{node.op_type} node '{_node_label(node)}' has asymmetric pads "
                                        f"{[t, l, bt, r]}; lingraft supports symmetric pooling pads")
        mod = cls(tuple(k), stride=tuple(s), padding=(t, l), ceil_mode=bool(a.get("ceil_mode", 0)), **extra)
        return self.b.module(node.name or node.op_type.lower(), mod, x)

    def op_MaxPool(self, node, ins, a):
        return self._pool(node, a, nn.MaxPool2d)

    def op_AveragePool(self, node, ins, a):
        return self._pool(node, a, nn.AvgPool2d, count_include_pad=bool(a.get("count_include_pad", 0)))

    def op_GlobalAveragePool(self, node, ins, a):
        x = self.to_explicit(ins[0], node, "GlobalAveragePool")
        if x.ex.dim() != 4:
            raise UnsupportedModelError(f"GlobalAveragePool node '{_node_label(node)}' is not 2-D")
        return self.b.module(node.name or "gap", nn.AvgPool2d(tuple(x.ex.shape[2:])), x)

    def op_Pad(self, node, ins, a):
        x = ins[0]
        if self.opset < 11:
            pads, value = list(a.get("pads", [])), float(a.get("value", 0.0))
        else:
            pads = [int(p) for p in self.cnst(node, 1, "pads").reshape(-1)]
            cv = self.opt_const(node, 2)
            value = float(np.asarray(cv).reshape(-1)[0]) if cv is not None and np.asarray(cv).size else 0.0
            axes = self.opt_const(node, 3)
            if axes is not None:  # opset 18: pads only for the listed axes
                r = len(x.oshape)
                full = [0] * (2 * r)
                ax = [int(q) % r for q in np.asarray(axes).reshape(-1)]
                for j, q in enumerate(ax):
                    full[q], full[q + r] = pads[j], pads[j + len(ax)]
                pads = full
        r = len(x.oshape)
        if r != 4 or any(pads[i] or pads[i + 4] for i in (0, 1)):
            raise UnsupportedModelError(f"Pad node '{_node_label(node)}' pads {pads} on ONNX shape "
                                        f"{list(x.oshape)}; lingraft supports padding H and W of 4-D tensors")
        x = self.to_explicit(x, node, "Pad")
        lrtb = (pads[3], pads[7], pads[2], pads[6])
        mod = nn.ZeroPad2d(lrtb) if value == 0.0 else nn.ConstantPad2d(lrtb, value)
        return self.b.module(node.name or "pad", mod, x)

    # ---- shape ops --------------------------------------------------------------------------------------------
    def op_Flatten(self, node, ins, a):
        x = ins[0]
        s = x.oshape
        axis = int(a.get("axis", 1))
        axis = axis + len(s) if axis < 0 else axis
        t0, t1 = int(np.prod(s[:axis], dtype=np.int64)), int(np.prod(s[axis:], dtype=np.int64))
        if t0 == 1:
            return self.reshape(x, (1, t1), True)
        return self.reshape(x, (t0, t1), False)

    def op_Reshape(self, node, ins, a):
        x = ins[0]
        shape = [int(d) for d in self.cnst(node, 1, "shape").reshape(-1)]
        s = x.oshape
        allowzero = int(a.get("allowzero", 0))
        t = [s[i] if (d == 0 and not allowzero) else d for i, d in enumerate(shape)]
        if t.count(-1) > 1:
            raise UnsupportedModelError(f"Reshape node '{_node_label(node)}' has several -1 in {shape}")
        n = int(np.prod(s, dtype=np.int64))
        if -1 in t:
            known = int(np.prod([d for d in t if d != -1], dtype=np.int64))
            t[t.index(-1)] = n // known if known else 0
        if int(np.prod(t, dtype=np.int64)) != n:
            raise UnsupportedModelError(f"Reshape node '{_node_label(node)}': cannot reshape {list(s)} to {shape}")
        return self.reshape(x, t, len(t) >= 2 and t[0] == 1)

    def op_Transpose(self, node, ins, a):
        x = ins[0]
        r = len(x.oshape)
        perm = list(a.get("perm", list(range(r))[::-1]))
        if perm == list(range(r)):
            return x
        if not (x.explicit and perm[0] == 0):
            x = self.to_implicit(x)
            perm = [0] + [p + 1 for p in perm]
        return self.b.fn(torch.permute, (x, tuple(perm)), x.explicit)

    def _axes(self, node, a) -> list[int] | None:
        if "axes" in a:
            return [int(q) for q in a["axes"]]
        c = self.opt_const(node, 1)
        return None if c is None else [int(q) for q in np.asarray(c).reshape(-1)]

    def op_Squeeze(self, node, ins, a):
        x = ins[0]
        s = x.oshape
        axes = self._axes(node, a)
        axes = [i for i, d in enumerate(s) if d == 1] if axes is None else [q % len(s) for q in axes]
        if any(s[q] != 1 for q in axes):
            raise UnsupportedModelError(f"Squeeze node '{_node_label(node)}' squeezes a dim that is not 1")
        t = [d for i, d in enumerate(s) if i not in axes]
        if x.explicit and 0 not in axes:
            for q in sorted(axes, reverse=True):
                x = self.b.fn(torch.squeeze, (x, q), True)
            return x
        return self.reshape(x, t, False)  # dim 0 squeezed away: the per-sample numbers stay, now implicit

    def op_Unsqueeze(self, node, ins, a):
        x = ins[0]
        s = list(x.oshape)
        axes = self._axes(node, a) or []
        r = len(s) + len(axes)
        axes = sorted(q % r for q in axes)
        t = list(s)
        for q in axes:
            t.insert(q, 1)
        if x.explicit and 0 not in axes:
            for q in axes:
                x = self.b.fn(torch.unsqueeze, (x, q), True)
            return x
        return self.reshape(x, t, len(t) >= 2 and t[0] == 1)

    def op_Concat(self, node, ins, a):
        vals = list(ins)
        r = len(vals[0].oshape)
        axis = int(a["axis"]) % r
        if all(v.explicit for v in vals) and axis != 0:
            return self.b.fn(torch.cat, (vals, axis), True)
        vals = [self.to_implicit(v) for v in vals]
        return self.b.fn(torch.cat, (vals, axis + 1), False)


def load_onnx(path, *, check: bool = True) -> OnnxGraphModule:
    """Convert an ONNX file into a torch.fx.GraphModule that the bound engine can consume.

    Returns a module mapping [B, *gm.input_shape] -> [B, *gm.output_shape] (any B; see the module docstring for
    the batch convention), with attributes input_shape, output_shape, onnx_input_name, onnx_output_name,
    onnx_input_shape (the per-sample feed shape for onnxruntime), onnx_path, onnx_opset.
    All unsupported input-dependent ops are reported together (UnsupportedModelError) before any conversion.
    check=True: compare with onnxruntime on 3 uniform [0, 1] inputs; raises LingraftError if
    max |gm - ort| > 1e-4 * max(1, max |ort|).
    """
    model = _read_model(path)
    info = _check_supported(model)
    gm = _Importer(model, info).run()
    gm.onnx_path = str(Path(path))
    if check:
        x = torch.rand(3, *gm.input_shape, generator=torch.Generator().manual_seed(1234))
        ref = run_onnxruntime(path, x)
        with torch.no_grad():
            got = gm(x).double().reshape(ref.shape)
        diff = float((got - ref).abs().max()) if ref.numel() else 0.0
        scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
        if not diff <= _CHECK_ATOL * scale:
            raise LingraftError(f"ONNX import of {path} does not match onnxruntime (max abs diff {diff:.3g}); "
                                "please report this model (load with check=False to skip the check)")
    return gm


def _ort_session(path_or_bytes):
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
        sess = _ort_session(path)
    except Exception as e:
        raise LingraftError(f"onnxruntime cannot load {path}: {_first_line(e)}") from None
    inp = sess.get_inputs()[0]
    model = onnx.load(str(path), load_external_data=False)
    info = _input_info(model)
    feed_shape = ((1,) if info.explicit else ()) + info.per_sample
    outs = []
    for b in range(x.shape[0]):
        xi = x[b].detach().cpu().numpy().astype(info.np_dtype).reshape(feed_shape)
        y = sess.run(None, {inp.name: xi})[0]
        outs.append(torch.from_numpy(np.asarray(y, dtype=np.float64)).reshape(-1))
    return torch.stack(outs) if outs else torch.zeros(0, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------------------------
# the exporter


class _ExportUnsupported(Exception):
    """Raised by the fx exporter for something it cannot write; export_onnx then tries TorchScript."""


class _LeafTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (Normalize, GraftedReLU)) or super().is_leaf_module(m, qualname)


_FN_ADD = {operator.add, torch.add, operator.iadd}
_FN_SUB = {operator.sub, torch.sub, operator.isub}
_FN_MUL = {operator.mul, torch.mul, operator.imul}
_FN_DIV = {operator.truediv, torch.div, torch.true_divide, operator.itruediv}
_FN_RELU = {F.relu, torch.relu, torch.relu_}
_FN_NEG = {operator.neg, torch.neg}


class _FxToOnnx:
    """Writes an ONNX graph from a torch.fx trace of a lingraft model (module-level leaves)."""

    def __init__(self, model: nn.Module, example: torch.Tensor, opset: int, dynamic_batch: bool):
        self.model = model
        self.x = example
        self.opset = opset
        self.dynamic = dynamic_batch
        self.nodes: list = []
        self.inits: dict[str, np.ndarray] = {}
        self.used: set[str] = set()
        self.names: dict[fx.Node, str] = {}      # input-dependent fx node -> ONNX tensor name
        self.cnames: dict[int, str] = {}         # id(constant fx node) -> initializer name

    def fresh(self, base: str) -> str:
        s = re.sub(r"[^\w.]", "_", base) or "t"
        cand, k = s, 1
        while cand in self.used:
            cand, k = f"{s}_{k}", k + 1
        self.used.add(cand)
        return cand

    def const(self, arr, base: str) -> str:
        arr = np.asarray(arr)
        if np.issubdtype(arr.dtype, np.floating) or arr.dtype == np.bool_:
            arr = arr.astype(np.float32)
        name = self.fresh(base)
        self.inits[name] = np.ascontiguousarray(arr)
        return name

    def emit(self, op: str, inputs: list[str], base: str, **attrs) -> str:
        import onnx

        out = self.fresh(base)
        self.nodes.append(onnx.helper.make_node(op, inputs, [out], name=self.fresh(f"{op}_{base}"), **attrs))
        return out

    def trace(self) -> Any:
        import onnx

        h = onnx.helper
        try:
            graph = _LeafTracer().trace(self.model)
        except Exception as e:
            raise _ExportUnsupported(f"torch.fx cannot trace the model ({_first_line(e)})") from None
        vals: dict[fx.Node, Any] = {}
        dep: dict[fx.Node, bool] = {}
        placeholder_seen = False
        out_name = None

        def load(a):
            return fx.node.map_arg(a, lambda n: vals[n])

        with torch.no_grad():
            for n in graph.nodes:
                if n.op == "placeholder":
                    if placeholder_seen:
                        raise _ExportUnsupported("the model takes more than one input")
                    placeholder_seen = True
                    vals[n], dep[n] = self.x, True
                    self.names[n] = self.fresh("input")
                    continue
                if n.op == "output":
                    res = n.args[0]
                    if not isinstance(res, fx.Node) or not dep.get(res):
                        raise _ExportUnsupported("the model must return one input-dependent tensor")
                    out_name = self.names[res]
                    continue
                args, kwargs = load(n.args), load(n.kwargs)
                if n.op == "get_attr":
                    v = self.model
                    for part in n.target.split("."):
                        v = getattr(v, part)
                elif n.op == "call_module":
                    v = self.model.get_submodule(n.target)(*args, **kwargs)
                elif n.op == "call_function":
                    v = n.target(*args, **kwargs)
                else:  # call_method
                    v = getattr(args[0], n.target)(*args[1:], **kwargs)
                vals[n] = v
                dep[n] = isinstance(v, torch.Tensor) and any(dep.get(i, False) for i in n.all_input_nodes)
                if dep[n]:
                    self.names[n] = self.convert(n, vals, dep)

        in_name = self.names[next(iter(graph.nodes))]
        # the graph output gets the name "output"
        if out_name == in_name:
            out_name = self.emit("Identity", [in_name], "output")
        self._rename(out_name, "output")
        self._rename(in_name, "input")
        out_val = vals[[n for n in graph.nodes if n.op == "output"][0].args[0]]
        batch = "batch" if self.dynamic else 1
        inp = h.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [batch, *self.x.shape[1:]])
        outp = h.make_tensor_value_info("output", onnx.TensorProto.FLOAT, [batch, *out_val.shape[1:]])
        inits = [onnx.numpy_helper.from_array(a, name) for name, a in self.inits.items()]
        g = h.make_graph(self.nodes, "lingraft", [inp], [outp], initializer=inits)
        opsets = [h.make_opsetid("", self.opset)]
        m = h.make_model(g, opset_imports=opsets, producer_name="lingraft")
        m.ir_version = h.find_min_ir_version_for(opsets)
        return m

    def _rename(self, old: str, new: str) -> None:
        if old == new:
            return
        for nd in self.nodes:
            for i, s in enumerate(nd.input):
                if s == old:
                    nd.input[i] = new
            for i, s in enumerate(nd.output):
                if s == old:
                    nd.output[i] = new

    # ---- conversion of one input-dependent fx node -------------------------------------------------------------
    def arg(self, a, vals, dep, base: str) -> str:
        """ONNX name for an operand: an input-dependent node, a constant node/tensor, or a Python number."""
        if isinstance(a, fx.Node):
            if dep.get(a):
                return self.names[a]
            key = id(a)
            if key not in self.cnames:
                v = vals[a]
                if not isinstance(v, (torch.Tensor, int, float)):
                    raise _ExportUnsupported(f"operand {a.name} is a {type(v).__name__}")
                self.cnames[key] = self.const(v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v,
                                              a.name)
            return self.cnames[key]
        if isinstance(a, torch.Tensor):
            return self.const(a.detach().cpu().numpy(), base + "_c")
        if isinstance(a, (int, float, bool)):
            return self.const(np.array(float(a), dtype=np.float32), base + "_c")
        raise _ExportUnsupported(f"operand of type {type(a).__name__}")

    def convert(self, n: fx.Node, vals, dep) -> str:
        base = n.name
        x0 = n.args[0] if n.args else None
        if n.op == "call_module":
            return self.convert_module(n, self.model.get_submodule(n.target), vals, dep)
        target = n.target
        if n.op == "call_method":
            name = target.rstrip("_") if target.endswith("_") and not target.startswith("_") else target
            table = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div, "relu": torch.relu,
                     "neg": torch.neg, "flatten": torch.flatten, "view": torch.reshape, "reshape": torch.reshape,
                     "permute": torch.permute, "transpose": torch.transpose, "squeeze": torch.squeeze,
                     "unsqueeze": torch.unsqueeze, "matmul": torch.matmul, "contiguous": "identity",
                     "clone": "identity"}
            if name not in table:
                raise _ExportUnsupported(f"tensor method .{target}()")
            target = table[name]
        if target == "identity":
            return self.names[x0]
        binops = [(_FN_ADD, "Add"), (_FN_SUB, "Sub"), (_FN_MUL, "Mul"), (_FN_DIV, "Div")]
        for fns, op in binops:
            if target in fns:
                if set(n.kwargs) - {"out"} or len(n.args) != 2:
                    raise _ExportUnsupported(f"{op} with extra arguments")
                return self.emit(op, [self.arg(a, vals, dep, base) for a in n.args], base)
        if target in _FN_RELU:
            return self.emit("Relu", [self.names[x0]], base)
        if target in _FN_NEG:
            return self.emit("Neg", [self.names[x0]], base)
        if target in (torch.flatten, torch.reshape):
            return self.reshape_to(self.names[x0], vals[x0], vals[n], base)
        if target is torch.permute:
            dims = n.args[1:] if len(n.args) > 2 else n.args[1]
            return self.emit("Transpose", [self.names[x0]], base, perm=[int(d) % vals[n].dim() for d in dims])
        if target is torch.transpose:
            r = vals[n].dim()
            perm = list(range(r))
            d0, d1 = int(n.args[1]) % r, int(n.args[2]) % r
            perm[d0], perm[d1] = perm[d1], perm[d0]
            return self.emit("Transpose", [self.names[x0]], base, perm=perm)
        if target in (torch.squeeze, torch.unsqueeze):
            return self.reshape_to(self.names[x0], vals[x0], vals[n], base)
        if target is torch.cat:
            tensors = n.args[0]
            dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
            return self.emit("Concat", [self.arg(t, vals, dep, base) for t in tensors], base,
                             axis=int(dim) % vals[n].dim())
        if target in (torch.matmul, operator.matmul):
            return self.emit("MatMul", [self.arg(a, vals, dep, base) for a in n.args[:2]], base)
        if target is F.linear:
            w = n.args[1] if len(n.args) > 1 else n.kwargs["weight"]
            b = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
            if dep.get(w) or (isinstance(b, fx.Node) and dep.get(b)):
                raise _ExportUnsupported("F.linear with input-dependent weights")
            return self.linear(self.names[x0], vals[x0], vals[w], None if b is None else vals[b], base)
        raise _ExportUnsupported(f"function {getattr(target, '__name__', target)}")

    def reshape_to(self, name: str, xin: torch.Tensor, xout: torch.Tensor, base: str) -> str:
        if xout.shape[0] != xin.shape[0]:
            raise _ExportUnsupported("a reshape that changes the batch dim")
        if xout.dim() == 2 and xin.dim() >= 2:
            return self.emit("Flatten", [name], base, axis=1)
        shape = self.const(np.array([0, *xout.shape[1:]], dtype=np.int64), base + "_shape")  # 0 = keep batch
        return self.emit("Reshape", [name, shape], base)

    def linear(self, name: str, xin: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, base: str) -> str:
        wn = self.const(w.detach().cpu().numpy(), base + ".weight")
        bn = None if b is None else self.const(b.detach().cpu().numpy(), base + ".bias")
        if xin.dim() == 2:
            return self.emit("Gemm", [name, wn] + ([bn] if bn else []), base, transB=1)
        wt = self.const(w.detach().cpu().numpy().T, base + ".weight_t")
        y = self.emit("MatMul", [name, wt], base + "_mm")
        return self.emit("Add", [y, bn], base) if bn else y

    def convert_module(self, n: fx.Node, m: nn.Module, vals, dep) -> str:
        base = n.target
        x0 = n.args[0]
        xin = vals[x0]
        name = self.names[x0]
        if len(n.args) != 1 or n.kwargs:
            raise _ExportUnsupported(f"module {type(m).__name__} called with several inputs")
        if isinstance(m, (nn.Identity, nn.Dropout)):
            return name
        if isinstance(m, nn.ReLU):
            return self.emit("Relu", [name], base)
        if isinstance(m, nn.Linear):
            return self.linear(name, xin, m.weight, m.bias, base)
        if isinstance(m, Normalize):
            def view(t):
                a = t.detach().cpu().numpy().astype(np.float32)
                return a.reshape(()) if a.size == 1 else a.reshape((1, -1) + (1,) * (xin.dim() - 2))

            y = self.emit("Sub", [name, self.const(view(m.mean), base + ".mean")], base + "_sub")
            return self.emit("Div", [y, self.const(view(m.std), base + ".std")], base)
        if isinstance(m, GraftedReLU):
            s, t, c = (q.detach().cpu().numpy().astype(np.float32) for q in m.coefficients())
            if not m.mask.any():  # relu(1 * x) + 0 * x + 0 == relu(x)
                return self.emit("Relu", [name], base)
            xs = self.emit("Mul", [name, self.const(s, base + ".s")], base + "_xs")
            r = self.emit("Relu", [xs], base + "_relu")
            xt = self.emit("Mul", [name, self.const(t, base + ".t")], base + "_xt")
            y = self.emit("Add", [r, xt], base + "_sum")
            return self.emit("Add", [y, self.const(c, base + ".c")], base)
        if isinstance(m, nn.Conv2d):
            if m.padding_mode != "zeros":
                raise _ExportUnsupported(f"Conv2d padding_mode={m.padding_mode}")
            kh, kw = m.kernel_size
            if isinstance(m.padding, str):
                if m.padding == "valid":
                    pads = [0, 0, 0, 0]
                else:  # 'same' (stride 1): torch puts the odd extra pad at the end
                    tot = [m.dilation[0] * (kh - 1), m.dilation[1] * (kw - 1)]
                    pads = [tot[0] // 2, tot[1] // 2, tot[0] - tot[0] // 2, tot[1] - tot[1] // 2]
            else:
                pads = [m.padding[0], m.padding[1], m.padding[0], m.padding[1]]
            ins = [name, self.const(m.weight.detach().cpu().numpy(), base + ".weight")]
            if m.bias is not None:
                ins.append(self.const(m.bias.detach().cpu().numpy(), base + ".bias"))
            return self.emit("Conv", ins, base, kernel_shape=[kh, kw], strides=list(m.stride), pads=pads,
                             dilations=list(m.dilation), group=m.groups)
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            if m.running_mean is None:
                raise _ExportUnsupported("BatchNorm without running statistics")
            c = m.num_features
            w = m.weight if m.weight is not None else torch.ones(c)
            b = m.bias if m.bias is not None else torch.zeros(c)
            ins = [name] + [self.const(t.detach().cpu().numpy(), f"{base}.{k}") for k, t in
                            (("weight", w), ("bias", b), ("running_mean", m.running_mean),
                             ("running_var", m.running_var))]
            return self.emit("BatchNormalization", ins, base, epsilon=float(m.eps))
        if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
            pair = lambda v: list(v) if isinstance(v, (tuple, list)) else [v, v]  # noqa: E731
            k, s, p = pair(m.kernel_size), pair(m.stride if m.stride is not None else m.kernel_size), pair(m.padding)
            attrs = dict(kernel_shape=k, strides=s, pads=[p[0], p[1], p[0], p[1]], ceil_mode=int(m.ceil_mode))
            if isinstance(m, nn.MaxPool2d):
                if m.return_indices or pair(m.dilation) != [1, 1]:
                    raise _ExportUnsupported("MaxPool2d with indices or dilation")
                return self.emit("MaxPool", [name], base, **attrs)
            if m.divisor_override:
                raise _ExportUnsupported("AvgPool2d divisor_override")
            return self.emit("AveragePool", [name], base, count_include_pad=int(m.count_include_pad), **attrs)
        if isinstance(m, nn.AdaptiveAvgPool2d) and vals[n].shape[2:] == (1, 1):
            return self.emit("GlobalAveragePool", [name], base)
        if isinstance(m, nn.Flatten):
            return self.reshape_to(name, xin, vals[n], base)
        if isinstance(m, (nn.ZeroPad2d, nn.ConstantPad2d)):
            l, r, t, b = m.padding
            pads = self.const(np.array([0, 0, t, l, 0, 0, b, r], dtype=np.int64), base + ".pads")
            value = self.const(np.array(float(m.value), dtype=np.float32), base + ".value")
            return self.emit("Pad", [name, pads, value], base, mode="constant")
        raise _ExportUnsupported(f"module {type(m).__name__}")


def _export_torchscript(model: nn.Module, x: torch.Tensor, opset: int, dynamic_batch: bool) -> Any:
    """Fallback: torch's legacy TorchScript exporter (still in torch 2.13 with dynamo=False)."""
    import io as _io

    import onnx

    buf = _io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=opset, input_names=["input"],
                              output_names=["output"], do_constant_folding=True,
                              dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}} if dynamic_batch else None)
    except Exception as e:
        raise LingraftError(f"cannot export the model to ONNX: {_first_line(e)}") from None
    return onnx.load_from_string(buf.getvalue())


def export_onnx(model: nn.Module, path, input_shape: tuple, *, opset: int = 13,
                check_inputs: torch.Tensor | None = None, tol: float = 1e-5, dynamic_batch: bool = False) -> dict:
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
        ci = torch.as_tensor(check_inputs)
        if tuple(ci.shape) == input_shape:
            ci = ci.unsqueeze(0)
        if tuple(ci.shape[1:]) != input_shape:
            raise UsageError(f"check_inputs has shape {list(check_inputs.shape)}; expected [N, "
                             f"{', '.join(map(str, input_shape))}]")
        check_inputs = ci
    try:
        dev = next(model.parameters()).device
    except StopIteration:
        dev = torch.device("cpu")
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        # batch 2 in the trace: a reshape that mixes samples shows up as a changed dim 0
        x = torch.rand(2, *input_shape, generator=torch.Generator().manual_seed(0)).to(dev)
        exporter = "lingraft-fx"
        try:
            proto = _FxToOnnx(model, x, opset, dynamic_batch).trace()
        except _ExportUnsupported:
            exporter = "torchscript"
            proto = _export_torchscript(model, x[:1], opset, dynamic_batch)
        try:
            onnx.checker.check_model(proto, full_check=True)
        except Exception as e:
            raise LingraftError(f"the exported ONNX model is invalid ({exporter}): {_first_line(e)}") from None
        data = proto.SerializeToString()
        atomic_write(path, lambda f: f.write(data))

        # check with onnxruntime: random inputs + the caller's real inputs
        xs = torch.rand(4, *input_shape, generator=torch.Generator().manual_seed(1))
        if check_inputs is not None:
            xs = torch.cat([xs, check_inputs.detach().float().cpu()])
        try:
            sess = _ort_session(path)
            iname = sess.get_inputs()[0].name
            ref = []
            for i in range(xs.shape[0]):
                ref.append(sess.run(None, {iname: xs[i:i + 1].numpy()})[0])
            got_ort = torch.from_numpy(np.concatenate(ref)).double()
            with torch.no_grad():
                want = model(xs.to(dev)).double().cpu()
            diff = float((got_ort.reshape(want.shape) - want).abs().max())
        except Exception as e:
            _unlink(path)
            raise LingraftError(f"onnxruntime cannot run the exported model: {_first_line(e)}") from None
        if not diff <= tol:
            _unlink(path)
            raise LingraftError(f"ONNX export check failed: max |onnx - torch| = {diff:.3g} > tol {tol:g}; "
                                f"the file {path} was deleted")
    finally:
        for m, t in modes.items():
            m.training = t
    g = proto.graph
    return {"path": str(path), "opset": opset, "max_abs_diff": diff, "num_nodes": len(g.node),
            "input_name": g.input[0].name, "output_name": g.output[0].name, "input_shape": input_shape,
            "onnx_input_shape": ["batch" if dynamic_batch else 1, *input_shape], "exporter": exporter}


def _unlink(path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
