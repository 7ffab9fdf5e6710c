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
lower bound dominates the window, else the constant window maximum); an opaque op cuts to its interval. Each op
owns its step (:meth:`BoundOp.forward_linear`, with :meth:`BoundOp.forward_linear_ok` saying whether it has one);
this module runs the pass.

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

import torch
from torch import Tensor

from lingraft.bounds.engine import BoundedNetwork
from lingraft.bounds.input_set import InputSet
from lingraft.bounds.linear_bounds import LinearBounds
from lingraft.bounds.ops.base import Bounds

__all__ = [
    "LinearBounds",
    "forward_crown_bounds",
    "forward_intermediate_bounds",
    "forward_memory_bytes",
    "num_inputs",
    "supports_forward",
]


# ---------------------------------------------------------------------------------------------------------------
# which networks


def supports_forward(net: BoundedNetwork) -> bool:
    """True when forward mode handles every op of ``net`` (whether the input is small enough is the caller's call;
    see :func:`forward_memory_bytes`)."""
    return all(nd.bound_op.forward_linear_ok() for nd in net.nodes[1:])


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
        names = sorted({nd.bound_op.describe() for nd in net.nodes[1:] if not nd.bound_op.forward_linear_ok()})
        raise ValueError(f"forward mode does not support this network (ops: {', '.join(names)})")
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
    lin: dict[int, LinearBounds] = {0: LinearBounds.identity(net.in_shape, B, x_L.device)}
    remaining = _use_counts(net)
    ref[0] = (x_L, x_U)
    for i in range(1, last + 1):
        nd = net.nodes[i]
        op = nd.bound_op
        ins = [lin[j] for j in nd.inputs]
        ibp = op.ibp(*[ref[j] for j in nd.inputs])
        lin[i] = op.forward_linear(ins, [ref[j] for j in nd.inputs], ibp)
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
