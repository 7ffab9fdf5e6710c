"""Patch-mode backward pass for intermediate bounds of convolutional layers.

The intermediate bound of a conv neuron depends only on a small window of the input. Starting from the
neuron's kernel, the backward pass keeps, per bound row, a dense patch [C, kh, kw] plus its top-left position
in the current node's coordinates, instead of a full [C, H, W] coefficient map. Conv layers grow the patch
((kh - 1) * stride + k), ReLU / elementwise layers multiply it by values gathered at the patch positions,
zero padding shifts it. Positions outside a node's extent hold zero coefficients (they stand for zero padding).

Used for chains input -> (Conv | ReLU | elementwise affine | zero Pad)* -> Conv; the engine falls back to the
dense pass for anything else. A chain may also start at a Reshape into an image plane (e.g. Linear -> Reshape
-> Conv...): there the patches are written out as dense coefficients and the engine's dense pass finishes the
job below the Reshape. Results equal the dense pass up to float rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lingraft.bounds.ops import ConvOp, ElementwiseAffineOp, PadOp, ReLUOp, ReshapeOp
from lingraft.bounds.ops.linear import conv_backward


class Patches:
    """Coefficients of R bound rows: values [B, R, C, kh, kw] at top-left (y0 [R], x0 [R]) in a node's plane."""

    def __init__(self, values: Tensor, y0: Tensor, x0: Tensor):
        self.values, self.y0, self.x0 = values, y0, x0

    @property
    def kh(self):
        return self.values.shape[-2]

    @property
    def kw(self):
        return self.values.shape[-1]


def chain_to_input(nodes, start: int):
    """Node indices from ``start``'s input down to the input node if the path qualifies, else None. The chain
    may end at a Reshape into a [C, H, W] plane (last index; the dense pass continues below it)."""
    if not isinstance(nodes[start].op, ConvOp) or nodes[start].op.groups != 1:
        return None
    chain: list[int] = []
    k = nodes[start].inputs[0]
    while k != 0:
        nd = nodes[k]
        op = nd.op
        if len(nd.inputs) != 1 or len(nd.shape) != 3:
            return None
        if isinstance(op, ReshapeOp):
            return chain + [k]
        if isinstance(op, PadOp):
            if op.value != 0.0 or len(op.pads) != 4 or any(p < 0 for p in op.pads):
                return None
        elif not isinstance(op, (ConvOp, ReLUOp, ElementwiseAffineOp)):
            return None
        chain.append(k)
        k = nd.inputs[0]
    if len(nodes[0].shape) != 3:
        return None
    return chain


def _window_positions(y0: Tensor, x0: Tensor, kh: int, kw: int, H: int, W: int):
    """Where the windows at top-left (y0, x0) [R] lie in the H x W plane padded by (my, mx) on each side so that
    every window fits. -> (my, mx, Wp, flat [R, kh * kw] positions into the flattened padded plane)."""
    my = int(max(0, -int(y0.min()), int(y0.max()) + kh - H))
    mx = int(max(0, -int(x0.min()), int(x0.max()) + kw - W))
    Wp = W + 2 * mx
    dy = torch.arange(kh, device=y0.device)
    dx = torch.arange(kw, device=y0.device)
    rows = (y0 + my).view(-1, 1, 1) + dy.view(1, -1, 1)
    cols = (x0 + mx).view(-1, 1, 1) + dx.view(1, 1, -1)
    return my, mx, Wp, (rows * Wp + cols).reshape(y0.numel(), kh * kw)


def gather(values: Tensor, y0: Tensor, x0: Tensor, kh: int, kw: int, b_idx: Tensor | None = None) -> Tensor:
    """values [B, C, H, W] -> [B, R, C, kh, kw]: the window at each (y0, x0), zeros outside the plane.

    With ``b_idx`` [R] (pair mode: row r belongs to sample b_idx[r]) the result is [1, R, C, kh, kw].
    """
    B, C, H, W = values.shape
    my, mx, Wp, flat = _window_positions(y0, x0, kh, kw, H, W)
    v = F.pad(values, (mx, mx, my, my)).reshape(B, C, -1)
    R = y0.numel()
    if b_idx is not None:
        bi = b_idx if B > 1 else torch.zeros_like(b_idx)
        out = v.permute(0, 2, 1)[bi.unsqueeze(1), flat]  # [R, kh*kw, C]
        return out.permute(0, 2, 1).reshape(1, R, C, kh, kw)
    out = v[:, :, flat.reshape(-1)]  # [B, C, R*kh*kw]
    return out.reshape(B, C, R, kh, kw).permute(0, 2, 1, 3, 4)


