"""Interval (IBP) bounds of local self-attention: the rules behind ``ACmix``/``SASA.interval_bounds``.

The layers (:mod:`lingraft.models.attention`) are opaque leaves of the bound engine; their ``interval_bounds``
gather the boxes of queries, keys and values per window and call :func:`local_attention_interval`, which
intersects three sound bounds of the attention output:

* the logits as channel-wise interval products of q and k (:func:`product_bounds`), intersected with the
  centred bilinear bounds from the input box (:func:`bilinear_logit_bounds`);
* the exact softmax interval of those logits (:func:`softmax_bounds`), intersected with the bounds from logit
  differences (:func:`logit_difference_softmax_bounds`);
* the convex combination of the value boxes with those weights (:func:`convex_combination_bounds`).

Shapes: B samples, h heads, d channels per head, C_in input channels, K window positions, P output pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

Box = tuple[Tensor, Tensor]

_NEG_INF = float("-inf")


def conv_bounds(lower: Tensor, upper: Tensor, weight: Tensor, bias: Tensor | None, **conv_kw) -> tuple[Tensor, Tensor]:
    """Exact interval image of the affine map conv2d(x, weight, bias) over the box [lower, upper] (center/radius)."""
    center = F.conv2d((upper + lower) / 2, weight, bias, **conv_kw)
    radius = F.conv2d((upper - lower) / 2, weight.abs(), None, **conv_kw)
    return center - radius, center + radius


def scale_bounds(a: Tensor, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
    """Interval of a * x for x in [lower, upper], any sign of the (broadcastable) tensor a."""
    p, q = a * lower, a * upper
    return torch.minimum(p, q), torch.maximum(p, q)


def product_bounds(al: Tensor, au: Tensor, bl: Tensor, bu: Tensor) -> tuple[Tensor, Tensor]:
    """Elementwise interval of a * b for a in [al, au], b in [bl, bu]: min/max of the four corner products."""
    c1, c2, c3, c4 = al * bl, al * bu, au * bl, au * bu
    lo = torch.minimum(torch.minimum(c1, c2), torch.minimum(c3, c4))
    hi = torch.maximum(torch.maximum(c1, c2), torch.maximum(c3, c4))
    return lo, hi


def _logsumexp_others(x: Tensor, dim: int) -> Tensor:
    """out_i = log sum_{j != i} exp(x_j) along dim, without the cancellation of LSE(x) - x_i.

    Built from exclusive prefix and suffix log-cumsum-exps; -inf entries (masked) contribute nothing.
    """
    n = x.shape[dim]
    pad_shape = list(x.shape)
    pad_shape[dim] = 1
    ninf = x.new_full(pad_shape, _NEG_INF)
    prefix = torch.cat([ninf, torch.logcumsumexp(x.narrow(dim, 0, n - 1), dim)], dim) if n > 1 else ninf
    rev = x.flip(dim)
    suffix = torch.cat([ninf, torch.logcumsumexp(rev.narrow(dim, 0, n - 1), dim)], dim).flip(dim) if n > 1 else ninf
    return torch.logaddexp(prefix, suffix)


def softmax_bounds(lower: Tensor, upper: Tensor, valid: Tensor | None = None, dim: int = -1) -> tuple[Tensor, Tensor]:
    """Exact per-coordinate interval of softmax(z) over the box lower <= z <= upper.

    lower_i = exp(l_i) / (exp(l_i) + sum_{j!=i} exp(u_j)) = sigmoid(l_i - LSE_{j!=i} u_j), upper symmetric;
    the log-space form is the stable "subtract the max" computation. valid (broadcastable bool) marks
    positions that take part; invalid ones get weight [0, 0].
    """
    if valid is not None:
        lower = lower.masked_fill(~valid, _NEG_INF)
        upper = upper.masked_fill(~valid, _NEG_INF)
    lo = torch.sigmoid(lower - _logsumexp_others(upper, dim))
    hi = torch.sigmoid(upper - _logsumexp_others(lower, dim))
    if valid is not None:  # sigmoid(-inf - (-inf)) would be nan if a window had one valid entry only
        lo = lo.masked_fill(~valid, 0.0)
        hi = hi.masked_fill(~valid, 0.0)
    return lo, hi


def convex_combination_bounds(
    wl: Tensor, wu: Tensor, vl: Tensor, vu: Tensor, valid: Tensor | None = None, dim: int = -1
) -> tuple[Tensor, Tensor]:
    """Bounds of sum_j w_j v_j along dim, for w_j in [wl_j, wu_j] with w >= 0, sum_j w_j = 1, v_j in [vl_j, vu_j].

    Three sound bounds, intersected:
      * bilinear: sum_j of the four-corner product bounds;
      * convex hull: a convex combination lies in [min_j vl_j, max_j vu_j] over valid j;
      * the exact optimum of the linear relaxation {wl <= w <= wu, sum w = 1}: start at wl and give the
        remaining mass 1 - sum wl greedily to the smallest vl_j (fractional knapsack). It implies the
        other two; they are kept as cheap, independent safeguards against rounding.
    Shapes broadcast; invalid positions must have wl = wu = 0 (as softmax_bounds returns).
    """
    wl = wl.clamp(min=0.0)
    shape = torch.broadcast_shapes(wl.shape, vl.shape)
    wl, wu, vl, vu = (t.expand(shape) for t in (wl, wu, vl, vu))

    pl, pu = product_bounds(wl, wu, vl, vu)
    lo_bil, hi_bil = pl.sum(dim), pu.sum(dim)

    if valid is not None:
        valid = valid.expand(shape)
        lo_hull = vl.masked_fill(~valid, math.inf).amin(dim)
        hi_hull = vu.masked_fill(~valid, _NEG_INF).amax(dim)
    else:
        lo_hull, hi_hull = vl.amin(dim), vu.amax(dim)

    cap = (wu - wl).clamp(min=0.0)
    rem = (1.0 - wl.sum(dim, keepdim=True)).clamp(min=0.0)

    def greedy(v: Tensor, descending: bool) -> Tensor:
        v_s, order = v.sort(dim, descending=descending)
        c_s = cap.gather(dim, order)
        before = c_s.cumsum(dim) - c_s
        alloc = torch.minimum((rem - before).clamp(min=0.0), c_s)
        return (wl * v).sum(dim) + (alloc * v_s).sum(dim)

    lo = torch.maximum(torch.maximum(lo_bil, lo_hull), greedy(vl, descending=False))
    hi = torch.minimum(torch.minimum(hi_bil, hi_hull), greedy(vu, descending=True))
    return lo, torch.maximum(hi, lo)  # the intersection is never empty mathematically; guard rounding


def local_attention_bounds(
    ql: Tensor,
    qu: Tensor,
    kl: Tensor,
    ku: Tensor,
    vl: Tensor,
    vu: Tensor,
    valid: Tensor,
    logit_box: tuple[Tensor, Tensor] | None = None,
    weight_box: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Bounds of local attention sum_j softmax_j(q . kb_j) v_j from boxes of q [B, h, d, P], kb (keys + logit bias)
    [B, h, d, K, P] and v [B, h, d, K, P]; valid [K, P] marks window positions inside the image. -> [B, h, d, P].

    logit_box: optional second sound box of the logits [B, h, K, P] (e.g. :func:`bilinear_logit_bounds`); the
    logits are bounded by the intersection of it with the channel-wise product bounds. weight_box: optional
    second sound box of the softmax weights [B, h, K, P] (:func:`logit_difference_softmax_bounds`), intersected too.
    """
    pl, pu = product_bounds(ql.unsqueeze(3), qu.unsqueeze(3), kl, ku)
    ll, lu = pl.sum(2), pu.sum(2)
    if logit_box is not None:
        ll, lu = torch.maximum(ll, logit_box[0]), torch.minimum(lu, logit_box[1])
        lu = torch.maximum(lu, ll)  # both are sound, so they intersect; guard float rounding
    wl, wu = softmax_bounds(ll, lu, valid, dim=2)  # [B, h, K, P]
    if weight_box is not None:
        wl, wu = torch.maximum(wl, weight_box[0]), torch.minimum(wu, weight_box[1])
        wu = torch.maximum(wu, wl)
    return convex_combination_bounds(wl.unsqueeze(2), wu.unsqueeze(2), vl, vu, valid, dim=3)


