"""lingraft's own bound-propagation engine (IBP, CROWN, alpha-CROWN) with exact grafted neurons.

``METHODS`` is importable without torch; the engine names load on first use (so the CLI starts fast).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lingraft.bounds.methods import METHODS

if TYPE_CHECKING:
    from lingraft.bounds.engine import BoundedNetwork, BoundResult
    from lingraft.spec.margin import input_box, margin_spec

__all__ = ["METHODS", "BoundResult", "BoundedNetwork", "input_box", "margin_spec"]

_LAZY = {
    "BoundedNetwork": "lingraft.bounds.engine",
    "BoundResult": "lingraft.bounds.engine",
    "margin_spec": "lingraft.spec.margin",
    "input_box": "lingraft.spec.margin",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