def to_dense(P: Tensor, y0: Tensor, x0: Tensor, H: int, W: int) -> Tensor:
    """Patches P [B, R, C, kh, kw] at top-left (y0, x0) [R] -> dense coefficients [B, R, C, H, W] (the parts
    outside the plane, zero after :func:`valid_mask`, are dropped). Differentiable in P."""
    Bp, R, C, kh, kw = P.shape
    my, mx, Wp, flat = _window_positions(y0, x0, kh, kw, H, W)
    Hp = H + 2 * my
    idx = flat.reshape(1, R, 1, kh * kw).expand(Bp, R, C, kh * kw)
    out = torch.zeros(Bp, R, C, Hp * Wp, dtype=P.dtype, device=P.device)
    out = out.scatter_add(3, idx, P.reshape(Bp, R, C, kh * kw))
    return out.reshape(Bp, R, C, Hp, Wp)[..., my : my + H, mx : mx + W]


def valid_mask(y0, x0, kh, kw, H, W, device):
    """[R, 1, kh, kw] 1 where the patch position lies inside the H x W plane."""
    dy = torch.arange(kh, device=device)
    dx = torch.arange(kw, device=device)
    ry = y0.view(-1, 1) + dy.view(1, -1)
    rx = x0.view(-1, 1) + dx.view(1, -1)
    vy = (ry >= 0) & (ry < H)
    vx = (rx >= 0) & (rx < W)
    return (vy.unsqueeze(2) & vx.unsqueeze(1)).unsqueeze(1).float()