@dataclass(frozen=True)
class AttentionLogits:
    """The logit map s * (Wq x_p + bq) . (Wk x_j + bk + key_bias) of one attention layer, per head.

    wq, wk [h, d, C_in] and bq, bk [h, d] (or None) the query/key projections of the layer input x; key_bias
    broadcastable to [B, h, d, K, P] (e.g. relative position terms); scale s the logit scaling.
    """

    wq: Tensor
    bq: Tensor | None
    wk: Tensor
    bk: Tensor | None = None
    key_bias: Tensor | float = 0.0
    scale: float = 1.0


def _centred_logit_terms(query_input: Box, window_input: Box, logits: AttentionLogits, key_bias: Tensor | float):
    """Shared pieces of :func:`bilinear_logit_bounds` and :func:`logit_difference_softmax_bounds`.

    With (c_q, r_q) = query_input, (c_k, r_k) = window_input, k_c = Wk c_k + key_bias (the caller decides
    whether key_bias holds bk) and q_c = s (Wq c_q + bq) returns
      base = q_c . k_c [B, h, K, P], t = s Wq^T k_c [B, h, C_in, K, P],
      key_rad = |Wk^T q_c| . r_k + r_q^T |s Wq^T Wk| r_k [B, h, K, P].
    """
    (c_q, r_q), (c_k, r_k) = query_input, window_input
    wq, wk = logits.wq * logits.scale, logits.wk
    qc = torch.einsum("hdc,bcp->bhdp", wq, c_q)
    if logits.bq is not None:
        qc = qc + (logits.bq * logits.scale)[None, :, :, None]
    kc = torch.einsum("hdc,bckp->bhdkp", wk, c_k) + key_bias
    base = torch.einsum("bhdp,bhdkp->bhkp", qc, kc)
    t = torch.einsum("hdc,bhdkp->bhckp", wq, kc)
    key_rad = torch.einsum("bhcp,bckp->bhkp", torch.einsum("hdc,bhdp->bhcp", wk, qc).abs(), r_k)
    key_rad = key_rad + torch.einsum("bcp,hce,bekp->bhkp", r_q, torch.einsum("hdc,hde->hce", wq, wk).abs(), r_k)
    return base, t, key_rad


