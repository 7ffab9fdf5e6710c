"""Rebuild a matched local-attention block (:mod:`lingraft.io.onnx.attention_match`) as a SASA or ACmix module.

While the importer walks a block, its nodes are evaluated with onnx's reference evaluator on the first example
sample (:class:`RegionVal`), which gives every shape and lets Shape nodes read them. At the block's exit node
:func:`fuse_region` checks every shape, attribute and constant against the module's own computation (window
indices and mask equal to :func:`lingraft.models.attention.window_index`, reduction axes, Softmax axis, the
query scale, the fixed ACmix kernels' layout, ...) and builds :class:`OnnxSASA` / :class:`OnnxACmix` with the
file's weights. The module then computes the block exactly, and the bound engine bounds it like the native layer
(an opaque leaf with ``interval_bounds``). Anything that does not match is refused with one line naming the
Softmax node and the reason; nothing is approximated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from lingraft.errors import UnsupportedModelError, UsageError
from lingraft.io.onnx.attention_match import AttentionRegion, Operand
from lingraft.io.onnx.common import node_attrs
from lingraft.io.onnx.graph_builder import ImportState, Val
from lingraft.models.attention import SASA, ACmix, window_index

__all__ = ["OnnxACmix", "OnnxSASA", "RegionVal", "fuse_region", "onnx_value"]

_CHECK_TOL = 1e-4  # rebuilt block vs the reference evaluation of its ONNX nodes: max abs diff / max(1, |ref|)


@dataclass
class RegionVal:
    """An input-dependent value inside a block being fused: its ONNX value on the first example sample."""

    arr: np.ndarray

    @property
    def oshape(self) -> tuple[int, ...]:
        return tuple(self.arr.shape)


def onnx_value(v) -> np.ndarray:
    """The ONNX value of an env entry on the first example sample (Val [B, *P] -> its ONNX shape)."""
    if isinstance(v, RegionVal):
        return v.arr
    if isinstance(v, Val):
        return v.ex[:1].reshape(v.oshape).detach().cpu().numpy()
    return v


class OnnxSASA(SASA):
    """SASA rebuilt from ONNX: the key bias is the file's constant key_bias [1, h|1, d|1, K, 1|P] (rel_h, rel_w
    are folded into it by the export)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, heads: int, bias: bool, key_bias: Tensor):
        super().__init__(in_channels, out_channels, kernel_size, heads, bias)
        del self.rel_h, self.rel_w
        self.register_buffer("key_bias", key_bias)

    def _key_bias(self) -> Tensor:
        return self.key_bias


class OnnxACmix(ACmix):
    """ACmix rebuilt from ONNX: the positional key term (pe_p - pe_j) * s is the file's constant key_bias
    [1, h|1, d|1, K, P] (conv_p and the coordinate grid are folded into it by the export)."""

    def __init__(self, in_planes: int, out_planes: int, key_bias: Tensor, **kw):
        super().__init__(in_planes, out_planes, **kw)
        del self.conv_p
        self.register_buffer("key_bias", key_bias)

    def _pe_delta(self, h: int, w: int, idx: Tensor, ref: Tensor) -> Tensor:
        return self.key_bias.to(ref)