def start_patches(op: ConvOp, rows: Tensor, batch: int) -> tuple[Patches, Tensor]:
    """Kernel patches of the selected output neurons of ``op`` (flat indices), at its input. Bias [1, R]."""
    C_out, H_out, W_out = op.out_shape
    c = rows // (H_out * W_out)
    i = (rows // W_out) % H_out
    j = rows % W_out
    vals = op.weight[c].unsqueeze(0)  # [1, R, C_in, k, k] (shared by the batch until a ReLU multiplies)
    y0 = i * op.stride[0] - op.padding[0]
    x0 = j * op.stride[1] - op.padding[1]
    bias = torch.zeros(1, rows.numel(), device=vals.device) if op.bias is None else op.bias[c].unsqueeze(0)
    return Patches(vals, y0, x0), bias


def _sum(P: Tensor) -> Tensor:
    return P.flatten(2).sum(-1)


def backward_patches(
    nodes,
    start: int,
    chain,
    rows: Tensor,
    x_L: Tensor,
    x_U: Tensor,
    bounds,
    l2=None,
    b_idx: Tensor | None = None,
    alpha: dict | None = None,
    tail=None,
):
    """Lower and upper bounds [B, R] of the rows of node ``start`` by the patch-mode backward pass.

    Pair mode (``b_idx`` [R]): row r is bounded for sample b_idx[r] only; returns [1, R].
    alpha: optional lower ReLU slopes per row, in patch form: {ReLU node: {"l": [B, R, C, kh, kw], "u": ...}}
    used on unstable neurons ("l" in the lower-bound pass, "u" in the upper one). A ReLU missing from the dict
    gets CROWN's slopes as new leaves that require grad (alpha-CROWN's warm start).
    tail: for a chain ending at a Reshape node k, callable(k, lA, uA) with dense coefficients [B', R, C, H, W] on
    node k's value -> (lower, upper) [B', R] of what lies below (the engine's dense pass, concretized).
    """
    B = x_L.shape[0] if b_idx is None else 1
    Bfull = x_L.shape[0]
    P, bias = start_patches(nodes[start].op, rows, B)
    lP, uP = P.values, P.values
    y0, x0 = P.y0, P.x0
    lb = bias.expand(B, -1).clone()
    ub = lb.clone()
    for k in chain:
        nd = nodes[k]
        op = nd.op
        C, H, W = nd.shape
        kh, kw = lP.shape[-2:]
        mask = valid_mask(y0, x0, kh, kw, H, W, lP.device)
        lP, uP = lP * mask, uP * mask
        if isinstance(op, ReshapeOp):
            if tail is None:
                raise RuntimeError("a patch chain ending at a Reshape needs the dense tail pass")
            l_t, u_t = tail(k, to_dense(lP, y0, x0, H, W), to_dense(uP, y0, x0, H, W))
            return lb + l_t, ub + u_t
        if isinstance(op, ReLUOp):
            pre = bounds[nd.inputs[0]]
            if pre is None or pre[0] is None:  # fully grafted layer: exact linear
                zeros = torch.zeros(Bfull, *op.shape, device=lP.device)
                pre = (zeros, zeros)
            u_slope, u_int, l_slope, unstable = op.relaxation(*pre)
            graft = op.graft
            if graft is not None:
                m = graft[0].unsqueeze(0).float()
                l_slope = l_slope * (1 - m) + graft[1].unsqueeze(0) * m
                u_slope = u_slope * (1 - m) + graft[1].unsqueeze(0) * m
            g_ls = gather(l_slope, y0, x0, kh, kw, b_idx)
            g_us = gather(u_slope, y0, x0, kh, kw, b_idx)
            g_ui = gather(u_int, y0, x0, kh, kw, b_idx)
            lPn = lP.clamp(max=0)
            uPp = uP.clamp(min=0)
            lb = lb + _sum(lPn * g_ui)
            ub = ub + _sum(uPp * g_ui)
            if graft is not None:
                g_b = gather(graft[2].unsqueeze(0), y0, x0, kh, kw, b_idx)
                lb = lb + _sum(lP * g_b)
                ub = ub + _sum(uP * g_b)
            if alpha is None:
                lP, uP = lP * g_ls + lPn * (g_us - g_ls), uP * g_ls + uPp * (g_us - g_ls)
            else:
                unst = gather(unstable.to(lP.dtype), y0, x0, kh, kw, b_idx) > 0
                if k not in alpha:
                    init = g_ls.expand(*(max(a, b) for a, b in zip(lP.shape, g_ls.shape))).detach()
                    alpha[k] = {s: init.clone().requires_grad_(True) for s in ("l", "u")}
                ls_l = torch.where(unst, alpha[k]["l"], g_ls)
                ls_u = torch.where(unst, alpha[k]["u"], g_ls)
                lP, uP = lP * ls_l + lPn * (g_us - ls_l), uP * ls_u + uPp * (g_us - ls_u)
        elif isinstance(op, ElementwiseAffineOp):
            sc = gather(op.scale.unsqueeze(0), y0, x0, kh, kw, b_idx)
            sh = gather(op.shift.unsqueeze(0), y0, x0, kh, kw, b_idx)
            lb = lb + _sum(lP * sh)
            ub = ub + _sum(uP * sh)
            lP, uP = lP * sc, uP * sc
        elif isinstance(op, PadOp):
            left, _, top, _ = op.pads
            y0, x0 = y0 - top, x0 - left
        elif isinstance(op, ConvOp):
            if op.bias is not None:
                lb = lb + (lP.sum((-1, -2)) * op.bias).sum(-1)
                ub = ub + (uP.sum((-1, -2)) * op.bias).sum(-1)
            lP = _conv_back(lP, op)
            uP = _conv_back(uP, op) if uP is not lP else lP
            y0 = y0 * op.stride[0] - op.padding[0]
            x0 = x0 * op.stride[1] - op.padding[1]
    # concretize over the input box
    C, H, W = nodes[0].shape
    kh, kw = lP.shape[-2:]
    mask = valid_mask(y0, x0, kh, kw, H, W, lP.device)
    lP, uP = lP * mask, uP * mask
    c = gather((x_U + x_L) / 2, y0, x0, kh, kw, b_idx)
    r = gather((x_U - x_L) / 2, y0, x0, kh, kw, b_idx)
    lower = lb + _sum(lP * c) - _sum(lP.abs() * r)
    upper = ub + _sum(uP * c) + _sum(uP.abs() * r)
    if l2 is not None:
        x0c, eps = l2
        xc = gather(x0c, y0, x0, kh, kw, b_idx)
        lower = torch.maximum(lower, lb + _sum(lP * xc) - eps * lP.flatten(2).norm(dim=-1))
        upper = torch.minimum(upper, ub + _sum(uP * xc) + eps * uP.flatten(2).norm(dim=-1))
    return lower, upper


def _conv_back(P: Tensor, op: ConvOp) -> Tensor:
    """[B, R, C_out, kh, kw] -> [B, R, C_in, (kh-1)*s + k, (kw-1)*s + k]."""
    Bp, R, _, kh, kw = P.shape
    k = op.weight.shape[2:]
    out_hw = ((kh - 1) * op.stride[0] + k[0], (kw - 1) * op.stride[1] + k[1])
    out = conv_backward(P.reshape(Bp * R, *P.shape[2:]), op.weight, op.stride, (0, 0), op.groups, out_hw)
    return out.reshape(Bp, R, *out.shape[1:])
