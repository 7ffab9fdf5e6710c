"""The fx -> ONNX writer: traces a lingraft model with torch.fx and writes standard ONNX ops with onnx.helper.

Normalize and GraftedReLU stay leaves of the trace (Normalize -> Sub/Div, GraftedReLU -> Mul/Relu/Mul/Add/Add).
Only input-dependent fx nodes become ONNX nodes; everything else (weights, constants) becomes an initializer.
Anything the writer cannot express raises :class:`ExportUnsupported`, and export_onnx falls back to TorchScript.
"""

from __future__ import annotations

import operator
import re
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from lingraft.io.onnx.common import first_line
from lingraft.models.layers import GraftedReLU, Normalize

__all__ = ["ExportUnsupported", "FxToOnnx"]


class ExportUnsupported(Exception):
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
_BINOPS = [(_FN_ADD, "Add"), (_FN_SUB, "Sub"), (_FN_MUL, "Mul"), (_FN_DIV, "Div")]
# tensor methods (in-place ones without their trailing "_") -> the function they compute
_METHODS = {
    "add": torch.add,
    "sub": torch.sub,
    "mul": torch.mul,
    "div": torch.div,
    "relu": torch.relu,
    "neg": torch.neg,
    "flatten": torch.flatten,
    "view": torch.reshape,
    "reshape": torch.reshape,
    "permute": torch.permute,
    "transpose": torch.transpose,
    "squeeze": torch.squeeze,
    "unsqueeze": torch.unsqueeze,
    "matmul": torch.matmul,
    "contiguous": "identity",
    "clone": "identity",
}


def _pair(v) -> list:
    """A pooling size as [h, w] (an int means both)."""
    return list(v) if isinstance(v, (tuple, list)) else [v, v]


