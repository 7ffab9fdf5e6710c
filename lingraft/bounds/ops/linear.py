"""Affine operators with a weight matrix: Linear (on the last dimension) and Conv2d."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lingraft.bounds.linear_bounds import LinearBounds, add_constant
from lingraft.bounds.ops.base import AffineMapOp, Bounds, sum_trailing


class LinearOp(AffineMapOp):
    """y = x @ W^T + b on the last dimension.  x: [B, *lead, n_in] -> y: [B, *lead, n_out]."""

    def __init__(self, weight: Tensor, bias: Tensor | None):
        self.weight = weight.detach()  # [n_out, n_in]
        self.bias = None if bias is None else bias.detach()

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)

    def ibp(self, b):
        lo, up = b
        c, r = (up + lo) / 2, (up - lo) / 2
        yc = F.linear(c, self.weight, self.bias)
        yr = F.linear(r, self.weight.abs())
        return yc - yr, yc + yr

    def _back(self, A):
        Ax = A.matmul(self.weight)
        bias = 0 if self.bias is None else sum_trailing(A * self.bias)
        return Ax, bias

    def identity_backward(self, rows: Tensor, batch: int, out_shape):
        """A at the input for the unit rows ``rows`` (flat indices into the output) without materialising
        the identity: returns ([B, R, *in_shape], bias [B, R])."""
        if len(out_shape) != 1:
            return None
        A = self.weight[rows].unsqueeze(0).expand(batch, -1, -1)
        bias = (
            torch.zeros(batch, len(rows), dtype=A.dtype, device=A.device)
            if self.bias is None
            else self.bias[rows].unsqueeze(0).expand(batch, -1)
        )
        return A, bias

    def describe(self):
        return f"Linear({self.weight.shape[1]}->{self.weight.shape[0]})"

    def forward_linear(self, ins: list[LinearBounds], refs: list[Bounds], ibp: Bounds) -> LinearBounds:
        (x,) = ins
        mid = add_constant(F.linear(x.mid, self.weight), self.bias)
        return LinearBounds(mid, None if x.rad is None else F.linear(x.rad, self.weight.abs()))


class ConvOp(AffineMapOp):
    """2-D convolution.  x: [B, C_in, H, W] -> y: [B, C_out, H_out, W_out]."""

    patchable = True

    def __init__(self, weight, bias, stride, padding, groups, in_shape, out_shape):
        self.weight = weight.detach()
        self.bias = None if bias is None else bias.detach()
        self.stride = tuple(stride)
        self.padding = tuple(padding)
        self.groups = int(groups)
        self.in_shape = tuple(in_shape)
        self.out_shape = tuple(out_shape)
        k = self.weight.shape[2:]
        # output_padding recovers the exact input size in the transposed convolution
        self.output_padding = tuple(
            self.in_shape[1 + i] - ((self.out_shape[1 + i] - 1) * self.stride[i] - 2 * self.padding[i] + k[i])
            for i in range(2)
        )

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, 1, self.groups)

    def ibp(self, b):
        lo, up = b
        c, r = (up + lo) / 2, (up - lo) / 2
        yc = F.conv2d(c, self.weight, self.bias, self.stride, self.padding, 1, self.groups)
        yr = F.conv2d(r, self.weight.abs(), None, self.stride, self.padding, 1, self.groups)
        return yc - yr, yc + yr

    def _back(self, A):
        B, S = A.shape[:2]
        Af = A.reshape(B * S, *self.out_shape)
        Ax = conv_backward(Af, self.weight, self.stride, self.padding, self.groups, self.in_shape[1:])
        Ax = Ax.reshape(B, S, *self.in_shape)
        bias = 0 if self.bias is None else (A.sum((3, 4)) * self.bias).sum(-1)
        return Ax, bias

    def identity_backward(self, rows: Tensor, batch: int, out_shape):
        """Place each selected output neuron's kernel in the input plane directly (no transposed conv of a
        one-hot tensor): returns ([B, R, *in_shape], bias [B, R])."""
        if self.groups != 1:
            return None
        C_out, H_out, W_out = self.out_shape
        C_in, H_in, W_in = self.in_shape
        kh, kw = self.weight.shape[2:]
        sh, sw = self.stride
        ph, pw = self.padding
        R = rows.numel()
        c = rows // (H_out * W_out)
        i = (rows // W_out) % H_out
        j = rows % W_out
        Hp, Wp = H_in + 2 * ph + kh, W_in + 2 * pw + kw
        A = torch.zeros(R, C_in, Hp, Wp, dtype=self.weight.dtype, device=self.weight.device)
        ridx = torch.arange(R, device=rows.device)
        # scatter the kernel of row r at padded offset (i*sh, j*sw); loop over the kernel taps (kh*kw small)
        for di in range(kh):
            for dj in range(kw):
                A[ridx, :, i * sh + di, j * sw + dj] = self.weight[c, :, di, dj]
        A = A[:, :, ph : ph + H_in, pw : pw + W_in]
        A = A.unsqueeze(0).expand(batch, -1, -1, -1, -1)
        bias = (
            torch.zeros(batch, R, dtype=A.dtype, device=A.device)
            if self.bias is None
            else self.bias[c].unsqueeze(0).expand(batch, -1)
        )
        return A, bias

    @property
    def starts_patches(self) -> bool:  # type: ignore[override]
        """A patch-mode pass starts at an ungrouped convolution (patch_start gives its kernels)."""
        return self.groups == 1

    def patch_start(self, rows):
        """Kernel patches [1, R, C_in, kh, kw] of the output neurons ``rows`` (flat indices) at the input, their
        top-left y0, x0 [R] in the input plane and bias [1, R] (the patches are shared by the batch)."""
        C_out, H_out, W_out = self.out_shape
        c = rows // (H_out * W_out)
        i = (rows // W_out) % H_out
        j = rows % W_out
        vals = self.weight[c].unsqueeze(0)
        y0 = i * self.stride[0] - self.padding[0]
        x0 = j * self.stride[1] - self.padding[1]
        bias = torch.zeros(1, rows.numel(), device=vals.device) if self.bias is None else self.bias[c].unsqueeze(0)
        return vals, y0, x0, bias

    def patch_backward(self, pp, k):
        """Grow the patches through the kernel: [B, R, C_out, kh, kw] -> [B, R, C_in, (kh-1)*s + k, (kw-1)*s + k]."""
        if self.bias is not None:
            pp.lb = pp.lb + (pp.lP.sum((-1, -2)) * self.bias).sum(-1)
            pp.ub = pp.ub + (pp.uP.sum((-1, -2)) * self.bias).sum(-1)
        lP = self._patch_back(pp.lP)
        pp.uP = self._patch_back(pp.uP) if pp.uP is not pp.lP else lP
        pp.lP = lP
        pp.y0 = pp.y0 * self.stride[0] - self.padding[0]
        pp.x0 = pp.x0 * self.stride[1] - self.padding[1]

    def patch_size(self, kh, kw):
        k = self.weight.shape[2:]
        return (kh - 1) * self.stride[0] + int(k[0]), (kw - 1) * self.stride[1] + int(k[1])

    def _patch_back(self, P: Tensor) -> Tensor:
        """[B, R, C_out, kh, kw] -> [B, R, C_in, (kh-1)*s + k, (kw-1)*s + k]."""
        Bp, R, _, kh, kw = P.shape
        k = self.weight.shape[2:]
        out_hw = ((kh - 1) * self.stride[0] + k[0], (kw - 1) * self.stride[1] + k[1])
        out = conv_backward(P.reshape(Bp * R, *P.shape[2:]), self.weight, self.stride, (0, 0), self.groups, out_hw)
        return out.reshape(Bp, R, *out.shape[1:])

    def describe(self):
        c_in, c_out = self.weight.shape[1] * self.groups, self.weight.shape[0]
        return f"Conv2d({c_in}->{c_out}, k={tuple(self.weight.shape[2:])}, s={self.stride}, p={self.padding})"

    def forward_linear(self, ins: list[LinearBounds], refs: list[Bounds], ibp: Bounds) -> LinearBounds:
        (x,) = ins
        B, m = x.mid.shape[:2]

        def conv(t: Tensor, w: Tensor) -> Tensor:  # the n + 1 coefficient rows as extra batch entries
            y = F.conv2d(t.reshape(B * m, *t.shape[2:]), w, None, self.stride, self.padding, 1, self.groups)
            return y.reshape(B, m, *y.shape[1:])

        mid = add_constant(conv(x.mid, self.weight), None if self.bias is None else self.bias.reshape(-1, 1, 1))
        return LinearBounds(mid, None if x.rad is None else conv(x.rad, self.weight.abs()))


def conv_backward(A: Tensor, weight: Tensor, stride, padding, groups: int, out_hw) -> Tensor:
    """Transposed convolution of coefficient maps A [N, C_out, h, w] -> [N, C_in, *out_hw].

    For few input channels (the first layers) a matmul + col2im (F.fold) is much faster on CPU than
    conv_transpose2d; otherwise conv_transpose2d. Under autograd (alpha-CROWN) always conv_transpose2d: the
    backward of F.fold is im2col, which is orders of magnitude slower than conv_transpose2d's backward here.
    """
    N, C_out, h, w = A.shape
    C_in_g, kh, kw = weight.shape[1:]
    stride, padding = tuple(stride), tuple(padding)
    if groups == 1 and C_in_g <= 4 and not (A.requires_grad and torch.is_grad_enabled()):
        cols = torch.matmul(A.reshape(N, C_out, h * w).transpose(1, 2), weight.reshape(C_out, C_in_g * kh * kw))
        return F.fold(cols.transpose(1, 2), tuple(out_hw), (kh, kw), padding=padding, stride=stride)
    out_pad = tuple(int(out_hw[i]) - (((h, w)[i] - 1) * stride[i] - 2 * padding[i] + (kh, kw)[i]) for i in range(2))
    return F.conv_transpose2d(A, weight, None, stride, padding, out_pad, groups)
