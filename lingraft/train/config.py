"""The settings of a training run (:class:`TrainConfig`) and their validation."""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field

from lingraft.errors import UsageError

__all__ = ["TrainConfig", "config_from_dict", "check_choice", "did_you_mean", "METHODS", "OPTIMIZERS", "SCHEDULES"]

METHODS = ("ce", "fgsm", "pgd")
OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("cosine", "step", "none")


@dataclass
class TrainConfig:
    """Everything that determines a training run. eps is the L-inf radius in [0, 1] pixel space."""

    arch: str
    dataset: str
    epochs: int = 5
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float | None = None  # None: 0.1 for sgd, 1e-3 for adam
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # per-iteration cosine, step (x0.1 at 50% and 75%), none
    method: str = "ce"  # ce | fgsm | pgd
    eps: float = 0.1  # training (and PGD-validation) radius
    grad_align: float = 0.2  # GradAlign weight (method fgsm only; 0 disables)
    fgsm_step: float = 1.25  # FGSM step = fgsm_step * eps
    pgd_steps: int = 10  # PGD steps for method pgd
    eps_ramp_epochs: float = 1  # linear eps warm-up over this many epochs (0: none)
    loss: str = "ce"  # name in lingraft.train.losses.LOSSES
    loss_kwargs: dict = field(default_factory=dict)  # extra keyword arguments of that loss (e.g. temperature)
    teacher: str | None = None  # checkpoint path, for kd / nkd
    seed: int = 0
    num_train: int | None = None  # use only the first N training images (after holding out validation)
    val_size: int = 1000  # validation = the LAST val_size images of the training split
    data_dir: str | None = None
    device: str = "auto"
    eval_pgd_steps: int = 20  # PGD steps of the per-epoch validation attack

    def __post_init__(self):
        self.optimizer = str(self.optimizer).lower()
        self.method = str(self.method).lower()
        self.schedule = str(self.schedule).lower()
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("method", self.method, METHODS)
        check_choice("schedule", self.schedule, SCHEDULES)
        if self.lr is None:
            self.lr = 0.1 if self.optimizer == "sgd" else 1e-3
        for name in ("epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise UsageError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "eps", "grad_align", "fgsm_step", "eps_ramp_epochs", "weight_decay", "momentum"):
            v = float(getattr(self, name))
            if not math.isfinite(v) or v < 0:
                raise UsageError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise UsageError(f"lr must be > 0, got {self.lr}")
        if self.method != "ce" and self.eps <= 0:
            raise UsageError(f"method {self.method!r} needs eps > 0; set --eps or use --method ce")
        if self.pgd_steps < 1 or self.eval_pgd_steps < 0:
            raise UsageError("pgd_steps must be >= 1 and eval_pgd_steps >= 0")
        if self.val_size < 0 or (self.num_train is not None and self.num_train < 1):
            raise UsageError("val_size must be >= 0 and num_train >= 1")
        self.loss_kwargs = dict(self.loss_kwargs or {})
        if self.teacher is not None:
            self.teacher = str(self.teacher)
        if self.data_dir is not None:
            self.data_dir = str(self.data_dir)


def did_you_mean(value: str, options) -> str:
    """' (did you mean 'x'?)' for the closest of ``options``, or '' when none is close."""
    close = difflib.get_close_matches(value, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_choice(what: str, value: str, options) -> None:
    """UsageError (with a did-you-mean hint) unless ``value`` is one of ``options``."""
    if value not in options:
        raise UsageError(f"unknown {what} {value!r}{did_you_mean(value, options)}; use one of: {', '.join(options)}")


def config_from_dict(d: dict) -> TrainConfig:
    """Build a TrainConfig from a mapping (keys with dashes or underscores); unknown keys -> UsageError."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    kw = {}
    for k, v in d.items():
        key = str(k).replace("-", "_")
        if key not in names:
            raise UsageError(f"unknown training option {k!r}{did_you_mean(key, sorted(names))}")
        kw[key] = v
    for req in ("arch", "dataset"):
        if req not in kw:
            raise UsageError(f"training config needs {req!r}")
    return TrainConfig(**kw)
