"""The bound operator of each supported torch module (one factory per module type; the registry,
:mod:`lingraft.bounds.registry`, says which factory serves which module types).

A factory takes the module, its qualified name (for messages) and its per-sample input and output shapes, and
returns the :class:`~lingraft.bounds.ops.base.BoundOp` that computes exactly what the module computes (None: the
module passes its input through), or raises :class:`UnsupportedCall` naming what it cannot model.
"""

from __future__ import annotations

import torch
from torch import nn

from lingraft.bounds.ops import ConvOp, ElementwiseAffineOp, LinearOp, MaxPoolOp, OpaqueOp, PadOp, ReLUOp, ReshapeOp
from lingraft.bounds.ops.base import BoundOp
from lingraft.models.layers import GraftedReLU, Normalize


class UnsupportedCall(Exception):
    """An operation the engine cannot bound; its message names it for the UnsupportedModelError."""


def pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def linear(m: nn.Linear, t, in_shape, out_shape) -> BoundOp:
    return LinearOp(m.weight, m.bias)


def conv(m: nn.Conv2d, t, in_shape, out_shape) -> BoundOp:
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


def relu(m: nn.ReLU, t, in_shape, out_shape) -> BoundOp:
    return ReLUOp(out_shape)


def grafted_relu(m: GraftedReLU, t, in_shape, out_shape) -> BoundOp:
    if not bool(((m.mask == 0) | (m.mask == 1)).all()):
        raise UnsupportedCall(
            f"GraftedReLU ('{t}') whose mask is not 0/1 (a damaged or hand-edited checkpoint: re-run lingraft graft)"
        )
    return ReLUOp(out_shape, m.mask.reshape(out_shape) > 0.5, m.a.reshape(out_shape), m.b.reshape(out_shape))


def normalize(m: Normalize, t, in_shape, out_shape) -> BoundOp:
    C = in_shape[0] if len(in_shape) >= 1 else 1
    mean, std = m.mean, m.std
    if mean.numel() > 1:
        shp = (C,) + (1,) * (len(in_shape) - 1)
        mean, std = mean.reshape(shp), std.reshape(shp)
    return ElementwiseAffineOp(1.0 / std, -mean / std, out_shape)


def batch_norm(m: nn.BatchNorm1d | nn.BatchNorm2d, t, in_shape, out_shape) -> BoundOp:
    if m.training or m.running_mean is None or m.running_var is None:
        raise UnsupportedCall("BatchNorm in training mode or without running statistics")
    inv = 1.0 / torch.sqrt(m.running_var + m.eps)
    w = m.weight if m.weight is not None else torch.ones_like(inv)
    b = m.bias if m.bias is not None else torch.zeros_like(inv)
    scale, shift = w * inv, b - m.running_mean * w * inv
    shp = (in_shape[0],) + (1,) * (len(in_shape) - 1)
    return ElementwiseAffineOp(scale.reshape(shp), shift.reshape(shp), out_shape)


def pool_problem(
    kind: str,
    padding,
    dilation=(1, 1),
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    divisor_override=None,
    return_indices: bool = False,
) -> str | None:
    """Why the 2-D pooling ``kind`` ("MaxPool2d" or "AvgPool2d") with these settings cannot be bounded, or None.

    The one check of both sides: the module factories below and the ONNX importer's analysis (MaxPool /
    AveragePool attributes, through the registry). padding: (pad_h, pad_w), symmetric.
    """
    if tuple(pair(dilation)) != (1, 1):
        return f"dilation={tuple(pair(dilation))}"
    if kind == "MaxPool2d":  # padding (-inf) and ceil_mode are modelled by MaxPoolOp
        return "return_indices=True" if return_indices else None
    if ceil_mode:
        return "ceil_mode=True"
    if divisor_override:
        return f"divisor_override={divisor_override}"
    if tuple(pair(padding)) != (0, 0) and not count_include_pad:
        return "padding without count_include_pad (the divisor would vary at the border)"
    return None


def avg_pool(m: nn.AvgPool2d, t, in_shape, out_shape) -> BoundOp:
    k = pair(m.kernel_size)
    s = pair(m.stride if m.stride is not None else m.kernel_size)
    p = pair(m.padding)
    why = pool_problem("AvgPool2d", p, (1, 1), m.ceil_mode, m.count_include_pad, m.divisor_override)
    if why:
        raise UnsupportedCall(f"AvgPool2d ('{t}') with {why}")
    C = in_shape[0]
    mean_kernel = torch.full((C, 1) + k, 1.0 / (k[0] * k[1]))
    return ConvOp(mean_kernel, None, s, p, C, in_shape, out_shape)


def max_pool(m: nn.MaxPool2d, t, in_shape, out_shape) -> BoundOp:
    k, s, p = pair(m.kernel_size), pair(m.stride if m.stride is not None else m.kernel_size), pair(m.padding)
    why = pool_problem("MaxPool2d", p, m.dilation, m.ceil_mode, return_indices=m.return_indices)
    if why:
        raise UnsupportedCall(f"MaxPool2d ('{t}') with {why}")
    return MaxPoolOp(k, s, in_shape, out_shape, padding=p, ceil_mode=m.ceil_mode)


def flatten(m: nn.Flatten, t, in_shape, out_shape) -> BoundOp | None:
    return None if in_shape == out_shape else ReshapeOp(in_shape, out_shape)


def pad(m: nn.ZeroPad2d | nn.ConstantPad2d, t, in_shape, out_shape) -> BoundOp:
    return PadOp(m.padding, getattr(m, "value", 0.0), in_shape)


def identity(m: nn.Module, t, in_shape, out_shape) -> None:
    """nn.Identity, nn.Dropout (eval): the value passes through."""
    return None


def opaque(m: nn.Module, t, in_shape, out_shape) -> BoundOp:
    """A module with ``interval_bounds(lower, upper)``: bounded by that method only."""
    return OpaqueOp(m)
