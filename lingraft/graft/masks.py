"""Graft masks on disk (JSON, flat indices per layer) and their check against a model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import Tensor, nn

from lingraft.errors import LingraftError, UsageError
from lingraft.graft.scores import relu_modules
from lingraft.io.files import atomic_write_json

__all__ = ["MASK_FORMAT", "save_masks", "load_masks", "check_masks_fit"]

MASK_FORMAT = "lingraft-graft-mask"


def save_masks(path, masks: dict[str, Tensor], meta: dict | None = None) -> None:
    """Write masks as JSON: {"format": "lingraft-graft-mask", "masks": {layer: {"shape": [...],
    "grafted": [flat indices]}}}."""
    atomic_write_json(
        path,
        {
            "format": MASK_FORMAT,
            "version": 1,
            "meta": meta or {},
            "masks": {
                n: {"shape": list(m.shape), "grafted": torch.nonzero(m.flatten()).flatten().tolist()}
                for n, m in masks.items()
            },
        },
    )


def load_masks(path) -> dict[str, Tensor]:
    """The masks {layer: bool tensor of the layer's activation shape} written by :func:`save_masks`."""
    p = Path(path)
    try:
        d = json.loads(p.read_text())
    except FileNotFoundError:
        raise LingraftError(f"mask file not found: {p}") from None
    except (ValueError, UnicodeDecodeError):
        raise LingraftError(
            f"mask file {p} is not JSON; write one with 'lingraft graft ... --save-mask FILE'"
        ) from None
    if not isinstance(d, dict) or d.get("format") != MASK_FORMAT:
        raise LingraftError(f"{p} is not a lingraft graft mask (format 'lingraft-graft-mask')")
    out = {}
    try:
        for n, v in d["masks"].items():
            m = torch.zeros(int(math.prod(v["shape"])), dtype=torch.bool)
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in v["grafted"]):
                raise ValueError  # 2.7 is no neuron index: refuse instead of truncating
            idx = torch.tensor(v["grafted"], dtype=torch.long)
            if idx.numel() and (idx.min() < 0 or idx.max() >= m.numel()):
                raise ValueError
            m[idx] = True
            out[n] = m.reshape(v["shape"])
    except (KeyError, TypeError, ValueError):
        raise LingraftError(f"mask file {p} is malformed (layer entries need 'shape' and in-range 'grafted')") from None
    return out


def check_masks_fit(model: nn.Module, masks: dict[str, Tensor], in_shape) -> None:
    """Raise UsageError unless every mask names a ReLU module of ``model`` with the right activation shape."""
    relus = relu_modules(model)
    shapes = {}
    hs = [
        m.register_forward_hook(lambda mod, i, o, n=n: shapes.__setitem__(n, tuple(o.shape[1:])))
        for n, m in relus.items()
    ]
    with torch.no_grad():
        model(torch.zeros(1, *in_shape, device=next(model.parameters()).device))
    for h in hs:
        h.remove()
    for n, m in masks.items():
        if n not in relus:
            raise UsageError(f"mask layer {n!r} is not a ReLU of this model (layers: {', '.join(relus)})")
        if tuple(m.shape) != shapes[n]:
            raise UsageError(f"mask layer {n!r} has shape {tuple(m.shape)} but the model's activation is {shapes[n]}")
