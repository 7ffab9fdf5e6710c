"""The resume state of a training run (``model.pt.state``): its path, loading, and config compatibility."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from lingraft.errors import LingraftError

__all__ = ["STATE_FORMAT", "RESUMABLE_CHANGES", "state_path_for", "load_state", "config_diff", "to_plain"]

STATE_FORMAT = "lingraft-train-state"
# config fields that may change between an interrupted run and its resumption
RESUMABLE_CHANGES = {"epochs", "device", "data_dir"}


def state_path_for(out_path: Path) -> Path:
    """model.pt -> model.pt.state"""
    return out_path.with_name(out_path.name + ".state")


def load_state(path: Path) -> dict:
    """The state dict saved at ``path``; LingraftError (with how to recover) when unreadable or foreign."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable state: tell the user how to recover
        raise LingraftError(
            f"resume state {path} is unreadable ({type(e).__name__}); delete it to start over or pass --no-resume"
        ) from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise LingraftError(f"{path} is not a lingraft training state; delete it or pass --no-resume")
    return state


def config_diff(saved: dict, now: dict) -> str | None:
    """The first config field (other than RESUMABLE_CHANGES) that differs, as 'key: old -> new'; None if none."""
    for k in sorted(set(saved) | set(now)):
        if k in RESUMABLE_CHANGES:
            continue
        if saved.get(k) != now.get(k):
            return f"{k}: {saved.get(k)!r} -> {now.get(k)!r}"
    return None


def to_plain(o):
    """Tensors/tuples in metric dicts -> JSON-able python values."""
    if isinstance(o, dict):
        return {k: to_plain(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [to_plain(v) for v in o]
    if isinstance(o, Tensor):
        return o.item() if o.numel() == 1 else o.tolist()
    return o