class _Values:
    """Shapes and constants of one block in the importer's env; need() refuses with the block's name."""

    def __init__(self, state: ImportState, region: AttentionRegion):
        self.state, self.r = state, region

    def need(self, ok, why: str) -> None:
        if not ok:
            raise UnsupportedModelError(
                f"Softmax node '{self.r.label}': the {self.r.kind} local-attention block does not match what "
                f"lingraft can bound ({why}); re-export it with lingraft or remove the attention layer"
            )

    def shape(self, name: str) -> tuple[int, ...]:
        v = self.state.get(name)
        return v.oshape if isinstance(v, (Val, RegionVal)) else tuple(np.shape(v))

    def const(self, node, i: int) -> np.ndarray | None:
        """Constant input i of node (None when absent)."""
        if i >= len(node.input) or not node.input[i]:
            return None
        v = self.state.get(node.input[i])
        self.need(not isinstance(v, (Val, RegionVal)), f"input {i} of {node.op_type} '{node.name}' is not constant")
        return np.asarray(v)

    def split(self, node) -> tuple[str, np.ndarray]:
        """(input-dependent input name, constant operand) of a binary node with one constant operand."""
        dep0 = isinstance(self.state.get(node.input[0]), (Val, RegionVal))
        return node.input[0 if dep0 else 1], self.const(node, 1 if dep0 else 0)

    def axes(self, node) -> list[int]:
        """The normalized reduction axes of a ReduceSum node (attribute before opset 13, input after)."""
        a = node_attrs(node)
        c = self.const(node, 1)
        axes = [int(q) for q in (c.reshape(-1) if c is not None else a.get("axes", []))]
        r = len(self.shape(node.input[0]))
        self.need(int(a.get("keepdims", 1)) == 0, "ReduceSum must drop the summed axis (keepdims=0)")
        return sorted(q % r for q in axes)

    def conv(self, node, c_in: int, kernel: int = 1) -> tuple[np.ndarray, np.ndarray | None, dict]:
        """(weight [C_out, C_in/group, k, k], bias [C_out] or None, attributes) of a stride-1 undilated Conv."""
        a = node_attrs(node)
        w = self.const(node, 1)
        self.need(
            w.ndim == 4 and w.shape[2:] == (kernel, kernel), f"Conv '{node.name}' must have a {kernel}x{kernel} kernel"
        )
        self.need(self.shape(node.input[0])[1] == c_in, f"Conv '{node.name}' reads {c_in} channels")
        self.need(all(s == 1 for s in a.get("strides", [1, 1])), f"Conv '{node.name}' must have stride 1")
        self.need(all(d == 1 for d in a.get("dilations", [1, 1])), f"Conv '{node.name}' must not be dilated")
        auto = a.get("auto_pad", b"NOTSET")
        self.need(auto in (b"NOTSET", "NOTSET"), f"Conv '{node.name}' must have explicit pads")
        self.need(list(a.get("pads", [0] * 4)) == [kernel // 2] * 4, f"Conv '{node.name}' must pad by {kernel // 2}")
        return w.astype(np.float32), self.const(node, 2), a


@dataclass
class _Core:
    """The shared attention part: x [1, c_in, h, w], c = heads * hd channels, windows k x k (K = k^2, P = h*w)."""

    c_in: int
    h: int
    w: int
    heads: int
    hd: int
    k: int
    padding: str
    convs: list  # [(weight [c, c_in, 1, 1], bias [c] or None)] for q, k, v
    key_bias: np.ndarray  # [1, 1|heads, 1|hd, 1|K, 1|P]
    scale: float | None


def _operand_checks(v: _Values, op: Operand, c: int, p: int) -> tuple[np.ndarray, int]:
    """Checks a key/value chain up to the Mul: gathered windows of views(conv) [1, c, p]. Returns (idx, K)."""
    g = op.gather
    v.need(v.shape(g.input[0]) == (1, c, p), f"Gather '{g.name}' must read the flattened map [1, {c}, {p}]")
    v.need(int(node_attrs(g).get("axis", 0)) % 3 == 2, f"Gather '{g.name}' must gather pixels (axis 2)")
    idx = v.const(g, 1)
    v.need(np.issubdtype(idx.dtype, np.integer) and idx.size % p == 0, f"Gather '{g.name}' needs window indices")
    v.need(v.shape(g.output[0]) == (1, c, *idx.shape), f"Gather '{g.name}' has an unexpected output shape")
    return idx.reshape(-1), idx.size // p


def _logit_checks(v: _Values, r: AttentionRegion, heads: int, hd: int, kk: int, p: int) -> np.ndarray:
    """q [1, h, d, 1, P] * kb [1, h, d, K, P] summed over d, masked, softmax over K; returns the mask [K, P]."""
    full, logit = (1, heads, hd, kk, p), (1, heads, kk, p)
    m = r.logits_mul
    v.need(sorted([v.shape(m.input[0]), v.shape(m.input[1])]) == sorted([full, (1, heads, hd, 1, p)]), "q * k shapes")
    v.need(v.shape(m.output[0]) == full == v.shape(r.logits_sum.input[0]), "q * k must be [1, h, d, K, P]")
    v.need(v.axes(r.logits_sum) == [2] and v.shape(r.logits_sum.output[0]) == logit, "logits must sum over channels")
    masked = np.zeros((kk, p), dtype=bool)
    if r.where is not None:
        wh = r.where
        dep_x = isinstance(v.state.get(wh.input[1]), (Val, RegionVal))
        fill = v.const(wh, 2 if dep_x else 1)
        cond = np.broadcast_to(v.const(wh, 0).astype(bool), logit)
        v.need(bool(np.all(np.isneginf(fill))), f"Where '{wh.name}' must fill -inf")
        v.need(v.shape(wh.input[1 if dep_x else 2]) == logit == v.shape(wh.output[0]), "masked logits shape")
        v.need(bool((cond == cond[:, :1]).all()), "every head must have the same mask")
        masked = cond[0, 0] if not dep_x else ~cond[0, 0]
    sm = r.softmax
    v.need(v.state.opset >= 13 and v.shape(sm.input[0]) == logit, "Softmax needs opset >= 13 and [1, h, K, P]")
    v.need(int(node_attrs(sm).get("axis", -1)) % 4 == 2, "Softmax must normalise over the window (axis 2)")
    m2 = r.weights_mul
    v.need(sorted([v.shape(m2.input[0]), v.shape(m2.input[1])]) == sorted([full, (1, heads, 1, kk, p)]), "a * v shapes")
    v.need(v.shape(m2.output[0]) == full == v.shape(r.out_sum.input[0]), "a * v must be [1, h, d, K, P]")
    v.need(v.axes(r.out_sum) == [3] and v.shape(r.out_sum.output[0]) == (1, heads, hd, p), "output must sum windows")
    return masked


def _core(v: _Values, r: AttentionRegion, paddings: tuple[str, ...]) -> _Core:
    xs = v.shape(r.entry)
    v.need(len(xs) == 4 and xs[0] == 1, f"the block input must be [1, C, H, W], got {list(xs)}")
    _, c_in, h, w = xs
    p = h * w
    convs = [v.conv(op.conv, c_in)[:2] for op in (r.query, r.keys, r.values)]
    v.need(all(int(node_attrs(op.conv).get("group", 1)) == 1 for op in (r.query, r.keys, r.values)), "grouped q/k/v")
    c = convs[0][0].shape[0]
    v.need(all(cv[0].shape == (c, c_in, 1, 1) for cv in convs), "q, k, v must be 1x1 convs of equal width")
    qs = v.shape(r.query.out)
    v.need(len(qs) == 5 and qs[0] == 1 and qs[3:] == (1, p) and qs[1] * qs[2] == c, f"query shape {list(qs)}")
    heads, hd = qs[1], qs[2]
    scale = None
    if r.query.const_op is not None:
        din, s = v.split(r.query.const_op)
        v.need(s.size == 1 and v.shape(r.query.const_op.output[0]) == v.shape(din), "the query scale must be a number")
        scale = float(s.reshape(()))
    idx, kk = _operand_checks(v, r.keys, c, p)
    idx_v, kk_v = _operand_checks(v, r.values, c, p)
    v.need(np.array_equal(idx, idx_v), "keys and values must use the same windows")
    k = math.isqrt(kk)
    v.need(k * k == kk and k % 2 == 1, f"{kk} window positions is not an odd k x k window")
    full = (1, heads, hd, kk, p)
    v.need(v.shape(r.keys.out) == full and v.shape(r.values.out) == full, "keys and values must be [1, h, d, K, P]")
    key_bias = np.zeros((1, 1, 1, 1, 1), np.float32)
    if r.keys.const_op is not None:
        a = r.keys.const_op
        din, cb = v.split(a)
        v.need(cb.ndim <= 5 and np.broadcast_shapes(cb.shape, full) == full, "key bias shape")
        v.need(v.shape(a.output[0]) == full == v.shape(din), "the key bias must not broadcast the keys")
        key_bias = cb.astype(np.float32).reshape((1,) * (5 - cb.ndim) + cb.shape)
    masked = _logit_checks(v, r, heads, hd, kk, p)
    for pad in paddings:
        try:
            widx, valid, _, _ = window_index(h, w, k, 1, pad)
        except UsageError:
            continue
        if np.array_equal(idx, widx.reshape(-1).numpy()) and np.array_equal(masked, ~valid.numpy()):
            return _Core(c_in, h, w, heads, hd, k, pad, convs, key_bias, scale)
    v.need(False, f"the window indices and mask are not {' or '.join(paddings)}-padded {k}x{k} windows")
    raise AssertionError  # unreachable


def _t(a: np.ndarray | None) -> Tensor | None:
    return None if a is None else torch.from_numpy(np.array(a, dtype=np.float32))


def _build_sasa(v: _Values, r: AttentionRegion) -> OnnxSASA:
    core = _core(v, r, ("zeros",))
    v.need(core.scale is None, "a query scale without ACmix's convolution path")
    c = core.heads * core.hd
    v.need(c % 2 == 0, "SASA needs an even number of channels")
    has_bias = any(b is not None for _, b in core.convs)
    mod = OnnxSASA(core.c_in, c, core.k, core.heads, has_bias, _t(core.key_bias))
    with torch.no_grad():
        for layer, (w, b) in zip((mod.query, mod.key, mod.value), core.convs):
            layer.weight.copy_(_t(w))
            if has_bias:
                layer.bias.copy_(_t(b) if b is not None else torch.zeros(c))
    return mod


def _conv_path_checks(v: _Values, r: AttentionRegion, core: _Core) -> tuple[np.ndarray, np.ndarray, float, float]:
    """ACmix's tail: returns (fc weight [kk, 3h, 1, 1], shift weight [C, kk, kc, kc], rate1, rate2)."""
    path, heads, hd, p = r.conv_path, core.heads, core.hd, core.h * core.w
    c, out = heads * hd, (1, heads * hd, core.h, core.w)
    cat = path.concat
    v.need(int(node_attrs(cat).get("axis")) % 4 == 1, "the convolution path must stack q, k, v heads (axis 1)")
    v.need(all(v.shape(i) == (1, heads, hd, p) for i in cat.input), "q, k, v must be viewed as [1, h, d, HW]")
    v.need(v.shape(cat.output[0]) == (1, 3 * heads, hd, p), "the stacked q, k, v must be [1, 3h, d, HW]")
    fc_w, fc_b, _ = v.conv(path.fc, 3 * heads)
    kk = fc_w.shape[0]
    v.need(v.shape(path.fc.input[0]) == (1, 3 * heads, hd, p), "fc input shape")
    v.need(fc_b is None or not fc_b.any(), "fc must have no bias")
    v.need(int(node_attrs(path.fc).get("group", 1)) == 1, "fc must not be grouped")
    tr = path.transpose
    v.need(list(node_attrs(tr).get("perm", [])) == [0, 2, 1, 3], "the fc output must swap dims 1, 2")
    fc_out = (1, kk, hd, p)
    v.need(v.shape(path.fc.output[0]) == fc_out == v.shape(tr.input[0]), "fc output shape")
    v.need(v.shape(tr.output[0]) == (1, hd, kk, p), "transposed fc output shape")
    kc = math.isqrt(kk)
    v.need(kc * kc == kk and kc % 2 == 1, f"{kk} fc maps is not an odd kc x kc kernel")
    v.need(v.shape(path.shift_conv.input[0]) == (1, hd * kk, core.h, core.w), "shift conv input shape")
    sw, sb, sa = v.conv(path.shift_conv, hd * kk, kc)
    v.need(sw.shape == (c, kk, kc, kc) and int(sa.get("group", 1)) == hd, "shift conv must have head_dim groups")
    v.need(sb is None or not sb.any(), "the shift conv must have no bias")
    rates = []
    for m in (path.rate1, path.rate2):
        din, rate = v.split(m)
        v.need(rate.size == 1 and v.shape(din) == out == v.shape(m.output[0]), "the rates must be numbers")
        rates.append(float(rate.reshape(())))
    v.need(v.shape(r.att_out) == out and v.shape(path.add.output[0]) == out, "attention output shape")
    return fc_w, sw, rates[0], rates[1]


def _build_acmix(v: _Values, r: AttentionRegion) -> OnnxACmix:
    core = _core(v, r, ("reflect", "zeros"))
    want = np.float32(float(core.hd) ** -0.5)
    v.need(core.scale is not None and np.float32(core.scale) == want, f"the query scale must be head_dim^-1/2 = {want}")
    fc_w, shift_w, rate1, rate2 = _conv_path_checks(v, r, core)
    c = core.heads * core.hd
    kw = dict(kernel_att=core.k, head=core.heads, kernel_conv=math.isqrt(fc_w.shape[0]), padding=core.padding)
    mod = OnnxACmix(core.c_in, c, _t(core.key_bias), stride=1, **kw)
    with torch.no_grad():
        for layer, (w, b) in zip((mod.conv1, mod.conv2, mod.conv3), core.convs):
            layer.weight.copy_(_t(w))
            layer.bias.copy_(_t(b) if b is not None else torch.zeros(c))
        mod.fc.weight.copy_(_t(fc_w))
        mod.shift_weight.copy_(_t(shift_w))
        mod.rate1.fill_(rate1)
        mod.rate2.fill_(rate2)
    return mod


def fuse_region(state: ImportState, region: AttentionRegion) -> Val:
    """The Val of the block's exit: the rebuilt module applied to the block input, viewed as the exit's shape.

    Its output on the first example sample must match the reference evaluation of the block's ONNX nodes.
    """
    v = _Values(state, region)
    mod = _build_acmix(v, region) if region.conv_path is not None else _build_sasa(v, region)
    x = state.to_explicit(state.get(region.entry), region.softmax, "local attention")
    out = state.b.module(f"{region.kind.lower()}_{region.label}", mod, x)  # [B, C, H, W]
    ref = onnx_value(state.get(region.exit_name))
    got = out.ex[:1].reshape(ref.shape).double().numpy()
    diff = float(np.abs(got - ref).max())
    v.need(diff <= _CHECK_TOL * max(1.0, float(np.abs(ref).max())), f"the rebuilt layer differs by {diff:.3g}")
    return state.reshape(out, ref.shape, len(ref.shape) >= 2 and ref.shape[0] == 1)
