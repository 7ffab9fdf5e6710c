"""Forward-mode linear bound propagation (symbolic intervals) for networks with few inputs.

Every node z gets a lower and an upper linear function of the flat input x (n = prod(in_shape) inputs):

    L(x) = A_L x + c_L  <=  z(x)  <=  A_U x + c_U = U(x)      for all x in the box [x_L, x_U].

They are stored in centre/radius form with the constant as an extra coefficient row, so that an affine op needs
one pass over the centre and one over the radius (``W+ L + W- U = W mid - |W| rad``):

    mid = (L + U) / 2,  rad = (U - L) / 2,  both [B, n + 1, *shape]; rows 0..n-1 are the coefficients of
    x_0..x_{n-1}, row n the constant; rad None means L = U (the node is one exact affine map of x).

Affine ops (Linear, Conv, elementwise affine, reshape, permute, pad, concat, add) map both exactly. A ReLU uses
the triangle relaxation with the node's concrete bounds l, u (the forward bounds concretized over the box,
intersected with interval bounds propagated from the tightest bounds of the inputs; both are sound): unstable
neurons get U' = u/(u-l) (U - l) and L' = alpha L with CROWN's adaptive alpha = [u > -l] (alpha >= 0, so applying
it to L is sound), stable ones the identity or 0, and grafted neurons (x -> a x + b) the exact affine map.
Max pooling uses the engine's relaxation (lower: the input of largest lower bound; upper: that input where its
lower bound dominates the window, else the constant window maximum); an opaque op cuts to its interval.

The cost is that of evaluating the network on about 2 (n + 1) inputs, independent of the number of unstable
neurons, so for small n (e.g. the 16 bias-field coefficients of VNN-COMP's cifar_biasfield) it is far cheaper
than the backward CROWN pass per unstable neuron. But the bounds are looser than backward CROWN's on deep nets
(each layer mixes lower and upper functions by the signs of its weights, so their gap grows like IBP's): on
cifar_bias_field_0 they match CROWN for the first two ReLU layers and blow up after the fourth. There
:func:`forward_crown_bounds` helps instead: forward mode settles most neurons that IBP leaves unstable in the
early layers and backward CROWN is run only on the rest (same final bounds, about 30% fewer CROWN seconds).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lingraft.bounds.engine import BoundedNetwork
from lingraft.bounds.input_set import InputSet
from lingraft.bounds.ops import (
    AddOp,
    CatOp,
    ConvOp,
    ElementwiseAffineOp,
    LinearOp,
    MaxPoolOp,
    OpaqueOp,
    PadOp,
    PermuteOp,
    ReLUOp,
    ReshapeOp,
)
from lingraft.bounds.ops.base import BoundOp

Bounds = tuple[Tensor, Tensor]


@dataclass
class LinearBounds:
    """Linear bounds of one node in centre/radius form.

    mid: [B, n + 1, *shape] ((A_L + A_U) / 2 on rows 0..n-1, (c_L + c_U) / 2 on row n);
    rad: [B, n + 1, *shape] ((A_U - A_L) / 2 and (c_U - c_L) / 2) or None (lower = upper).
    """

    mid: Tensor
    rad: Tensor | None

    def lower(self) -> Tensor:
        """[B, n + 1, *shape]: A_L and c_L."""
        return self.mid if self.rad is None else self.mid - self.rad

    def upper(self) -> Tensor:
        """[B, n + 1, *shape]: A_U and c_U."""
        return self.mid if self.rad is None else self.mid + self.rad

    @staticmethod
    def from_sides(low: Tensor, up: Tensor) -> LinearBounds:
        """From A_L/c_L and A_U/c_U, both [B, n + 1, *shape]."""
        return LinearBounds((low + up) / 2, (up - low) / 2)

    def map(self, f: Callable[[Tensor], Tensor]) -> LinearBounds:
        """Apply a shape-only map f ([B, n + 1, *shape] -> [B, n + 1, *shape']) to both tensors."""
        return LinearBounds(f(self.mid), None if self.rad is None else f(self.rad))


# ---------------------------------------------------------------------------------------------------------------
# which networks


def _maxpool_ok(op: MaxPoolOp) -> bool:
    return op.p == (0, 0) and not op.ceil_mode


#: op type -> predicate on the op (exact types: a subclass may behave differently)
_SUPPORTED: dict[type, Callable[[BoundOp], bool]] = {
    LinearOp: lambda op: True,
    ConvOp: lambda op: True,
    ReLUOp: lambda op: True,
    ReshapeOp: lambda op: True,
    PermuteOp: lambda op: True,
    PadOp: lambda op: True,
    CatOp: lambda op: True,
    ElementwiseAffineOp: lambda op: True,
    AddOp: lambda op: True,
    OpaqueOp: lambda op: True,
    MaxPoolOp: _maxpool_ok,  # type: ignore[dict-item]
}


def supports_forward(net: BoundedNetwork) -> bool:
    """True when forward mode handles every op of ``net`` (whether the input is small enough is the caller's call;
    see :func:`forward_memory_bytes`)."""
    for nd in net.nodes[1:]:
        ok = _SUPPORTED.get(type(nd.op))
        if ok is None or not ok(nd.bound_op):
            return False
    return True


def num_inputs(net: BoundedNetwork) -> int:
    """n, the number of input coefficients per linear bound (prod(in_shape))."""
    return int(math.prod(net.in_shape))


def forward_memory_bytes(net: BoundedNetwork, batch: int = 1) -> int:
    """Estimated peak bytes of the float32 coefficient tensors of :func:`forward_intermediate_bounds` for ``batch``
    boxes: the live nodes' mid and rad ([B, n + 1, *shape] each) plus a ReLU's temporaries (4 more of its size)."""
    per = 4 * batch * (num_inputs(net) + 1)
    remaining = _use_counts(net)
    live: dict[int, int] = {}
    peak = 0
    for i, nd in enumerate(net.nodes):
        size = per * int(math.prod(nd.shape))
        live[i] = 2 * size
        peak = max(peak, sum(live.values()) + (4 * size if nd.op is not None and nd.op.splittable else 0))
        for j in nd.inputs:
            remaining[j] -= 1
            if remaining[j] <= 0:
                live.pop(j, None)
    return peak


def _use_counts(net: BoundedNetwork) -> list[int]:
    """Per node, how many input slots of later nodes read it."""
    counts = [0] * len(net.nodes)
    for nd in net.nodes:
        for j in nd.inputs:
            counts[j] += 1
    return counts


def engine_bound_nodes(net: BoundedNetwork) -> list[int]:
    """Node indices whose bounds :meth:`BoundedNetwork.intermediate_bounds` fills (see
    :meth:`BoundedNetwork.bounded_nodes`)."""
    return net.bounded_nodes()


# ---------------------------------------------------------------------------------------------------------------
# the pass


def forward_intermediate_bounds(
    net: BoundedNetwork,
    x_L: Tensor,
    x_U: Tensor,
    interm_bounds: dict | None = None,
    all_nodes: bool = False,
) -> list:
    """Forward-mode bounds, in the structure of :meth:`BoundedNetwork.intermediate_bounds`.

    x_L, x_U: [B, *in_shape]. Returns a list indexed by node of (lower, upper) [B, *shape] or None: filled for the
    nodes :func:`engine_bound_nodes` names (every node with ``all_nodes``); index 0 is the box. Each node's bounds
    are its concretized linear bounds intersected with interval bounds propagated from its inputs' bounds (so
    never looser than ``net.ibp_all``). interm_bounds {node: (lower, upper)} tightens given nodes (split neurons),
    as in the engine. Plug the result into ``net.backward_bound(C_out, x_L, x_U, bounds)``.
    """
    if not supports_forward(net):
        names = sorted({type(nd.op).__name__ for nd in net.nodes[1:] if type(nd.op) not in _SUPPORTED})
        raise ValueError(f"forward mode does not support this network (ops: {', '.join(names) or 'MaxPool padding'})")
    x_L = x_L.to(net.device, torch.float32)
    x_U = x_U.to(net.device, torch.float32)
    keep = set(range(len(net.nodes))) if all_nodes else set(engine_bound_nodes(net))
    last = max(keep)
    with torch.no_grad():
        return _run(net, x_L, x_U, interm_bounds or {}, keep, last)


def forward_crown_bounds(
    net: BoundedNetwork,
    x_L: Tensor,
    x_U: Tensor,
    interm_bounds: dict | None = None,
    crown_nodes: list[int] | None = None,
) -> list:
    """Forward mode refined by backward CROWN, in the structure of :meth:`BoundedNetwork.intermediate_bounds`.

    The forward pass of :func:`forward_intermediate_bounds`, but at each node of ``crown_nodes`` (default
    ``net.crown_nodes()``, the nodes the engine runs CROWN on) the neurons that forward mode, IBP and
    interm_bounds leave unstable get a backward CROWN pass (``net.bound_pairs``, as the engine's own pass), and
    the forward relaxations of later ReLUs use the refined bounds. Never looser than either mode alone (up to
    the ReLU relaxations' dependence on the bounds), and CROWN runs only on neurons forward mode cannot settle.
    x_L, x_U: [B, *in_shape]; returns a list by node of (lower, upper) [B, *shape] or None.
    """
    if not supports_forward(net):
        raise ValueError("forward mode does not support this network; see supports_forward")
    x_L = x_L.to(net.device, torch.float32)
    x_U = x_U.to(net.device, torch.float32)
    keep = set(engine_bound_nodes(net))
    todo = set(net.crown_nodes() if crown_nodes is None else crown_nodes)
    inp = InputSet(x_L, x_U)

    def refine(i: int, lo: Tensor, up: Tensor, bounds: list, exact: bool) -> Bounds:
        # an exact affine image of the box has exact concretized bounds: nothing to refine
        return net.crown_unstable_pairs(i, inp, bounds, lo, up) if i in todo and not exact else (lo, up)

    with torch.no_grad():
        return _run(net, x_L, x_U, interm_bounds or {}, keep, max(keep), refine)


def _run(net: BoundedNetwork, x_L: Tensor, x_U: Tensor, interm: dict, keep: set, last: int, refine=None) -> list:
    """The pass over nodes 0..last; see :func:`forward_intermediate_bounds`.

    refine(i, lo, up, bounds, exact) -> (lo, up) may tighten node i's bounds [B, *shape] given every earlier node's
    bounds (exact: node i's linear bounds are one exact affine map of the input)."""
    B = x_L.shape[0]
    n = num_inputs(net)
    xc = ((x_U + x_L) / 2).reshape(B, 1, n)
    xr = ((x_U - x_L) / 2).reshape(B, 1, n)
    out: list = [None] * len(net.nodes)
    ref: list = [None] * len(net.nodes)  # tightest known interval of every node so far
    lin: dict[int, LinearBounds] = {0: _input_bounds(B, n, net.in_shape, x_L.device)}
    remaining = _use_counts(net)
    ref[0] = (x_L, x_U)
    for i in range(1, last + 1):
        nd = net.nodes[i]
        op = nd.bound_op
        ins = [lin[j] for j in nd.inputs]
        ibp = op.ibp(*[ref[j] for j in nd.inputs])
        lin[i] = _STEP[type(op)](op, ins, [ref[j] for j in nd.inputs], ibp)
        lo, up = _concretize(lin[i], xc, xr)
        lo, up = torch.maximum(lo, ibp[0]), torch.minimum(up, ibp[1])
        if i in interm:
            lo, up = torch.maximum(lo, interm[i][0]), torch.minimum(up, interm[i][1])
        if refine is not None:
            lo, up = refine(i, lo, up, ref, lin[i].rad is None)
        ref[i] = (lo, up)
        for j in nd.inputs:
            remaining[j] -= 1
            if remaining[j] <= 0:
                lin.pop(j, None)
    for i in keep:
        out[i] = ref[i]
    return out


def _input_bounds(B: int, n: int, in_shape: tuple, device) -> LinearBounds:
    """The input's exact linear bounds: identity coefficients, zero constant. mid [B, n + 1, *in_shape]."""
    eye = torch.cat([torch.eye(n, device=device), torch.zeros(1, n, device=device)])
    return LinearBounds(eye.reshape(1, n + 1, *in_shape).expand(B, -1, *in_shape), None)


def _concretize(lb: LinearBounds, xc: Tensor, xr: Tensor) -> Bounds:
    """min of L and max of U over the box (centre xc, radius xr, both [B, 1, n]) -> ([B, *shape], [B, *shape])."""
    B, n = xc.shape[0], xc.shape[2]
    shape = lb.mid.shape[2:]
    out = []
    for side, sign in ((lb.lower(), -1.0), (lb.upper(), 1.0)):
        A = side[:, :n].reshape(B, n, -1)
        v = side[:, n].reshape(B, -1) + torch.bmm(xc, A).squeeze(1) + sign * torch.bmm(xr, A.abs()).squeeze(1)
        out.append(v.reshape(B, *shape))
    return out[0], out[1]


# ---------------------------------------------------------------------------------------------------------------
# one step per op type: (op, input LinearBounds, input intervals, this node's interval reference) -> LinearBounds


def _add_const(t: Tensor, c: Tensor | None) -> Tensor:
    """Add c (broadcastable to [B, *shape]) to the constant row n of t [B, n + 1, *shape] (t is fresh)."""
    if c is not None:
        t[:, -1] = t[:, -1] + c
    return t


def _step_linear(op: LinearOp, ins, refs, ibp) -> LinearBounds:
    (x,) = ins
    mid = _add_const(F.linear(x.mid, op.weight), op.bias)
    return LinearBounds(mid, None if x.rad is None else F.linear(x.rad, op.weight.abs()))


def _step_conv(op: ConvOp, ins, refs, ibp) -> LinearBounds:
    (x,) = ins
    B, m = x.mid.shape[:2]

    def conv(t: Tensor, w: Tensor) -> Tensor:
        y = F.conv2d(t.reshape(B * m, *t.shape[2:]), w, None, op.stride, op.padding, 1, op.groups)
        return y.reshape(B, m, *y.shape[1:])

    mid = _add_const(conv(x.mid, op.weight), None if op.bias is None else op.bias.reshape(-1, 1, 1))
    return LinearBounds(mid, None if x.rad is None else conv(x.rad, op.weight.abs()))


def _step_elementwise(op: ElementwiseAffineOp, ins, refs, ibp) -> LinearBounds:
    (x,) = ins
    mid = _add_const(x.mid * op.scale, op.shift)
    return LinearBounds(mid, None if x.rad is None else x.rad * op.scale.abs())


def _step_reshape(op: ReshapeOp, ins, refs, ibp) -> LinearBounds:
    return ins[0].map(lambda t: t.reshape(t.shape[0], t.shape[1], *op.out_shape))


def _step_permute(op: PermuteOp, ins, refs, ibp) -> LinearBounds:
    return ins[0].map(lambda t: t.permute(0, 1, *[d + 2 for d in op.dims]))


def _step_pad(op: PadOp, ins, refs, ibp) -> LinearBounds:
    (x,) = ins
    out = x.map(lambda t: F.pad(t, op.pads))
    if op.value != 0.0:
        out.mid[:, -1] = F.pad(x.mid[:, -1], op.pads, value=op.value)
    return out


def _step_cat(op: CatOp, ins, refs, ibp) -> LinearBounds:
    mid = torch.cat([x.mid for x in ins], op.dim + 2)
    if all(x.rad is None for x in ins):
        return LinearBounds(mid, None)
    rad = torch.cat([torch.zeros_like(x.mid) if x.rad is None else x.rad for x in ins], op.dim + 2)
    return LinearBounds(mid, rad)


def _step_add(op: AddOp, ins, refs, ibp) -> LinearBounds:
    a, b = ins
    mid = a.mid + op.alpha * b.mid
    if a.rad is None and b.rad is None:
        return LinearBounds(mid, None)
    rad = a.rad if b.rad is None else (abs(op.alpha) * b.rad if a.rad is None else a.rad + abs(op.alpha) * b.rad)
    return LinearBounds(mid, rad)


def _step_opaque(op: OpaqueOp, ins, refs, ibp) -> LinearBounds:
    """Cut: the node's interval as constant bounds."""
    lo, up = ibp
    B = lo.shape[0]
    m = ins[0].mid.shape[1]
    mid = torch.zeros(B, m, *lo.shape[1:], dtype=lo.dtype, device=lo.device)
    rad = torch.zeros_like(mid)
    mid[:, -1], rad[:, -1] = (up + lo) / 2, (up - lo) / 2
    return LinearBounds(mid, rad)


def _step_relu(op: ReLUOp, ins, refs, ibp) -> LinearBounds:
    """Triangle relaxation of the non-grafted neurons with the pre-activation bounds refs[0] ([B, *shape] each);
    grafted neurons map exactly."""
    (x,) = ins
    lo, up = refs[0]
    u_slope, u_int, l_slope, _ = op.relaxation(lo, up)  # [B, *shape] each
    low = x.lower() * l_slope.unsqueeze(1)
    upp = _add_const(x.upper() * u_slope.unsqueeze(1), u_int)
    graft = op.graft
    if graft is not None:
        mask, a, b = graft
        ga = _add_const(x.mid * a, b)
        gr = x.rad * a.abs() if x.rad is not None else torch.zeros_like(ga)
        low = torch.where(mask, ga - gr, low)
        upp = torch.where(mask, ga + gr, upp)
    return LinearBounds.from_sides(low, upp)


def _step_maxpool(op: MaxPoolOp, ins, refs, ibp) -> LinearBounds:
    """Lower: the window's input j* of largest lower bound; upper: x_j* where its lower bound is at least every
    other input's upper bound (exact), else the constant max of the upper bounds (no padding, no ceil_mode)."""
    (x,) = ins
    lo, up = refs[0]
    B, C, H, W = lo.shape
    Ho, Wo = op.out_shape[1:]
    flat, exact, umax = op.choice(lo, up)  # the engine's relaxation: [B, C, L], [B, C, Ho, Wo] x2
    m = x.mid.shape[1]
    idx = flat.unsqueeze(1).expand(B, m, C, Ho * Wo)

    def pick(t: Tensor) -> Tensor:  # [B, m, C, H, W] -> x_j* coefficients [B, m, C, Ho, Wo]
        return t.reshape(B, m, C, H * W).gather(3, idx).reshape(B, m, C, Ho, Wo)

    low = pick(x.lower())
    upp = torch.where(exact.reshape(B, 1, C, Ho, Wo), pick(x.upper()), torch.zeros_like(low))
    upp[:, -1] = torch.where(exact.reshape(B, C, Ho, Wo), upp[:, -1], umax.reshape(B, C, Ho, Wo))
    return LinearBounds.from_sides(low, upp)


_STEP: dict[type, Callable[..., LinearBounds]] = {
    LinearOp: _step_linear,
    ConvOp: _step_conv,
    ReLUOp: _step_relu,
    ReshapeOp: _step_reshape,
    PermuteOp: _step_permute,
    PadOp: _step_pad,
    CatOp: _step_cat,
    ElementwiseAffineOp: _step_elementwise,
    AddOp: _step_add,
    OpaqueOp: _step_opaque,
    MaxPoolOp: _step_maxpool,
}
