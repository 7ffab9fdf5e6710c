"""Local self-attention layers (ACmix, SASA), their interval (IBP) bounds, and two small zoo nets.

* :class:`ACmix` -- Pan et al., "On the Integration of Self-Attention and Convolution" (arXiv 2111.14556),
  re-implemented from the paper and the semantics of the official ResNet code (LeapLabTHU/ACmix).
* :class:`SASA` -- Ramachandran et al., "Stand-Alone Self-Attention in Vision Models" (arXiv 1906.05909).

Both attend, for every output pixel, over the k x k window centred on it. Windows are formed by one
gather with a precomputed index (:func:`window_index`) instead of pad + unfold, so the forward pass and
the bounds share the same indexing and any spatial size (odd, even, smaller than the window) works.

Each layer has ``interval_bounds(lower, upper)``: sound elementwise bounds of ``forward(x)`` for every
``x`` in the box, which the bound engine uses as an opaque leaf. The layers only gather the boxes per
window; the interval rules live in the bound engine (:mod:`lingraft.bounds.ops.attention`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lingraft.bounds.ops.attention import AttentionLogits, conv_bounds, local_attention_interval, scale_bounds
from lingraft.errors import UsageError
from lingraft.models import register
from lingraft.models.layers import Normalize

_NEG_INF = float("-inf")

# ----------------------------------------------------------------------------------------------------
# Windows
# ----------------------------------------------------------------------------------------------------


def window_index(
    h: int, w: int, k: int, stride: int = 1, padding: str = "zeros", device: torch.device | None = None
) -> tuple[Tensor, Tensor, int, int]:
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
        raise UsageError(
            f"reflect padding of {r} needs a feature map larger than {r}x{r}, got {h}x{w}; use padding='zeros'"
        )
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


def _local_attention(q: Tensor, kb: Tensor, v: Tensor, valid: Tensor) -> Tensor:
    """Forward of one local attention: q [B, h, d, P], kb (keys + logit bias) [B, h, d, K, P], v [B, h, d, K, P],
    valid [K, P] -> [B, h, d, P]."""
    logits = (q.unsqueeze(3) * kb).sum(2)  # [B, h, K, P]
    att = logits.masked_fill(~valid, _NEG_INF).softmax(2)
    return (att.unsqueeze(2) * v).sum(3)


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

    def __init__(
        self,
        in_planes: int,
        out_planes: int,
        kernel_att: int = 7,
        head: int = 4,
        kernel_conv: int = 3,
        stride: int = 1,
        padding: str = "reflect",
    ):
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
        return (
            f"{self.in_planes}, {self.out_planes}, kernel_att={self.kernel_att}, head={self.head}, "
            f"kernel_conv={self.kernel_conv}, stride={self.stride}, padding={self.padding!r}"
        )

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
        f = f.permute(0, 2, 1, 3).reshape(b, hd * self.kernel_conv**2, h, w)  # channel d*kk + i
        out_conv = self._dep_conv(f, self.shift_weight)

        return self.rate1 * out_att + self.rate2 * out_conv

    # -- bounds ------------------------------------------------------------------------------------------

    def _conv_path_affine(self) -> tuple[Tensor, Tensor]:
        """The conv path up to dep_conv as ONE 1x1 conv of x: (weight [hd*kk, C_in, 1, 1], bias [hd*kk]).

        q, k, v and fc are all linear per pixel, so composing them first makes the interval of f exact
        (propagating intervals through q/k/v and then fc separately would lose their correlation).
        """
        nh, hd, kk = self.head, self.head_dim, self.kernel_conv**2
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
        # the input box (centre/radius) at queries and windows gives second bounds of logits and weights
        c, rad = (upper + lower) / 2, (upper - lower) / 2
        query_input = (self._query_positions(c, h_out, w_out), self._query_positions(rad, h_out, w_out))
        al, au = local_attention_interval(
            (ql, qu),
            _windows_bounds(kl, ku, idx, nh),
            _windows_bounds(vl, vu, idx, nh),
            valid,
            query_input,
            (gather_windows(c, idx), gather_windows(rad, idx)),
            AttentionLogits(
                self.conv1.weight.view(nh, hd, -1),
                self.conv1.bias.view(nh, hd),
                self.conv2.weight.view(nh, hd, -1),
                self.conv2.bias.view(nh, hd),
                key_bias=self._pe_delta(h, w, idx, lower),
                scale=scaling,
            ),
        )
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
        return self.relative_embedding().view(1, self.heads, -1, self.kernel_size**2, 1)  # [1, nh, hd, K, 1]

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
        # the input box (centre/radius) at queries and windows gives second bounds of logits and weights
        c, rad = (upper + lower) / 2, (upper - lower) / 2
        hd = self.out_channels // nh
        bq = None if self.query.bias is None else self.query.bias.view(nh, hd)
        bk = None if self.key.bias is None else self.key.bias.view(nh, hd)
        lo, hi = local_attention_interval(
            (ql, qu),
            _windows_bounds(kl, ku, idx, nh),
            _windows_bounds(vl, vu, idx, nh),
            valid,
            (c.flatten(2), rad.flatten(2)),
            (gather_windows(c, idx), gather_windows(rad, idx)),
            AttentionLogits(
                self.query.weight.view(nh, hd, -1), bq, self.key.weight.view(nh, hd, -1), bk, self._key_bias()
            ),
        )
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
