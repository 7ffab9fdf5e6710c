"""Layers that lingraft adds to plain PyTorch: input normalization and the grafted ReLU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Normalize(nn.Module):
    """Per-channel (x - mean) / std, the first layer of every zoo model.

    Keeping normalization inside the model means eps is always given in [0, 1] pixel space and ONNX
    exports are self-contained.  x: [B, C, ...] -> same shape.
    """

    mean: torch.Tensor  # [C] or [1] buffers (typed here: register_buffer is invisible to type checkers)
    std: torch.Tensor

    def __init__(self, mean, std):
        super().__init__()
        mean = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std = torch.as_tensor(std, dtype=torch.float32).flatten()
        if (std <= 0).any():
            raise ValueError("Normalize: std must be positive")
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def _view(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if t.numel() == 1:
            return t.reshape(())
        return t.reshape((1, -1) + (1,) * (x.dim() - 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self._view(self.mean, x)) / self._view(self.std, x)

    def extra_repr(self) -> str:
        return f"mean={self.mean.tolist()}, std={self.std.tolist()}"


def is_binary_mask(mask: torch.Tensor) -> bool:
    """Whether every entry of ``mask`` is exactly 0 or 1 (NaN is not)."""
    return bool(torch.all((mask == 0) | (mask == 1)))


def first_non_binary(mask: torch.Tensor) -> float:
    """The first entry of ``mask`` that is neither 0 nor 1 (for error messages)."""
    flat = mask.detach().reshape(-1)
    bad = ~((flat == 0) | (flat == 1))
    return float(flat[bad][0]) if bool(bad.any()) else 0.0


class GraftedReLU(nn.Module):
    """A ReLU layer in which some neurons are replaced by learnable linear functions.

    Per neuron (shape = the layer's per-sample activation shape, e.g. [C, H, W]):
      mask m in {0, 1}: 1 = grafted neuron, computes a * x + b (exact linear, never relaxed or branched);
                        0 = ordinary ReLU.
    The forward is written as relu(s * x) + t * x + c with s = 1 - m, t = m * a, c = m * b: the same
    function, and the form that exports to plain ONNX (Mul, Relu, Add) and that auto_LiRPA bounds.
    x: [B, *shape] -> [B, *shape].
    """

    mask: torch.Tensor  # [*shape] buffer (typed here: register_buffer is invisible to type checkers)

    def __init__(self, shape, mask: torch.Tensor | None = None, init_a: float = 0.4, init_b: float = 0.0):
        super().__init__()
        shape = tuple(int(s) for s in shape)
        self.shape = shape
        m = torch.zeros(shape) if mask is None else mask.detach().float().reshape(shape).clone()
        if not is_binary_mask(m):
            raise ValueError("GraftedReLU: mask must be 0/1")
        self.register_buffer("mask", m)
        self.a = nn.Parameter(torch.full(shape, float(init_a)))
        self.b = nn.Parameter(torch.full(shape, float(init_b)))

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # load_state_dict copies buffers without the constructor's check; a mask that is not 0/1 would make the
        # module compute relu((1-m)x) + m(ax+b) while the bound engine bounds a*x+b wherever m > 0.5
        m = state_dict.get(prefix + "mask")
        if isinstance(m, torch.Tensor) and not is_binary_mask(m):
            error_msgs.append(
                f"GraftedReLU {prefix.rstrip('.') or '(root)'!r}: mask holds values other than 0/1 "
                f"(e.g. {first_non_binary(m):g}); a mask must be 0/1 (1 = grafted)"
            )
            return
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    @property
    def num_grafted(self) -> int:
        return int(self.mask.sum().item())

    @property
    def num_neurons(self) -> int:
        return int(self.mask.numel())

    def coefficients(self):
        """(s, t, c), each of `shape`: output = relu(s * x) + t * x + c."""
        m = self.mask
        return 1.0 - m, m * self.a, m * self.b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, t, c = self.coefficients()
        return F.relu(x * s) + x * t + c

    def extra_repr(self) -> str:
        return f"shape={self.shape}, grafted={self.num_grafted}/{self.num_neurons}"
