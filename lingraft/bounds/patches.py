"""Patch-mode backward pass for intermediate bounds of convolutional layers.

The intermediate bound of a conv neuron depends only on a small window of the input. Starting from the
neuron's kernel, the backward pass keeps, per bound row, a dense patch [C, kh, kw] plus its top-left position
in the current node's coordinates, instead of a full [C, H, W] coefficient map. Conv layers grow the patch
((kh - 1) * stride + k), ReLU / elementwise layers multiply it by values gathered at the patch positions,
zero padding shifts it. Positions outside a node's extent hold zero coefficients (they stand for zero padding).

Used for chains input -> (patchable op)* -> op that starts patches (the operators declare it: ``starts_patches``,
``patchable``, ``ends_patches`` in :mod:`lingraft.bounds.ops.base`; today Conv starts, Conv / ReLU / elementwise
affine / zero Pad are patchable); the engine falls back to the dense pass for anything else. A chain may also
start at an op that ends patches, a Reshape into an image plane (e.g. Linear -> Reshape -> Conv...): there the
patches are written out as dense coefficients and the engine's dense pass finishes the job below the Reshape.
Results equal the dense pass up to float rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lingraft.bounds.input_set import InputSet


class PatchPass:
    """The state of one patch-mode backward pass, which each patchable op's ``patch_backward`` updates.

    lP, uP [B', R, C, kh, kw]: lower- and upper-bound coefficients of the current node's value, one patch per
    row, at top-left y0, x0 [R] in its plane; lb, ub [B', R]: the biases so far (B' = 1 in pair mode or while
    the patches are shared by the batch). b_idx [R] (pair mode: row r belongs to sample b_idx[r]) or None;
    alpha: patch-form ReLU slopes {node: {"l": ..., "u": ...}} or None; batch: B of the bounds.
    """

    def __init__(self, nodes, bounds, lP, uP, lb, ub, y0, x0, b_idx, alpha, batch: int):
        self.nodes, self.bounds, self.b_idx, self.alpha, self.batch = nodes, bounds, b_idx, alpha, batch
        self.lP, self.uP, self.lb, self.ub, self.y0, self.x0 = lP, uP, lb, ub, y0, x0

    def gather(self, values: Tensor) -> Tensor:
        """values [B or 1, C, H, W] at the patch positions: [B or 1, R, C, kh, kw] (see :func:`gather`)."""
        kh, kw = self.lP.shape[-2:]
        return gather(values, self.y0, self.x0, kh, kw, self.b_idx)


def chain_to_input(nodes, start: int):
    """Node indices from ``start``'s input down to the input node if the path qualifies, else None. The chain
    may end at a Reshape into a [C, H, W] plane (last index; the dense pass continues below it)."""
    if not nodes[start].bound_op.starts_patches:
        return None
    chain: list[int] = []
    k = nodes[start].inputs[0]
    while k != 0:
        nd = nodes[k]
        op = nd.bound_op
        if len(nd.inputs) != 1 or len(nd.shape) != 3:
            return None
        if op.ends_patches:
            return chain + [k]
        if not op.patchable:
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


def backward_patches(
    nodes,
    start: int,
    chain,
    rows: Tensor,
    inp: InputSet,
    bounds,
    b_idx: Tensor | None = None,
    alpha: dict | None = None,
    tail=None,
):
    """Lower and upper bounds [B, R] of the rows of node ``start`` by the patch-mode backward pass.

    inp: the input set (B samples) the bounds hold over. Pair mode (``b_idx`` [R]): row r is bounded for sample
    b_idx[r] only; returns [1, R].
    alpha: optional lower ReLU slopes per row, in patch form: {ReLU node: {"l": [B, R, C, kh, kw], "u": ...}}
    used on unstable neurons ("l" in the lower-bound pass, "u" in the upper one). A ReLU missing from the dict
    gets CROWN's slopes as new leaves that require grad (alpha-CROWN's warm start).
    tail: for a chain ending at a Reshape node k, callable(k, lA, uA) with dense coefficients [B', R, C, H, W] on
    node k's value -> (lower, upper) [B', R] of what lies below (the engine's dense pass, concretized).
    """
    B = inp.batch if b_idx is None else 1
    # the start op's kernels [1, R, C, kh, kw], shared by the batch until a ReLU multiplies them
    vals, y0, x0, bias = nodes[start].bound_op.patch_start(rows)
    lb = bias.expand(B, -1).clone()
    pp = PatchPass(nodes, bounds, vals, vals, lb, lb.clone(), y0, x0, b_idx, alpha, inp.batch)
    for k in chain:
        nd = nodes[k]
        C, H, W = nd.shape
        kh, kw = pp.lP.shape[-2:]
        mask = valid_mask(pp.y0, pp.x0, kh, kw, H, W, pp.lP.device)
        pp.lP, pp.uP = pp.lP * mask, pp.uP * mask
        if nd.bound_op.ends_patches:
            if tail is None:
                raise RuntimeError("a patch chain ending at a Reshape needs the dense tail pass")
            l_t, u_t = tail(k, to_dense(pp.lP, pp.y0, pp.x0, H, W), to_dense(pp.uP, pp.y0, pp.x0, H, W))
            return pp.lb + l_t, pp.ub + u_t
        nd.bound_op.patch_backward(pp, k)
    lP, uP, lb, ub, y0, x0 = pp.lP, pp.uP, pp.lb, pp.ub, pp.y0, pp.x0
    # concretize over the input set
    C, H, W = nodes[0].shape
    kh, kw = lP.shape[-2:]
    mask = valid_mask(y0, x0, kh, kw, H, W, lP.device)
    lower, upper = inp.concretize_windows(lP * mask, uP * mask, lambda t: gather(t, y0, x0, kh, kw, b_idx))
    return lb + lower, ub + upper
