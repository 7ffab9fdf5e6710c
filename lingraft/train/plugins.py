"""Loss plugins: the seam between the training loop and lingraft.train.losses.

A :class:`LossPlugin` computes the logits (``forward``) and the loss (``loss``) of a batch and may add trainable
parameters (e.g. USKD's weak head) and forward hooks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lingraft.errors import UsageError
from lingraft.train.config import did_you_mean

__all__ = ["LossPlugin", "RegistryLoss", "make_loss_plugin"]


class LossPlugin:
    """Computes the training loss of a batch. The base class is plain cross-entropy.

    Life cycle: ``setup`` once (may register hooks and return extra trainable parameters), then per batch
    ``logits = forward(model, x)`` and ``loss(model, x, y, logits)`` (x [B, C, H, W] = the possibly attacked
    inputs, y [B], logits [B, K]); ``state_dict``/``load_state_dict`` carry extra parameters across resumes.
    """

    name = "ce"

    def setup(
        self, model: nn.Module, *, in_shape: tuple, num_classes: int, device: torch.device, teacher: nn.Module | None
    ) -> list[nn.Parameter]:
        return []

    def forward(self, model: nn.Module, x: Tensor) -> Tensor:
        return model(x)

    def loss(self, model: nn.Module, x: Tensor, y: Tensor, logits: Tensor) -> Tensor:
        return F.cross_entropy(logits, y)

    def train(self, mode: bool = True) -> None:
        """Called with the model's mode (extra modules follow it)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def close(self) -> None:
        """Remove hooks."""


class RegistryLoss(LossPlugin):
    """Adapter for a loss in ``lingraft.train.losses.LOSSES``, dispatching on what it needs:

    plain: fn(logits, y); teacher (kd, nkd): fn(logits, teacher_logits, y); "weak" (uskd): fn(logits, weak_logits, y)
    with a trainable linear head on the (global-average-pooled) output of ``uskd_feature_layer(model)``;
    "dense" (zipf): fn(logits, dense_logits, y), dense logits from ``split_at_flatten`` (MLPs: the detached logits).
    """

    def __init__(self, name: str, kwargs: dict | None = None):
        try:
            from lingraft.train import losses
        except ImportError:
            raise UsageError(
                f"loss {name!r} needs lingraft.train.losses, which is not installed; use --loss ce"
            ) from None
        if name not in losses.LOSSES:
            raise UsageError(
                f"unknown loss {name!r}{did_you_mean(name, losses.LOSSES)}; use one of: {', '.join(losses.LOSSES)}"
            )
        self._losses = losses
        self.name = name
        self.fn = losses.LOSSES[name]
        self.kwargs = dict(kwargs or {})
        self.teacher_needed = bool(getattr(losses, "needs_teacher", lambda n: False)(name))
        self.features = getattr(losses, "needs_features", lambda n: None)(name)
        self.teacher: nn.Module | None = None
        self.weak_head: nn.Linear | None = None
        self._split: tuple[nn.Module, nn.Module] | None = None
        self._stash: dict[str, Tensor] = {}
        self._hooks: list[Any] = []

    def setup(self, model, *, in_shape, num_classes, device, teacher):
        if self.teacher_needed:
            if teacher is None:
                raise UsageError(f"loss {self.name!r} needs a teacher; pass --teacher CHECKPOINT")
            self.teacher = teacher
        if self.features == "weak":
            layer = self._losses.uskd_feature_layer(model)
            self._hooks.append(layer.register_forward_hook(lambda m, i, o: self._stash.__setitem__("weak", o)))
            was_training = model.training
            model.eval()
            with torch.no_grad():
                model(torch.zeros(1, *in_shape, device=device))
            model.train(was_training)
            dim = self._pool(self._stash.pop("weak")).shape[1]
            self.weak_head = nn.Linear(dim, num_classes).to(device)
            return list(self.weak_head.parameters())
        if self.features == "dense":
            if any(isinstance(m, nn.Conv2d) for m in model.modules()):
                self._split = self._losses.split_at_flatten(model)
        return []

    @staticmethod
    def _pool(feat: Tensor) -> Tensor:
        return feat.mean(dim=tuple(range(2, feat.dim()))) if feat.dim() > 2 else feat.flatten(1)

    def forward(self, model, x):
        if self._split is not None:
            feats, head = self._split
            f = feats(x)
            self._stash["dense_features"] = f
            return head(f)
        return model(x)

    def loss(self, model, x, y, logits):
        if self.teacher_needed:
            with torch.no_grad():
                t_logits = self.teacher(x)
            return self.fn(logits, t_logits, y, **self.kwargs)
        if self.features == "weak":
            weak_logits = self.weak_head(self._pool(self._stash.pop("weak")))
            return self.fn(logits, weak_logits, y, **self.kwargs)
        if self.features == "dense":
            if self._split is not None:
                dense = self._losses.dense_logits_from_head(self._stash.pop("dense_features").detach(), self._split[1])
            else:
                dense = logits.detach()  # MLP variant: rank the model's own logits
            return self.fn(logits, dense, y, **self.kwargs)
        return self.fn(logits, y, **self.kwargs)

    def train(self, mode=True):
        if self.weak_head is not None:
            self.weak_head.train(mode)

    def state_dict(self):
        return {"weak_head": self.weak_head.state_dict()} if self.weak_head is not None else {}

    def load_state_dict(self, state):
        if self.weak_head is not None and "weak_head" in state:
            self.weak_head.load_state_dict(state["weak_head"])

    def close(self):
        for h in self._hooks:
            h.remove()
        self._hooks.clear()


def make_loss_plugin(name: str, kwargs: dict | None = None) -> LossPlugin:
    """'ce' without kwargs -> the built-in CE plugin (works without lingraft.train.losses); else a
    :class:`RegistryLoss`."""
    if name == "ce" and not kwargs:
        return LossPlugin()
    return RegistryLoss(name, kwargs)
