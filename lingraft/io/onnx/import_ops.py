"""ONNX op -> fx conversion: one ``op_<OpType>(node, ins, attrs)`` method per supported op.

``ins`` holds the node's inputs (Val for input-dependent values, np.ndarray for constants, None where absent);
``attrs`` its attributes. Each handler returns the Val of the node's first output. The batch flag of every Val
follows the package docstring; handlers convert between the explicit and implicit forms where an op needs one.
"""

from __future__ import annotations

import operator

import numpy as np
import torch
from torch import nn

from lingraft.errors import UnsupportedModelError
from lingraft.io.onnx.common import node_label
from lingraft.io.onnx.graph_builder import ImportState, Val

__all__ = ["OpConverters"]


class OpConverters(ImportState):
    """The op handlers of the importer (the walk over the graph is :class:`lingraft.io.onnx.importer.Importer`)."""

    # ---- elementwise ------------------------------------------------------------------------------------------
    def binary(self, node, kind: str, a, b) -> Val:
        """ONNX broadcasting add/sub/mul/div between values and constants, mapped onto fx [B, ...] tensors."""
        sa = a.oshape if isinstance(a, Val) else tuple(a.shape)
        sb = b.oshape if isinstance(b, Val) else tuple(b.shape)
        out = tuple(np.broadcast_shapes(sa, sb))
        r = len(out)
        vals = [x for x in (a, b) if isinstance(x, Val)]
        explicit = r >= 1 and out[0] == 1 and any(v.explicit and len(v.oshape) == r for v in vals)

        def align(x):
            s = x.oshape if isinstance(x, Val) else tuple(x.shape)
            target = (1,) * (r - len(s)) + tuple(s)
            if isinstance(x, Val):
                return self.reshape(x, target, explicit)
            arr = np.asarray(x).reshape(target[1:] if explicit else target)
            while arr.ndim > 0 and arr.shape[0] == 1:  # leading 1s broadcast anyway (right alignment)
                arr = arr[0]
            if arr.ndim == 0:
                return float(arr)
            return self.b.const(f"{node_label(node)}_c", self.tensor(arr.astype(np.float32)))

        xa, xb = align(a), align(b)
        if kind == "add":
            if not isinstance(xa, Val):
                xa, xb = xb, xa
            return self.b.fn(operator.add, (xa, xb), explicit)
        if kind == "sub":
            if isinstance(xa, Val):
                return self.b.fn(operator.sub, (xa, xb), explicit)
            neg = self.b.fn(torch.neg, (xb,), explicit)  # c - x = (-x) + c
            return self.b.fn(operator.add, (neg, xa), explicit)
        if kind == "mul":
            if not isinstance(xa, Val):
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
        if not isinstance(acc, Val):
            raise UnsupportedModelError(f"Sum node '{node_label(node)}' has no input-dependent operand")
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
            raise UnsupportedModelError(
                f"Cast node '{node_label(node)}' casts the input to a non-float type; "
                "lingraft supports float casts only"
            )
        return ins[0]

    # ---- linear layers ----------------------------------------------------------------------------------------
    def linear(self, node, v: Val, w: np.ndarray, bias: np.ndarray | None) -> Val:
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
        if c is None or isinstance(c, Val) or not np.issubdtype(np.asarray(c).dtype, np.floating):
            return None
        c = np.asarray(c)
        if c.size != k or c.ndim > out_rank or (c.ndim > 0 and c.shape[-1] != k):
            return None
        self._fuse_target = nxt
        return c.reshape(k)

    def op_MatMul(self, node, ins, a):
        x, y = ins[0], ins[1]
        self._fuse_target = None
        if isinstance(x, Val):
            res = self._value_times_const(node, x, np.asarray(y))
        else:
            res = self._const_times_value(node, np.asarray(x), y)
        if self._fuse_target is not None:
            self.fused[id(self._fuse_target)] = res
        return res

    def _value_times_const(self, node, x: Val, w: np.ndarray) -> Val:
        """x @ W with a constant W: [..., n] @ [n, m] (a Linear, with a following bias Add fused) or @ [n]."""
        while w.ndim > 2 and w.shape[0] == 1:
            w = w[0]
        if w.ndim > 2:
            raise UnsupportedModelError(
                f"MatMul node '{node_label(node)}': batched constant weights {list(w.shape)} are not supported"
            )
        if x.explicit and len(x.oshape) == 1:
            x = self.to_implicit(x)
        if len(x.oshape) == 0:
            raise UnsupportedModelError(f"MatMul node '{node_label(node)}' on a scalar")
        if w.ndim == 1:  # [..., n] @ [n] -> [...]
            lin = self.linear(node, x, w.reshape(1, -1), None)
            return self.b.fn(torch.squeeze, (lin, lin.ex.dim() - 1), lin.explicit)
        out_rank = len(x.oshape)
        bias = self.fuse_bias(node, out_rank, w.shape[1])
        return self.linear(node, x, w.T, bias)

    def _const_times_value(self, node, w: np.ndarray, v: Val) -> Val:
        """W @ x with a constant 2-D W [k, n]: x [n] (a Linear) or [..., n, m] (a Linear between transposes)."""
        if w.ndim != 2:
            raise UnsupportedModelError(
                f"MatMul node '{node_label(node)}': constant left operand of shape "
                f"{list(w.shape)}; lingraft supports a 2-D matrix"
            )
        if v.explicit and len(v.oshape) <= 2:  # the contracted/column dims would include the batch dim
            v = self.to_implicit(v)
        if len(v.oshape) == 1:  # [k, n] @ [n] -> [k]
            bias = self.fuse_bias(node, 1, w.shape[0])
            return self.linear(node, v, w, bias)
        # [k, n] @ [..., n, m] -> [..., k, m] via transposes
        d = v.ex.dim()
        t = self.b.fn(torch.transpose, (v, d - 2, d - 1), v.explicit)
        lin = self.linear(node, t, w, None)
        return self.b.fn(torch.transpose, (lin, d - 2, d - 1), v.explicit)

    def op_Gemm(self, node, ins, a):
        x = ins[0]
        if len(x.oshape) != 2:
            raise UnsupportedModelError(
                f"Gemm node '{node_label(node)}' on ONNX shape {list(x.oshape)}; Gemm needs a 2-D input"
            )
        wb = self.cnst(node, 1, "weight").astype(np.float64)
        wb = wb.T if a.get("transB", 0) else wb  # [n, k]
        w = float(a.get("alpha", 1.0)) * wb.T  # [k, n]
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
            raise UnsupportedModelError(f"{node.op_type} node '{node_label(node)}' pads {p}; lingraft supports 2-D")
        return p[0], p[1], p[2], p[3]

    def op_Conv(self, node, ins, a):
        x = self.to_explicit(ins[0], node, "Conv")
        w = self.cnst(node, 1, "weight")
        if w.ndim != 4 or x.ex.dim() != 4:
            raise UnsupportedModelError(
                f"Conv node '{node_label(node)}' is not 2-D (weight {list(w.shape)}); lingraft supports Conv2d only"
            )
        b = self.opt_const(node, 2)
        kh, kw = w.shape[2:]
        strides = list(a.get("strides", [1, 1]))
        t, l, bt, r = self._pads2d(node, a, x.ex.shape[2:], (kh, kw), strides)
        if (t, l) != (bt, r):
            x = self.b.module(f"{node.name or 'conv'}_pad", nn.ZeroPad2d((l, r, t, bt)), x)
            t = l = 0
        conv = nn.Conv2d(w.shape[1], w.shape[0], (kh, kw), stride=tuple(strides), padding=(t, l), bias=b is not None)
        with torch.no_grad():
            conv.weight.copy_(self.tensor(w.astype(np.float32)))
            if b is not None:
                conv.bias.copy_(self.tensor(b.astype(np.float32)))
        return self.b.module(node.name or "conv", conv, x)

    def op_BatchNormalization(self, node, ins, a):
        x = self.to_explicit(ins[0], node, "BatchNormalization")
        scale, bias, mean, var = (
            self.cnst(node, i, n).astype(np.float64) for i, n in ((1, "scale"), (2, "bias"), (3, "mean"), (4, "var"))
        )
        eps = float(a.get("epsilon", 1e-5))
        factor = scale / np.sqrt(var + eps)
        prod = x.producer
        src = node.input[0]
        foldable = (
            self.single_use(src)
            and x.producer_in is not None
            and x.node.op == "call_module"
            and ((isinstance(prod, nn.Conv2d) and x.ex.dim() == 4) or (isinstance(prod, nn.Linear) and x.ex.dim() == 2))
        )
        if foldable:
            return self._fold_batchnorm(x, factor, mean, bias)
        c = x.ex.shape[1]
        if x.ex.dim() == 4:
            bn = nn.BatchNorm2d(c, eps=eps)
        elif x.ex.dim() in (2, 3):
            bn = nn.BatchNorm1d(c, eps=eps)
        else:
            raise UnsupportedModelError(
                f"BatchNormalization node '{node_label(node)}' on ONNX shape "
                f"{list(x.oshape)}; lingraft supports 2-D to 4-D inputs"
            )
        with torch.no_grad():
            bn.weight.copy_(torch.as_tensor(scale, dtype=torch.float32))
            bn.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))
            bn.running_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
            bn.running_var.copy_(torch.as_tensor(var, dtype=torch.float32))
        return self.b.module(node.name or "bn", bn, x)

    @staticmethod
    def _fold_batchnorm(x: Val, factor: np.ndarray, mean: np.ndarray, beta: np.ndarray) -> Val:
        """Fold BN into the Conv2d/Linear that produced x (float64 per-channel factor = scale / sqrt(var + eps)).

        Exact algebra, rounded once: W' = W * f, b' = (b - mean) * f + beta.
        """
        prod = x.producer
        with torch.no_grad():
            wt = prod.weight.detach().double()
            f = torch.as_tensor(factor)
            prod.weight.copy_((wt * f.reshape((-1,) + (1,) * (wt.dim() - 1))).float())
            b0 = prod.bias.detach().double() if prod.bias is not None else torch.zeros(wt.shape[0], dtype=torch.float64)
            nb = (b0 - torch.as_tensor(mean)) * f + torch.as_tensor(beta)
            if prod.bias is None:
                prod.bias = nn.Parameter(nb.float())
            else:
                prod.bias.copy_(nb.float())
            ex = prod(x.producer_in)
        return Val(x.node, ex, x.explicit, prod, x.producer_in)

    def _pool(self, node, a, cls, **extra):
        x = self.to_explicit(self.get(node.input[0]), node, node.op_type)
        if x.ex.dim() != 4:
            raise UnsupportedModelError(
                f"{node.op_type} node '{node_label(node)}' is not 2-D "
                f"(input {list(x.oshape)}); lingraft supports 2-D pooling"
            )
        k = list(a["kernel_shape"])
        s = list(a.get("strides", [1] * len(k)))
        t, l, bt, r = self._pads2d(node, a, x.ex.shape[2:], k, s)
        if (t, l) != (bt, r):
            raise UnsupportedModelError(
                f"{node.op_type} node '{node_label(node)}' has asymmetric pads "
                f"{[t, l, bt, r]}; lingraft supports symmetric pooling pads"
            )
        mod = cls(tuple(k), stride=tuple(s), padding=(t, l), ceil_mode=bool(a.get("ceil_mode", 0)), **extra)
        return self.b.module(node.name or node.op_type.lower(), mod, x)

    def op_MaxPool(self, node, ins, a):
        return self._pool(node, a, nn.MaxPool2d)

    def op_AveragePool(self, node, ins, a):
        return self._pool(node, a, nn.AvgPool2d, count_include_pad=bool(a.get("count_include_pad", 0)))

    def op_GlobalAveragePool(self, node, ins, a):
        x = self.to_explicit(ins[0], node, "GlobalAveragePool")
        if x.ex.dim() != 4:
            raise UnsupportedModelError(f"GlobalAveragePool node '{node_label(node)}' is not 2-D")
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
            raise UnsupportedModelError(
                f"Pad node '{node_label(node)}' pads {pads} on ONNX shape "
                f"{list(x.oshape)}; lingraft supports padding H and W of 4-D tensors"
            )
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
            raise UnsupportedModelError(f"Reshape node '{node_label(node)}' has several -1 in {shape}")
        n = int(np.prod(s, dtype=np.int64))
        if -1 in t:
            known = int(np.prod([d for d in t if d != -1], dtype=np.int64))
            t[t.index(-1)] = n // known if known else 0
        if int(np.prod(t, dtype=np.int64)) != n:
            raise UnsupportedModelError(f"Reshape node '{node_label(node)}': cannot reshape {list(s)} to {shape}")
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
            raise UnsupportedModelError(f"Squeeze node '{node_label(node)}' squeezes a dim that is not 1")
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
