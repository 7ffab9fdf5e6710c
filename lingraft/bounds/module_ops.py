"""The bound operator of each supported torch module (one factory per module type).

A factory takes the module, its qualified name (for messages) and its per-sample input and output shapes, and
returns the :class:`~lingraft.bounds.ops.base.BoundOp` that computes exactly what the module computes, or raises
:class:`UnsupportedCall` naming what it cannot model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lingraft.bounds.ops import ConvOp, ElementwiseAffineOp, LinearOp, MaxPoolOp, OpaqueOp, PadOp, ReLUOp, ReshapeOp
from lingraft.bounds.ops.base import BoundOp
from lingraft.models.layers import GraftedReLU, Normalize


class UnsupportedCall(Exception):
    """An operation the engine cannot bound; its message names it for the UnsupportedModelError."""


def pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _linear(m: nn.Linear, t, in_shape, out_shape) -> BoundOp:
    return LinearOp(m.weight, m.bias)


def _conv(m: nn.Conv2d, t, in_shape, out_shape) -> BoundOp:
    if m.padding_mode != "zeros":
        raise UnsupportedCall(f"Conv2d ('{t}') with padding_mode={m.padding_mode!r}")
    if tuple(m.dilation) != (1, 1):
        raise UnsupportedCall(f"Conv2d ('{t}') with dilation={tuple(m.dilation)}")
    if m.padding == "same":
        if any(k % 2 == 0 for k in m.kernel_size):
            raise UnsupportedCall(f"Conv2d ('{t}') with padding='same' and an even kernel")
        pad = tuple((k - 1) // 2 for k in m.kernel_size)
    elif m.padding == "valid":
        pad = (0, 0)
    elif isinstance(m.padding, str):  # torch itself accepts no other string
        raise UnsupportedCall(f"Conv2d ('{t}') with padding={m.padding!r}")
    else:
        pad = tuple(m.padding)
    return ConvOp(m.weight, m.bias, m.stride, pad, m.groups, in_shape, out_shape)


def _relu(m: nn.ReLU, t, in_shape, out_shape) -> BoundOp:
    return ReLUOp(out_shape)


def _grafted_relu(m: GraftedReLU, t, in_shape, out_shape) -> BoundOp:
    if not bool(((m.mask == 0) | (m.mask == 1)).all()):
        raise UnsupportedCall(
            f"GraftedReLU ('{t}') whose mask is not 0/1 (a damaged or hand-edited checkpoint: re-run lingraft graft)"
        )
    return ReLUOp(out_shape, m.mask.reshape(out_shape) > 0.5, m.a.reshape(out_shape), m.b.reshape(out_shape))


def _normalize(m: Normalize, t, in_shape, out_shape) -> BoundOp:
    C = in_shape[0] if len(in_shape) >= 1 else 1
    mean, std = m.mean, m.std
    if mean.numel() > 1:
        shp = (C,) + (1,) * (len(in_shape) - 1)
        mean, std = mean.reshape(shp), std.reshape(shp)
    return ElementwiseAffineOp(1.0 / std, -mean / std, out_shape)


def _batch_norm(m: nn.BatchNorm1d | nn.BatchNorm2d, t, in_shape, out_shape) -> BoundOp:
    if m.training or m.running_mean is None or m.running_var is None:
        raise UnsupportedCall("BatchNorm in training mode or without running statistics")
    inv = 1.0 / torch.sqrt(m.running_var + m.eps)
    w = m.weight if m.weight is not None else torch.ones_like(inv)
    b = m.bias if m.bias is not None else torch.zeros_like(inv)
    scale, shift = w * inv, b - m.running_mean * w * inv
    shp = (in_shape[0],) + (1,) * (len(in_shape) - 1)
    return ElementwiseAffineOp(scale.reshape(shp), shift.reshape(shp), out_shape)


def _avg_pool(m: nn.AvgPool2d, t, in_shape, out_shape) -> BoundOp:
    k = pair(m.kernel_size)
    s = pair(m.stride if m.stride is not None else m.kernel_size)
    p = pair(m.padding)
    if m.ceil_mode or (p != (0, 0) and not m.count_include_pad) or m.divisor_override:
        raise UnsupportedCall("AvgPool2d with ceil_mode, divisor_override or count_include_pad=False")
    C = in_shape[0]
    mean_kernel = torch.full((C, 1) + k, 1.0 / (k[0] * k[1]))
    return ConvOp(mean_kernel, None, s, p, C, in_shape, out_shape)


def _max_pool(m: nn.MaxPool2d, t, in_shape, out_shape) -> BoundOp:
    k, s, p = pair(m.kernel_size), pair(m.stride if m.stride is not None else m.kernel_size), pair(m.padding)
    if p != (0, 0) or pair(m.dilation) != (1, 1) or m.ceil_mode or m.return_indices:
        raise UnsupportedCall(f"MaxPool2d ('{t}') with padding, dilation, ceil_mode or return_indices")
    return MaxPoolOp(k, s, in_shape, out_shape)


def _flatten(m: nn.Flatten, t, in_shape, out_shape) -> BoundOp:
    return ReshapeOp(in_shape, out_shape)


def _pad(m: nn.ZeroPad2d | nn.ConstantPad2d, t, in_shape, out_shape) -> BoundOp:
    return PadOp(m.padding, getattr(m, "value", 0.0), in_shape)


#: module type(s) -> factory, tried in order
MODULE_OPS: tuple[tuple[type | tuple[type, ...], Callable[..., BoundOp]], ...] = (
    (nn.Linear, _linear),
    (nn.Conv2d, _conv),
    (nn.ReLU, _relu),
    (GraftedReLU, _grafted_relu),
    (Normalize, _normalize),
    ((nn.BatchNorm1d, nn.BatchNorm2d), _batch_norm),
    (nn.AvgPool2d, _avg_pool),
    (nn.MaxPool2d, _max_pool),
    (nn.Flatten, _flatten),
    ((nn.ZeroPad2d, nn.ConstantPad2d), _pad),
)


def module_op(m: nn.Module, name: str, in_shape: tuple, out_shape: tuple) -> BoundOp:
    """The operator computing module ``m`` (qualified name ``name``) on [B, *in_shape] -> [B, *out_shape]."""
    for types, factory in MODULE_OPS:
        if isinstance(m, types):
            return factory(m, name, in_shape, out_shape)
    if hasattr(m, "interval_bounds"):
        return OpaqueOp(m)
    raise UnsupportedCall(f"module {type(m).__name__} ('{name}')")
