"""Robustness specifications: input boxes and margin matrices."""

from __future__ import annotations

import torch
from torch import Tensor


def margin_spec(labels: Tensor, num_classes: int) -> Tensor:
    """C [B, K-1, K] with rows e_y - e_j for every j != y: C @ f(x) > 0 for all rows <=> f classifies x as y."""
    B = labels.shape[0]
    eye = torch.eye(num_classes, device=labels.device)
    C = eye[labels].unsqueeze(1) - eye.unsqueeze(0)  # [B, K, K]: row j = e_y - e_j
    others = torch.ones(B, num_classes, dtype=torch.bool, device=labels.device)
    others[torch.arange(B), labels] = False
    return C[others].reshape(B, num_classes - 1, num_classes)


def input_box(x: Tensor, eps: float, x_min: float = 0.0, x_max: float = 1.0) -> tuple[Tensor, Tensor]:
    """L-inf ball around x [B, *in] intersected with the valid pixel range."""
    return (x - eps).clamp(x_min, x_max), (x + eps).clamp(x_min, x_max)