class FxToOnnx:
    """Writes an ONNX graph from a torch.fx trace of a lingraft model (module-level leaves).

    example: [2, *input_shape] on the model's device; the trace runs the model on it to get every shape.
    """

    def __init__(self, model: nn.Module, example: torch.Tensor, opset: int, dynamic_batch: bool):
        self.model = model
        self.x = example
        self.opset = opset
        self.dynamic = dynamic_batch
        self.nodes: list = []
        self.inits: dict[str, np.ndarray] = {}
        self.used: set[str] = set()
        self.names: dict[fx.Node, str] = {}  # input-dependent fx node -> ONNX tensor name
        self.cnames: dict[int, str] = {}  # id(constant fx node) -> initializer name

    def fresh(self, base: str) -> str:
        """A new ONNX tensor/node name derived from base."""
        s = re.sub(r"[^\w.]", "_", base) or "t"
        cand, k = s, 1
        while cand in self.used:
            cand, k = f"{s}_{k}", k + 1
        self.used.add(cand)
        return cand

    def const(self, arr, base: str) -> str:
        """Add an initializer (floats and bools as float32); returns its name."""
        arr = np.asarray(arr)
        if np.issubdtype(arr.dtype, np.floating) or arr.dtype == np.bool_:
            arr = arr.astype(np.float32)
        name = self.fresh(base)
        self.inits[name] = np.ascontiguousarray(arr)
        return name

    def emit(self, op: str, inputs: list[str], base: str, **attrs) -> str:
        """Append one ONNX node; returns the name of its output."""
        import onnx

        out = self.fresh(base)
        self.nodes.append(onnx.helper.make_node(op, inputs, [out], name=self.fresh(f"{op}_{base}"), **attrs))
        return out

    def trace(self) -> Any:
        """The whole ONNX ModelProto ("input" -> "output", batch 1 or symbolic "batch")."""
        try:
            graph = _LeafTracer().trace(self.model)
        except Exception as e:
            raise ExportUnsupported(f"torch.fx cannot trace the model ({first_line(e)})") from None
        vals, out_name = self._write_nodes(graph)
        in_name = self.names[next(iter(graph.nodes))]
        # the graph output gets the name "output"
        if out_name == in_name:
            out_name = self.emit("Identity", [in_name], "output")
        self._rename(out_name, "output")
        self._rename(in_name, "input")
        out_val = vals[next(n for n in graph.nodes if n.op == "output").args[0]]
        return self._model_proto(out_val)

    def _write_nodes(self, graph: fx.Graph) -> tuple[dict[fx.Node, Any], str | None]:
        """Run the fx graph on the example, writing an ONNX node for each input-dependent fx node.

        Returns the value of every fx node and the ONNX name of the graph output.
        """
        vals: dict[fx.Node, Any] = {}
        dep: dict[fx.Node, bool] = {}
        placeholder_seen = False
        out_name = None
        with torch.no_grad():
            for n in graph.nodes:
                if n.op == "placeholder":
                    if placeholder_seen:
                        raise ExportUnsupported("the model takes more than one input")
                    placeholder_seen = True
                    vals[n], dep[n] = self.x, True
                    self.names[n] = self.fresh("input")
                    continue
                if n.op == "output":
                    res = n.args[0]
                    if not isinstance(res, fx.Node) or not dep.get(res):
                        raise ExportUnsupported("the model must return one input-dependent tensor")
                    out_name = self.names[res]
                    continue
                v = self._evaluate(n, vals)
                vals[n] = v
                dep[n] = isinstance(v, torch.Tensor) and any(dep.get(i, False) for i in n.all_input_nodes)
                if dep[n]:
                    self.names[n] = self.convert(n, vals, dep)
        return vals, out_name

    def _evaluate(self, n: fx.Node, vals: dict[fx.Node, Any]) -> Any:
        """The value of a get_attr/call_* fx node on the example, given the values of its inputs."""
        args, kwargs = fx.node.map_arg(n.args, lambda a: vals[a]), fx.node.map_arg(n.kwargs, lambda a: vals[a])
        if n.op == "get_attr":
            v = self.model
            for part in n.target.split("."):
                v = getattr(v, part)
            return v
        if n.op == "call_module":
            return self.model.get_submodule(n.target)(*args, **kwargs)
        if n.op == "call_function":
            return n.target(*args, **kwargs)
        return getattr(args[0], n.target)(*args[1:], **kwargs)  # call_method

    def _model_proto(self, out_val: torch.Tensor) -> Any:
        """Wrap the written nodes and initializers into a ModelProto of the requested opset."""
        import onnx

        h = onnx.helper
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
                    raise ExportUnsupported(f"operand {a.name} is a {type(v).__name__}")
                self.cnames[key] = self.const(v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v, a.name)
            return self.cnames[key]
        if isinstance(a, torch.Tensor):
            return self.const(a.detach().cpu().numpy(), base + "_c")
        if isinstance(a, (int, float, bool)):
            return self.const(np.array(float(a), dtype=np.float32), base + "_c")
        raise ExportUnsupported(f"operand of type {type(a).__name__}")

    def convert(self, n: fx.Node, vals, dep) -> str:
        """Write the ONNX node(s) for the input-dependent fx node n; returns the ONNX name of its value."""
        if n.op == "call_module":
            return self.convert_module(n, self.model.get_submodule(n.target), vals, dep)
        x0 = n.args[0] if n.args else None
        target = n.target
        if n.op == "call_method":
            name = target.rstrip("_") if target.endswith("_") and not target.startswith("_") else target
            if name not in _METHODS:
                raise ExportUnsupported(f"tensor method .{target}()")
            target = _METHODS[name]
        if target == "identity":
            return self.names[x0]
        for fns, op in _BINOPS:
            if target in fns:
                if set(n.kwargs) - {"out"} or len(n.args) != 2:
                    raise ExportUnsupported(f"{op} with extra arguments")
                return self.emit(op, [self.arg(a, vals, dep, n.name) for a in n.args], n.name)
        if target in _FN_RELU:
            return self.emit("Relu", [self.names[x0]], n.name)
        if target in _FN_NEG:
            return self.emit("Neg", [self.names[x0]], n.name)
        return self._convert_function(n, target, vals, dep)

    def _convert_function(self, n: fx.Node, target, vals, dep) -> str:
        """The shape functions, cat, matmul and F.linear (the elementwise ones are handled by convert)."""
        base = n.name
        x0 = n.args[0] if n.args else None
        if target in (torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze):
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
        if target is torch.cat:
            tensors = n.args[0]
            dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
            return self.emit(
                "Concat", [self.arg(t, vals, dep, base) for t in tensors], base, axis=int(dim) % vals[n].dim()
            )
        if target in (torch.matmul, operator.matmul):
            return self.emit("MatMul", [self.arg(a, vals, dep, base) for a in n.args[:2]], base)
        if target is F.linear:
            w = n.args[1] if len(n.args) > 1 else n.kwargs["weight"]
            b = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
            if dep.get(w) or (isinstance(b, fx.Node) and dep.get(b)):
                raise ExportUnsupported("F.linear with input-dependent weights")
            return self.linear(self.names[x0], vals[x0], vals[w], None if b is None else vals[b], base)
        raise ExportUnsupported(f"function {getattr(target, '__name__', target)}")

    def reshape_to(self, name: str, xin: torch.Tensor, xout: torch.Tensor, base: str) -> str:
        """Flatten (to 2-D) or Reshape with dim 0 kept, from xin's shape to xout's."""
        if xout.shape[0] != xin.shape[0]:
            raise ExportUnsupported("a reshape that changes the batch dim")
        if xout.dim() == 2 and xin.dim() >= 2:
            return self.emit("Flatten", [name], base, axis=1)
        shape = self.const(np.array([0, *xout.shape[1:]], dtype=np.int64), base + "_shape")  # 0 = keep batch
        return self.emit("Reshape", [name, shape], base)

    def linear(self, name: str, xin: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, base: str) -> str:
        """y = x W^T + b: Gemm on 2-D inputs, MatMul (+ Add) otherwise. w: [out, in]."""
        wn = self.const(w.detach().cpu().numpy(), base + ".weight")
        bn = None if b is None else self.const(b.detach().cpu().numpy(), base + ".bias")
        if xin.dim() == 2:
            return self.emit("Gemm", [name, wn] + ([bn] if bn else []), base, transB=1)
        wt = self.const(w.detach().cpu().numpy().T, base + ".weight_t")
        y = self.emit("MatMul", [name, wt], base + "_mm")
        return self.emit("Add", [y, bn], base) if bn else y

    def convert_module(self, n: fx.Node, m: nn.Module, vals, dep) -> str:
        """Write the ONNX node(s) for a call of module m on one input-dependent tensor."""
        base = n.target
        x0 = n.args[0]
        xin = vals[x0]
        name = self.names[x0]
        if len(n.args) != 1 or n.kwargs:
            raise ExportUnsupported(f"module {type(m).__name__} called with several inputs")
        if isinstance(m, (nn.Identity, nn.Dropout)):
            return name
        if isinstance(m, nn.ReLU):
            return self.emit("Relu", [name], base)
        if isinstance(m, nn.Linear):
            return self.linear(name, xin, m.weight, m.bias, base)
        if isinstance(m, Normalize):
            return self._normalize(m, name, xin, base)
        if isinstance(m, GraftedReLU):
            return self._grafted_relu(m, name, base)
        if isinstance(m, nn.Conv2d):
            return self._conv2d(m, name, base)
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            return self._batchnorm(m, name, base)
        if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
            return self._pool2d(m, name, base)
        if isinstance(m, nn.AdaptiveAvgPool2d) and vals[n].shape[2:] == (1, 1):
            return self.emit("GlobalAveragePool", [name], base)
        if isinstance(m, nn.Flatten):
            return self.reshape_to(name, xin, vals[n], base)
        if isinstance(m, (nn.ZeroPad2d, nn.ConstantPad2d)):
            l, r, t, b = m.padding
            pads = self.const(np.array([0, 0, t, l, 0, 0, b, r], dtype=np.int64), base + ".pads")
            value = self.const(np.array(float(m.value), dtype=np.float32), base + ".value")
            return self.emit("Pad", [name, pads, value], base, mode="constant")
        raise ExportUnsupported(f"module {type(m).__name__}")

    def _normalize(self, m: Normalize, name: str, xin: torch.Tensor, base: str) -> str:
        """(x - mean) / std, with per-channel mean/std broadcast over [B, C, ...]."""

        def view(t):
            a = t.detach().cpu().numpy().astype(np.float32)
            return a.reshape(()) if a.size == 1 else a.reshape((1, -1) + (1,) * (xin.dim() - 2))

        y = self.emit("Sub", [name, self.const(view(m.mean), base + ".mean")], base + "_sub")
        return self.emit("Div", [y, self.const(view(m.std), base + ".std")], base)

    def _grafted_relu(self, m: GraftedReLU, name: str, base: str) -> str:
        """relu(s * x) + t * x + c with the layer's coefficients; plain Relu when no neuron is grafted."""
        s, t, c = (q.detach().cpu().numpy().astype(np.float32) for q in m.coefficients())
        if not m.mask.any():  # relu(1 * x) + 0 * x + 0 == relu(x)
            return self.emit("Relu", [name], base)
        xs = self.emit("Mul", [name, self.const(s, base + ".s")], base + "_xs")
        r = self.emit("Relu", [xs], base + "_relu")
        xt = self.emit("Mul", [name, self.const(t, base + ".t")], base + "_xt")
        y = self.emit("Add", [r, xt], base + "_sum")
        return self.emit("Add", [y, self.const(c, base + ".c")], base)

    def _conv2d(self, m: nn.Conv2d, name: str, base: str) -> str:
        if m.padding_mode != "zeros":
            raise ExportUnsupported(f"Conv2d padding_mode={m.padding_mode}")
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
        return self.emit(
            "Conv",
            ins,
            base,
            kernel_shape=[kh, kw],
            strides=list(m.stride),
            pads=pads,
            dilations=list(m.dilation),
            group=m.groups,
        )

    def _batchnorm(self, m: nn.BatchNorm1d | nn.BatchNorm2d, name: str, base: str) -> str:
        """Inference-mode BatchNormalization with the running statistics."""
        if m.running_mean is None:
            raise ExportUnsupported("BatchNorm without running statistics")
        c = m.num_features
        w = m.weight if m.weight is not None else torch.ones(c)
        b = m.bias if m.bias is not None else torch.zeros(c)
        ins = [name] + [
            self.const(t.detach().cpu().numpy(), f"{base}.{k}")
            for k, t in (("weight", w), ("bias", b), ("running_mean", m.running_mean), ("running_var", m.running_var))
        ]
        return self.emit("BatchNormalization", ins, base, epsilon=float(m.eps))

    def _pool2d(self, m: nn.MaxPool2d | nn.AvgPool2d, name: str, base: str) -> str:
        k, s, p = _pair(m.kernel_size), _pair(m.stride if m.stride is not None else m.kernel_size), _pair(m.padding)
        attrs = {"kernel_shape": k, "strides": s, "pads": [p[0], p[1], p[0], p[1]], "ceil_mode": int(m.ceil_mode)}
        if isinstance(m, nn.MaxPool2d):
            if m.return_indices or _pair(m.dilation) != [1, 1]:
                raise ExportUnsupported("MaxPool2d with indices or dilation")
            return self.emit("MaxPool", [name], base, **attrs)
        if m.divisor_override:
            raise ExportUnsupported("AvgPool2d divisor_override")
        return self.emit("AveragePool", [name], base, count_include_pad=int(m.count_include_pad), **attrs)
