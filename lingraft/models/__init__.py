"""Model registry (timm-style): ``@register`` a constructor, build it with ``create_model``.

Every constructor takes ``in_shape`` (C, H, W), ``num_classes``, ``mean`` and ``std`` (per channel) and
returns an ``nn.Module`` whose first layer is :class:`lingraft.models.layers.Normalize`, so inputs are in
[0, 1] pixel space. ReLUs are separate ``nn.ReLU`` modules so that grafting can replace them.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from lingraft.errors import UsageError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_DESCRIPTIONS: dict[str, str] = {}


def register(name: str, description: str = ""):
    """Decorator: register a model constructor under ``name``."""

    def deco(fn):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = fn
        _DESCRIPTIONS[name] = description or (fn.__doc__ or "").strip().splitlines()[0]
        return fn

    return deco


def list_models() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def describe_model(name: str) -> str:
    _load_all()
    return _DESCRIPTIONS.get(name, "")


def create_model(name: str, in_shape=(1, 28, 28), num_classes: int = 10, mean=(0.0,), std=(1.0,), **kw) -> nn.Module:
    """Build registry model ``name`` for inputs of ``in_shape`` = (C, H, W)."""
    _load_all()
    if name not in _REGISTRY:
        import difflib

        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UsageError(f"unknown model {name!r}{hint}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](in_shape=tuple(in_shape), num_classes=num_classes, mean=mean, std=std, **kw)


def _load_all():
    from lingraft.models import attention, zoo  # noqa: F401  (register on import)
