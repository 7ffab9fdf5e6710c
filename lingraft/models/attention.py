"""Local self-attention layers (ACmix, SASA), their interval (IBP) bounds, and two small zoo nets.

* :class:`ACmix` -- Pan et al., "On the Integration of Self-Attention and Convolution" (arXiv 2111.14556),
  re-implemented from the paper and the semantics of the official ResNet code (LeapLabTHU/ACmix).
* :class:`SASA` -- Ramachandran et al., "Stand-Alone Self-Attention in Vision Models" (arXiv 1906.05909).

Both attend, for every output pixel, over the k x k window centred on it. Windows are formed by one
gather with a precomputed index (:func:`window_index`) instead of pad + unfold, so the forward pass and
the bounds share the same indexing and any spatial size (odd, even, smaller than the window) works.

Each layer has ``interval_bounds(lower, upper)``: sound elementwise bounds of ``forward(x)`` for every
``x`` in the box, which the bound engine uses as an opaque leaf. The interval rules (center/radius for
affine maps, four-corner bilinear products, exact softmax interval, convex-combination bounds) are the
module-level ``*_bounds`` helpers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lingraft.errors import UsageError
from lingraft.models.layers import Normalize
from lingraft.models import register

_NEG_INF = float("-inf")

# ----------------------------------------------------------------------------------------------------
# Windows
# ----------------------------------------------------------------------------------------------------


def window_index(h: int, w: int, k: int, stride: int = 1, padding: str = "zeros",
                 device: torch.device | None = None) -> tuple[Tensor, Tensor, int, int]:
    """Flat source indices of every k x k window.

    Window position ``a * k + b`` (a = row, b = column of the window, the order of ``F.unfold``) of the
    output pixel ``(i, j)`` reads input pixel ``(i * stride + a - k//2, j * stride + b - k//2)``.
    padding "zeros": positions outside the image are marked invalid (callers mask them out of the
    softmax); "reflect": they are mirrored into the image like ``ReflectionPad2d`` (needs k//2 < h, w).

    Returns (idx [K, P] long into the flattened h*w grid, valid [K, P] bool, h_out, w_out) with
    K = k*k, P = h_out*w_out, h_out = ceil(h / stride), w_out = ceil(w / stride).
    """
    if k % 2 != 1 or k < 1:
        raise UsageError(f"attention window size must be odd, got {k}; use 3, 5 or 7")
    r = k // 2
    if padding == "reflect" and (r >= h or r >= w):
        raise UsageError(f"reflect padding of {r} needs a feature map larger than {r}x{r}, got {h}x{w}; "
                         "use padding='zeros'")
    if padding not in ("zeros", "reflect"):
        raise UsageError(f"unknown attention padding {padding!r}; use 'zeros' or 'reflect'")
    oy = torch.arange(0, h, stride, device=device)
    ox = torch.arange(0, w, stride, device=device)
    d = torch.arange(k, device=device) - r
    ys = (oy[None, None, :, None] + d[:, None, None, None]).expand(k, k, len(oy), len(ox))
    xs = (ox[None, None, None, :] + d[None, :, None, None]).expand(k, k, len(oy), len(ox))
    valid = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
    if padding == "reflect":
        ys = torch.where(ys < 0, -ys, ys)
        ys = torch.where(ys > h - 1, 2 * (h - 1) - ys, ys)
        xs = torch.where(xs < 0, -xs, xs)
        xs = torch.where(xs > w - 1, 2 * (w - 1) - xs, xs)
        valid = torch.ones_like(valid)
    else:
        # Invalid positions read pixel 0 (any finite value); they are masked wherever they matter.
        ys = ys.clamp(0, h - 1)
        xs = xs.clamp(0, w - 1)
    idx = (ys * w + xs).reshape(k * k, -1)
    return idx, valid.reshape(k * k, -1), len(oy), len(ox)


def gather_windows(x: Tensor, idx: Tensor) -> Tensor:
    """x [B, C, H, W] (or [B, C, H*W]), idx [K, P] -> [B, C, K, P] with out[..., a, p] = x_flat[..., idx[a, p]]."""
    flat = x.flatten(2)
    return flat.index_select(2, idx.flatten()).unflatten(2, idx.shape)


# ----------------------------------------------------------------------------------------------------
# Interval arithmetic
# ----------------------------------------------------------------------------------------------------


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


def convex_combination_bounds(wl: Tensor, wu: Tensor, vl: Tensor, vu: Tensor, valid: Tensor | None = None,
                              dim: int = -1) -> tuple[Tensor, Tensor]:
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


def _local_attention(q: Tensor, kb: Tensor, v: Tensor, valid: Tensor) -> Tensor:
    """Forward of one local attention: q [B, h, d, P], kb (keys + logit bias) [B, h, d, K, P], v [B, h, d, K, P],
    valid [K, P] -> [B, h, d, P]."""
    logits = (q.unsqueeze(3) * kb).sum(2)  # [B, h, K, P]
    att = logits.masked_fill(~valid, _NEG_INF).softmax(2)
    return (att.unsqueeze(2) * v).sum(3)


def _local_attention_bounds(ql: Tensor, qu: Tensor, kl: Tensor, ku: Tensor, vl: Tensor, vu: Tensor,
                            valid: Tensor, logit_box: tuple[Tensor, Tensor] | None = None,
                            weight_box: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Interval version of :func:`_local_attention` (same shapes, each input given as a box).

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


def _centred_logit_terms(c_q: Tensor, r_q: Tensor, c_k: Tensor, r_k: Tensor, wq: Tensor, bq: Tensor | None,
                         wk: Tensor, key_bias: Tensor | float, scale: float):
    """Shared pieces of :func:`bilinear_logit_bounds` and :func:`logit_difference_softmax_bounds` (without bk).

    With k_c = Wk c_k + key_bias and q_c = s (Wq c_q + bq) returns
      base = q_c . k_c [B, h, K, P], t = s Wq^T k_c [B, h, C_in, K, P],
      key_rad = |Wk^T q_c| . r_k + r_q^T |s Wq^T Wk| r_k [B, h, K, P].
    """
    wq = wq * scale
    qc = torch.einsum("hdc,bcp->bhdp", wq, c_q)
    if bq is not None:
        qc = qc + (bq * scale)[None, :, :, None]
    kc = torch.einsum("hdc,bckp->bhdkp", wk, c_k) + key_bias
    base = torch.einsum("bhdp,bhdkp->bhkp", qc, kc)
    t = torch.einsum("hdc,bhdkp->bhckp", wq, kc)
    key_rad = torch.einsum("bhcp,bckp->bhkp", torch.einsum("hdc,bhdp->bhcp", wk, qc).abs(), r_k)
    key_rad = key_rad + torch.einsum("bcp,hce,bekp->bhkp", r_q, torch.einsum("hdc,hde->hce", wq, wk).abs(), r_k)
    return base, t, key_rad


def logit_difference_softmax_bounds(c_q: Tensor, r_q: Tensor, c_k: Tensor, r_k: Tensor, wq: Tensor, bq: Tensor | None,
                                    wk: Tensor, key_bias: Tensor | float, valid: Tensor, scale: float = 1.0,
                                    chunk: int = 4) -> tuple[Tensor, Tensor]:
    """Softmax weight bounds from bounds on logit DIFFERENCES, which share the query and so cancel its uncertainty.

    softmax_j = 1 / sum_i exp(l_i - l_j), so with D_ij in [dl_ij, du_ij] bounding l_i - l_j (D_jj = 0):
    w_j >= exp(-LSE_i du_ij) and w_j <= exp(-LSE_i dl_ij). Each difference is s * q_p . (Wk (x_i - x_j) + kb_i - kb_j)
    (the key bias bk cancels), bounded like :func:`bilinear_logit_bounds`; x_i and x_j are treated as
    independent (sound also when they are the same pixel). Shapes as there; valid [K, P]. Returns (wl, wu)
    [B, h, K, P] with invalid positions [0, 0]. Batched in chunks of ``chunk`` samples ([K, K] pairs per pixel).
    """
    pair_valid = valid.unsqueeze(0) & valid.unsqueeze(1)  # [K(j), K(i), P]
    eye = torch.eye(valid.shape[0], dtype=torch.bool, device=valid.device).unsqueeze(-1)
    los, his = [], []
    for s0 in range(0, c_q.shape[0], chunk):
        cq, rq, ck, rk = (t[s0:s0 + chunk] for t in (c_q, r_q, c_k, r_k))
        base, t, key_rad = _centred_logit_terms(cq, rq, ck, rk, wq, bq, wk, key_bias, scale)
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


def bilinear_logit_bounds(c_q: Tensor, r_q: Tensor, c_k: Tensor, r_k: Tensor, wq: Tensor, bq: Tensor | None,
                          wk: Tensor, bk: Tensor | None, key_bias: Tensor | float = 0.0,
                          scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """Bounds of the logits s * (Wq x_p + bq) . (Wk x_j + bk + key_bias) per head, from the INPUT boxes.

    c_q, r_q [B, C_in, P]: centre / radius of the input at each query pixel p; c_k, r_k [B, C_in, K, P]: the same
    at each window position j; wq, wk [h, d, C_in]; bq, bk [h, d] or None; key_bias broadcastable to
    [B, h, d, K, P]. With x = c + delta (|delta| <= r) the logit is
        q_c . k_c + (Wk^T q_c) . delta_j + (Wq^T k_c) . delta_p + delta_p^T (Wq^T Wk) delta_j,
    bounded term by term (the last with |Wq^T Wk|). Unlike intervals of q and k multiplied channel by channel,
    this keeps the correlation between a vector's channels, so it is much tighter for small radii; it is sound
    also when p = j (the two deltas are then treated as independent). Returns (lo, hi) [B, h, K, P].
    """
    if bk is not None:
        key_bias = key_bias + bk[None, :, :, None, None]
    centre, t, key_rad = _centred_logit_terms(c_q, r_q, c_k, r_k, wq, bq, wk, key_bias, scale)
    rad = key_rad + torch.einsum("bhckp,bcp->bhkp", t.abs(), r_q)
    return centre - rad, centre + rad


def _windows_bounds(lower: Tensor, upper: Tensor, idx: Tensor, heads: int) -> tuple[Tensor, Tensor]:
    """[B, C, H, W] box -> gathered windows [B, heads, C/heads, K, P] (gathering is exact on boxes)."""
    lo = gather_windows(lower, idx)
    hi = gather_windows(upper, idx)
    return lo.unflatten(1, (heads, -1)), hi.unflatten(1, (heads, -1))


# ----------------------------------------------------------------------------------------------------
# ACmix
# ----------------------------------------------------------------------------------------------------


def position_grid(h: int, w: int, device=None, dtype=None) -> Tensor:
    """[1, 2, h, w] coordinate grid in [-1, 1]: channel 0 = column (x) coordinate, channel 1 = row (y)."""
    def lin(n: int) -> list[float]:  # torch.linspace(-1, 1, n), built in Python so it exports as a constant
        return [-1.0 + 2.0 * i / (n - 1) for i in range(n)] if n > 1 else [-1.0]

    loc_w = torch.tensor(lin(w), device=device, dtype=dtype).expand(h, w)
    loc_h = torch.tensor(lin(h), device=device, dtype=dtype).unsqueeze(1).expand(h, w)
    return torch.stack([loc_w, loc_h]).unsqueeze(0)


class ACmix(nn.Module):
    """ACmix: shared 1x1 q/k/v projections feeding a local-attention path and a shift-convolution path.

    x [B, in_planes, H, W] -> [B, out_planes, ceil(H/stride), ceil(W/stride)];
    out = rate1 * attention + rate2 * convolution (rate1, rate2 learnable scalars, start at 0.5).

    Attention path (head heads of head_dim = out_planes/head channels): for each output pixel p and each
    position j of its kernel_att x kernel_att window,
        logit_j = s * q_p . (k_j + pe_p - pe_j),    s = head_dim^-1/2,
    where pe = conv_p(coordinate grid) [head_dim, H, W] is shared by the heads; softmax over the window;
    output = sum_j softmax_j v_j. padding="reflect" (default, as the official code) mirrors the window at
    the border (needs kernel_att//2 < H, W); padding="zeros" instead drops outside positions from the
    softmax, which works for any size.

    Convolution path: fc, a 1x1 conv over the 3*head stacked q, k, v head maps, gives kernel_conv^2 maps
    per head channel; the grouped dep_conv (groups = head_dim) sums them shifted by every kernel offset.
    Its one-hot "shift" kernels are a fixed buffer and it has no bias: the official code initialises the
    same kernels and its bias init returns None, i.e. removes the bias.
    """

    def __init__(self, in_planes: int, out_planes: int, kernel_att: int = 7, head: int = 4, kernel_conv: int = 3,
                 stride: int = 1, padding: str = "reflect"):
        super().__init__()
        if out_planes % head:
            raise UsageError(f"ACmix: out_planes={out_planes} must be divisible by head={head}")
        if kernel_conv % 2 != 1 or kernel_att % 2 != 1:
            raise UsageError(f"ACmix: kernel sizes must be odd, got kernel_att={kernel_att}, kernel_conv={kernel_conv}")
        if padding not in ("zeros", "reflect"):
            raise UsageError(f"ACmix: unknown padding {padding!r}; use 'zeros' or 'reflect'")
        self.in_planes, self.out_planes = in_planes, out_planes
        self.head, self.head_dim = head, out_planes // head
        self.kernel_att, self.kernel_conv = kernel_att, kernel_conv
        self.stride, self.padding = stride, padding

        self.conv1 = nn.Conv2d(in_planes, out_planes, 1)  # q
        self.conv2 = nn.Conv2d(in_planes, out_planes, 1)  # k
        self.conv3 = nn.Conv2d(in_planes, out_planes, 1)  # v
        self.conv_p = nn.Conv2d(2, self.head_dim, 1)
        self.fc = nn.Conv2d(3 * head, kernel_conv * kernel_conv, 1, bias=False)
        self.rate1 = nn.Parameter(torch.tensor([0.5]))
        self.rate2 = nn.Parameter(torch.tensor([0.5]))

        kk = kernel_conv * kernel_conv
        shift = torch.zeros(kk, kernel_conv, kernel_conv)
        for i in range(kk):
            shift[i, i // kernel_conv, i % kernel_conv] = 1.0
        # [out_planes, kk, kc, kc]: every output channel of group d sums the kk shifted maps of channel d.
        self.register_buffer("shift_weight", shift.unsqueeze(0).repeat(out_planes, 1, 1, 1))

    def extra_repr(self) -> str:
        return (f"{self.in_planes}, {self.out_planes}, kernel_att={self.kernel_att}, head={self.head}, "
                f"kernel_conv={self.kernel_conv}, stride={self.stride}, padding={self.padding!r}")

    # -- pieces shared by forward and bounds ---------------------------------------------------------

    def _dep_conv(self, f: Tensor, weight: Tensor) -> Tensor:
        return F.conv2d(f, weight, None, stride=self.stride, padding=self.kernel_conv // 2, groups=self.head_dim)

    def _pe_delta(self, h: int, w: int, idx: Tensor, ref: Tensor) -> Tensor:
        """(pe_p - pe_j) * s: [1, 1, head_dim, K, P], the positional part of the attention keys."""
        pe = self.conv_p(position_grid(h, w, device=ref.device, dtype=ref.dtype))  # [1, hd, h, w]
        pe_win = gather_windows(pe, idx)  # [1, hd, K, P]
        pe_q = pe.flatten(2)[:, :, idx[idx.shape[0] // 2]]  # centre of each window = the output pixel itself
        return (pe_q.unsqueeze(2) - pe_win).unsqueeze(1)

    def _query_positions(self, t: Tensor, h_out: int, w_out: int) -> Tensor:
        """[B, C, H, W] -> [B, C, P]: the pixels where outputs are computed (every stride-th)."""
        return t[:, :, :: self.stride, :: self.stride].reshape(t.shape[0], t.shape[1], h_out * w_out)

    def _windows(self, h: int, w: int, device) -> tuple[Tensor, Tensor, int, int]:
        return window_index(h, w, self.kernel_att, self.stride, self.padding, device)

    # -- forward ---------------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        q, k, v = self.conv1(x), self.conv2(x), self.conv3(x)
        idx, valid, h_out, w_out = self._windows(h, w, x.device)
        nh, hd = self.head, self.head_dim

        # attention
        scaling = float(hd) ** -0.5
        q_att = self._query_positions(q, h_out, w_out).unflatten(1, (nh, hd)) * scaling  # [B, nh, hd, P]
        k_win = gather_windows(k, idx).unflatten(1, (nh, hd))  # [B, nh, hd, K, P]
        v_win = gather_windows(v, idx).unflatten(1, (nh, hd))
        kb = k_win + self._pe_delta(h, w, idx, x)
        out_att = _local_attention(q_att, kb, v_win, valid).reshape(b, self.out_planes, h_out, w_out)

        # convolution: fc mixes the 3*head maps of each head channel d, dep_conv shifts and sums per d
        qkv = torch.cat([t.view(b, nh, hd, h * w) for t in (q, k, v)], 1)  # [B, 3nh, hd, HW]
        f = self.fc(qkv)  # [B, kk, hd, HW]
        f = f.permute(0, 2, 1, 3).reshape(b, hd * self.kernel_conv ** 2, h, w)  # channel d*kk + i
        out_conv = self._dep_conv(f, self.shift_weight)

        return self.rate1 * out_att + self.rate2 * out_conv

    # -- bounds ------------------------------------------------------------------------------------------

    def _conv_path_affine(self) -> tuple[Tensor, Tensor]:
        """The conv path up to dep_conv as ONE 1x1 conv of x: (weight [hd*kk, C_in, 1, 1], bias [hd*kk]).

        q, k, v and fc are all linear per pixel, so composing them first makes the interval of f exact
        (propagating intervals through q/k/v and then fc separately would lose their correlation).
        """
        nh, hd, kk = self.head, self.head_dim, self.kernel_conv ** 2
        ws = torch.cat([c.weight.flatten(1).view(nh, hd, -1) for c in (self.conv1, self.conv2, self.conv3)])
        bs = torch.cat([c.bias.view(nh, hd) for c in (self.conv1, self.conv2, self.conv3)])  # [3nh, hd]
        fw = self.fc.weight.flatten(1)  # [kk, 3nh]
        weight = torch.einsum("ih,hdc->dic", fw, ws).reshape(hd * kk, -1, 1, 1)
        bias = torch.einsum("ih,hd->di", fw, bs).reshape(hd * kk)
        return weight, bias

    def interval_bounds(self, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
        """Sound bounds of forward(x) for all lower <= x <= upper.

        lower, upper [B, in_planes, H, W] -> (lo, hi) [B, out_planes, ceil(H/stride), ceil(W/stride)].
        Exact at lower == upper (up to float rounding).
        """
        b, _, h, w = lower.shape
        nh, hd = self.head, self.head_dim
        idx, valid, h_out, w_out = self._windows(h, w, lower.device)

        # attention path
        ql, qu = conv_bounds(lower, upper, self.conv1.weight, self.conv1.bias)
        kl, ku = conv_bounds(lower, upper, self.conv2.weight, self.conv2.bias)
        vl, vu = conv_bounds(lower, upper, self.conv3.weight, self.conv3.bias)
        scaling = float(hd) ** -0.5
        ql = self._query_positions(ql, h_out, w_out).unflatten(1, (nh, hd)) * scaling
        qu = self._query_positions(qu, h_out, w_out).unflatten(1, (nh, hd)) * scaling
        delta = self._pe_delta(h, w, idx, lower)
        kl, ku = _windows_bounds(kl, ku, idx, nh)
        vl, vu = _windows_bounds(vl, vu, idx, nh)
        # second bounds of logits and weights from the input box (centre/radius at queries and windows)
        c, rad = (upper + lower) / 2, (upper - lower) / 2
        box = (self._query_positions(c, h_out, w_out), self._query_positions(rad, h_out, w_out),
               gather_windows(c, idx), gather_windows(rad, idx))
        wq, bq, wk = self.conv1.weight.view(nh, hd, -1), self.conv1.bias.view(nh, hd), self.conv2.weight.view(nh, hd, -1)
        logit_box = bilinear_logit_bounds(*box, wq, bq, wk, self.conv2.bias.view(nh, hd), delta, scale=scaling)
        weight_box = logit_difference_softmax_bounds(*box, wq, bq, wk, delta, valid, scale=scaling)
        al, au = _local_attention_bounds(ql, qu, kl + delta, ku + delta, vl, vu, valid, logit_box, weight_box)
        al, au = al.reshape(b, self.out_planes, h_out, w_out), au.reshape(b, self.out_planes, h_out, w_out)

        # conv path: an affine map of x
        weight, bias = self._conv_path_affine()
        fl, fu = conv_bounds(lower, upper, weight, bias)
        center = self._dep_conv((fu + fl) / 2, self.shift_weight)
        radius = self._dep_conv((fu - fl) / 2, self.shift_weight.abs())
        cl, cu = center - radius, center + radius

        al, au = scale_bounds(self.rate1, al, au)
        cl, cu = scale_bounds(self.rate2, cl, cu)
        return al + cl, au + cu


# ----------------------------------------------------------------------------------------------------
# SASA
# ----------------------------------------------------------------------------------------------------


class SASA(nn.Module):
    """Stand-alone local self-attention with relative row/column embeddings (stride 1).

    x [B, in_channels, H, W] -> [B, out_channels, H, W]. For output pixel p and position (a, b) of its
    k x k window (a = row, b = column offset index), with r_ab = concat(rel_h[:, a], rel_w[:, b]) [C_out]:
        logit_ab = sum over the head's channels c of q_p[c] * (k_ab[c] + r_ab[c]) = q.k + q.r,
    softmax over the window, output = sum_ab softmax_ab v_ab. The first out_channels/2 channels carry the
    row embedding, the rest the column embedding (so with heads >= 2 each head sees one of them).
    Positions outside the image are zero-padded and masked out of the softmax (-inf logits).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 7, heads: int = 4, bias: bool = False):
        super().__init__()
        if out_channels % heads or out_channels % 2:
            raise UsageError(f"SASA: out_channels={out_channels} must be even and divisible by heads={heads}")
        if kernel_size % 2 != 1:
            raise UsageError(f"SASA: kernel_size must be odd, got {kernel_size}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.heads = kernel_size, heads
        self.query = nn.Conv2d(in_channels, out_channels, 1, bias=bias)
        self.key = nn.Conv2d(in_channels, out_channels, 1, bias=bias)
        self.value = nn.Conv2d(in_channels, out_channels, 1, bias=bias)
        self.rel_h = nn.Parameter(torch.randn(out_channels // 2, kernel_size))
        self.rel_w = nn.Parameter(torch.randn(out_channels // 2, kernel_size))

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, heads={self.heads}"

    def relative_embedding(self) -> Tensor:
        """r [C_out, K]: column a*k + b = concat(rel_h[:, a], rel_w[:, b])."""
        k = self.kernel_size
        rh = self.rel_h.unsqueeze(2).expand(-1, k, k)  # varies with a (dim 1)
        rw = self.rel_w.unsqueeze(1).expand(-1, k, k)  # varies with b (dim 2)
        return torch.cat([rh, rw]).reshape(self.out_channels, k * k)

    def _windows(self, h: int, w: int, device) -> tuple[Tensor, Tensor]:
        idx, valid, _, _ = window_index(h, w, self.kernel_size, 1, "zeros", device)
        return idx, valid

    def _key_bias(self) -> Tensor:
        return self.relative_embedding().view(1, self.heads, -1, self.kernel_size ** 2, 1)  # [1, nh, hd, K, 1]

    def logits(self, x: Tensor) -> Tensor:
        """Attention logits [B, heads, K, H*W]; -inf at window positions outside the image."""
        h, w = x.shape[-2:]
        idx, valid = self._windows(h, w, x.device)
        q = self.query(x).flatten(2).unflatten(1, (self.heads, -1))  # [B, nh, hd, P]
        kb = gather_windows(self.key(x), idx).unflatten(1, (self.heads, -1)) + self._key_bias()
        return (q.unsqueeze(3) * kb).sum(2).masked_fill(~valid, _NEG_INF)

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        idx, valid = self._windows(h, w, x.device)
        q = self.query(x).flatten(2).unflatten(1, (self.heads, -1))
        kb = gather_windows(self.key(x), idx).unflatten(1, (self.heads, -1)) + self._key_bias()
        v = gather_windows(self.value(x), idx).unflatten(1, (self.heads, -1))
        return _local_attention(q, kb, v, valid).reshape(b, self.out_channels, h, w)

    def interval_bounds(self, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
        """Sound bounds of forward(x) for all lower <= x <= upper.

        lower, upper [B, in_channels, H, W] -> (lo, hi) [B, out_channels, H, W]. Exact at lower == upper.
        """
        b, _, h, w = lower.shape
        nh = self.heads
        idx, valid = self._windows(h, w, lower.device)
        ql, qu = conv_bounds(lower, upper, self.query.weight, self.query.bias)
        kl, ku = conv_bounds(lower, upper, self.key.weight, self.key.bias)
        vl, vu = conv_bounds(lower, upper, self.value.weight, self.value.bias)
        ql, qu = ql.flatten(2).unflatten(1, (nh, -1)), qu.flatten(2).unflatten(1, (nh, -1))
        kl, ku = _windows_bounds(kl, ku, idx, nh)
        vl, vu = _windows_bounds(vl, vu, idx, nh)
        r = self._key_bias()
        # second bounds of logits and weights from the input box (centre/radius at queries and windows)
        c, rad = (upper + lower) / 2, (upper - lower) / 2
        box = (c.flatten(2), rad.flatten(2), gather_windows(c, idx), gather_windows(rad, idx))
        hd = self.out_channels // nh
        wq, wk = self.query.weight.view(nh, hd, -1), self.key.weight.view(nh, hd, -1)
        bq = None if self.query.bias is None else self.query.bias.view(nh, hd)
        bk = None if self.key.bias is None else self.key.bias.view(nh, hd)
        logit_box = bilinear_logit_bounds(*box, wq, bq, wk, bk, r)
        weight_box = logit_difference_softmax_bounds(*box, wq, bq, wk, r, valid)
        lo, hi = _local_attention_bounds(ql, qu, kl + r, ku + r, vl, vu, valid, logit_box, weight_box)
        return lo.reshape(b, self.out_channels, h, w), hi.reshape(b, self.out_channels, h, w)


# ----------------------------------------------------------------------------------------------------
# Zoo
# ----------------------------------------------------------------------------------------------------


def _small_attention_net(block: nn.Module, in_shape, num_classes, mean, std, width: int = 16) -> nn.Sequential:
    """Normalize, conv 3x3 s2 + ReLU, block + ReLU, avg-pool 2, FC 100 + ReLU, FC classes."""
    feats = nn.Sequential(
        Normalize(mean, std),
        nn.Conv2d(in_shape[0], width, 3, stride=2, padding=1),
        nn.ReLU(),
        block,
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
    )
    with torch.no_grad():
        n = int(feats(torch.zeros(1, *in_shape)).numel())
    return nn.Sequential(*feats, nn.Linear(n, 100), nn.ReLU(), nn.Linear(100, num_classes))


@register("acmix-s", "ACmix-S: conv 16 s2, ACmix 16 (window 5, 4 heads), avg-pool 2, FC 100, FC classes")
def acmix_s(in_shape, num_classes, mean, std, kernel_att: int = 5):
    return _small_attention_net(ACmix(16, 16, kernel_att=kernel_att, head=4), in_shape, num_classes, mean, std)


@register("sasa-s", "SASA-S: conv 16 s2, SASA 16 (window 5, 4 heads), avg-pool 2, FC 100, FC classes")
def sasa_s(in_shape, num_classes, mean, std, kernel_size: int = 5):
    return _small_attention_net(SASA(16, 16, kernel_size=kernel_size, heads=4), in_shape, num_classes, mean, std)