def logit_difference_softmax_bounds(
    query_input: Box, window_input: Box, logits: AttentionLogits, valid: Tensor, chunk: int = 4
) -> tuple[Tensor, Tensor]:
    """Softmax weight bounds from bounds on logit DIFFERENCES, which share the query and so cancel its uncertainty.

    softmax_j = 1 / sum_i exp(l_i - l_j), so with D_ij in [dl_ij, du_ij] bounding l_i - l_j (D_jj = 0):
    w_j >= exp(-LSE_i du_ij) and w_j <= exp(-LSE_i dl_ij). Each difference is s * q_p . (Wk (x_i - x_j) + kb_i - kb_j)
    (the key bias bk cancels, so ``logits.bk`` is not used), bounded like :func:`bilinear_logit_bounds`; x_i and
    x_j are treated as independent (sound also when they are the same pixel). Shapes as there; valid [K, P].
    Returns (wl, wu) [B, h, K, P] with invalid positions [0, 0]. Batched in chunks of ``chunk`` samples ([K, K]
    pairs per pixel).
    """
    pair_valid = valid.unsqueeze(0) & valid.unsqueeze(1)  # [K(j), K(i), P]
    eye = torch.eye(valid.shape[0], dtype=torch.bool, device=valid.device).unsqueeze(-1)
    los, his = [], []
    for s0 in range(0, query_input[0].shape[0], chunk):
        cq, rq, ck, rk = (t[s0 : s0 + chunk] for t in (*query_input, *window_input))
        base, t, key_rad = _centred_logit_terms((cq, rq), (ck, rk), logits, logits.key_bias)
        centre = base.unsqueeze(2) - base.unsqueeze(3)  # [b, h, K(j), K(i), P]: i minus j
        lin_q = torch.einsum("bhcjip,bcp->bhjip", (t.unsqueeze(3) - t.unsqueeze(4)).abs(), rq)
        rad = key_rad.unsqueeze(2) + key_rad.unsqueeze(3) + lin_q
        dl, du = centre - rad, centre + rad
        dl = dl.masked_fill(eye, 0.0).masked_fill(~pair_valid, _NEG_INF)
        du = du.masked_fill(eye, 0.0).masked_fill(~pair_valid, _NEG_INF)
        wl = torch.exp(-torch.logsumexp(du, dim=3))
        wu = torch.exp(-torch.logsumexp(dl, dim=3)).clamp(max=1.0)
        los.append(wl.masked_fill(~valid, 0.0))
        his.append(wu.masked_fill(~valid, 0.0))
    return torch.cat(los), torch.cat(his)


def bilinear_logit_bounds(query_input: Box, window_input: Box, logits: AttentionLogits) -> tuple[Tensor, Tensor]:
    """Bounds of the logits s * (Wq x_p + bq) . (Wk x_j + bk + key_bias) per head, from the INPUT boxes.

    query_input (c_q, r_q) [B, C_in, P]: centre / radius of the input at each query pixel p; window_input
    (c_k, r_k) [B, C_in, K, P]: the same at each window position j; logits: the projections (see
    :class:`AttentionLogits`). With x = c + delta (|delta| <= r) the logit is
        q_c . k_c + (Wk^T q_c) . delta_j + (Wq^T k_c) . delta_p + delta_p^T (Wq^T Wk) delta_j,
    bounded term by term (the last with |Wq^T Wk|). Unlike intervals of q and k multiplied channel by channel,
    this keeps the correlation between a vector's channels, so it is much tighter for small radii; it is sound
    also when p = j (the two deltas are then treated as independent). Returns (lo, hi) [B, h, K, P].
    """
    key_bias = logits.key_bias
    if logits.bk is not None:
        key_bias = key_bias + logits.bk[None, :, :, None, None]
    centre, t, key_rad = _centred_logit_terms(query_input, window_input, logits, key_bias)
    rad = key_rad + torch.einsum("bhckp,bcp->bhkp", t.abs(), query_input[1])
    return centre - rad, centre + rad


def local_attention_interval(
    q: Box, k: Box, v: Box, valid: Tensor, query_input: Box, window_input: Box, logits: AttentionLogits
) -> Box:
    """Sound bounds of s * q . (k + key_bias) softmax-attention over windows, from boxes and the input box.

    q: box [B, h, d, P] of the (already scaled by ``logits.scale``) queries; k, v: boxes [B, h, d, K, P] of the
    keys (without key_bias) and values; valid [K, P]. query_input: (centre, radius) [B, C_in, P] of the layer
    input at the query pixels, window_input: (centre, radius) [B, C_in, K, P] at the window positions; logits:
    the query/key projections, key_bias and scale (:class:`AttentionLogits`). Returns (lo, hi) [B, h, d, P].
    """
    logit_box = bilinear_logit_bounds(query_input, window_input, logits)
    weight_box = logit_difference_softmax_bounds(query_input, window_input, logits, valid)
    kb = logits.key_bias
    return local_attention_bounds(q[0], q[1], k[0] + kb, k[1] + kb, v[0], v[1], valid, logit_box, weight_box)
