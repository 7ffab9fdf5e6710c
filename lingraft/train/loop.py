"""Training: clean (CE), FGSM (+ GradAlign) and PGD adversarial training, with pluggable losses and exact resume.

``train(config, "model.pt")`` writes the best checkpoint to ``model.pt`` (+ ``model.json`` sidecar) and a resume
state to ``model.pt.state`` (model, optimizer, scheduler, RNG, best weights, history, and the position inside the
current epoch). The state is written atomically after every epoch, every ``state_every_s`` seconds, and when the
run is interrupted (Ctrl-C) between optimizer steps, so a rerun with the same out_path continues where it stopped
and produces the same weights as an uninterrupted run (same device and thread count).

Loss plugins (the seam for lingraft.train.losses): a :class:`LossPlugin` computes the logits (``forward``) and the loss
(``loss``) of a batch and may add trainable parameters (e.g. USKD's weak head) and forward hooks.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lingraft import __version__
from lingraft.train.attack import fgsm, pgd_attack
from lingraft.io.checkpoint import load_checkpoint, save_checkpoint
from lingraft.data.datasets import dataset_info, load_dataset
from lingraft.errors import LingraftError, UsageError
from lingraft.io.files import atomic_write

__all__ = ["TrainConfig", "train", "evaluate", "pick_device", "grad_align_reg", "LossPlugin", "make_loss_plugin",
           "STATE_FORMAT"]

STATE_FORMAT = "lingraft-train-state"
_METHODS = ("ce", "fgsm", "pgd")
_OPTIMIZERS = ("sgd", "adam")
_SCHEDULES = ("cosine", "step", "none")
# config fields that may change between an interrupted run and its resumption
_RESUMABLE_CHANGES = {"epochs", "device", "data_dir"}


@dataclass
class TrainConfig:
    """Everything that determines a training run. eps is the L-inf radius in [0, 1] pixel space."""

    arch: str
    dataset: str
    epochs: int = 5
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float | None = None          # None: 0.1 for sgd, 1e-3 for adam
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"         # per-iteration cosine, step (x0.1 at 50% and 75%), none
    method: str = "ce"               # ce | fgsm | pgd
    eps: float = 0.1                 # training (and PGD-validation) radius
    grad_align: float = 0.2          # GradAlign weight (method fgsm only; 0 disables)
    fgsm_step: float = 1.25          # FGSM step = fgsm_step * eps
    pgd_steps: int = 10              # PGD steps for method pgd
    eps_ramp_epochs: float = 1       # linear eps warm-up over this many epochs (0: none)
    loss: str = "ce"                 # name in lingraft.train.losses.LOSSES
    loss_kwargs: dict = field(default_factory=dict)  # extra keyword arguments of that loss (e.g. temperature)
    teacher: str | None = None       # checkpoint path, for kd / nkd
    seed: int = 0
    num_train: int | None = None     # use only the first N training images (after holding out validation)
    val_size: int = 1000             # validation = the LAST val_size images of the training split
    data_dir: str | None = None
    device: str = "auto"
    eval_pgd_steps: int = 20         # PGD steps of the per-epoch validation attack

    def __post_init__(self):
        self.optimizer = str(self.optimizer).lower()
        self.method = str(self.method).lower()
        self.schedule = str(self.schedule).lower()
        _choice("optimizer", self.optimizer, _OPTIMIZERS)
        _choice("method", self.method, _METHODS)
        _choice("schedule", self.schedule, _SCHEDULES)
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


def _choice(what: str, value: str, options) -> None:
    if value not in options:
        close = difflib.get_close_matches(value, options, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UsageError(f"unknown {what} {value!r}{hint}; use one of: {', '.join(options)}")


def pick_device(device: str = "auto") -> torch.device:
    """'auto' -> cuda if available else cpu; 'cpu'; 'cuda' / 'cuda:N' (UsageError when CUDA is absent)."""
    device = str(device or "auto").lower()
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"device {device!r} requested but CUDA is not available; use --device cpu or auto")
        return torch.device(device)
    if device == "cpu":
        return torch.device("cpu")
    raise UsageError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")


# --------------------------------------------------------------------------------------------- loss plugins

class LossPlugin:
    """Computes the training loss of a batch. The base class is plain cross-entropy.

    Life cycle: ``setup`` once (may register hooks and return extra trainable parameters), then per batch
    ``logits = forward(model, x)`` and ``loss(model, x, y, logits)`` (x [B, C, H, W] = the possibly attacked
    inputs, y [B], logits [B, K]); ``state_dict``/``load_state_dict`` carry extra parameters across resumes.
    """

    name = "ce"

    def setup(self, model: nn.Module, *, in_shape: tuple, num_classes: int, device: torch.device,
              teacher: nn.Module | None) -> list[nn.Parameter]:
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
            raise UsageError(f"loss {name!r} needs lingraft.train.losses, which is not installed; use --loss ce") from None
        if name not in losses.LOSSES:
            close = difflib.get_close_matches(name, list(losses.LOSSES), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UsageError(f"unknown loss {name!r}{hint}; use one of: {', '.join(losses.LOSSES)}")
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
    """'ce' without kwargs -> the built-in CE plugin (works without lingraft.train.losses); else a :class:`RegistryLoss`."""
    if name == "ce" and not kwargs:
        return LossPlugin()
    return RegistryLoss(name, kwargs)


# --------------------------------------------------------------------------------------------- GradAlign

def grad_align_reg(model: nn.Module, x: Tensor, y: Tensor, eps: float, lam: float,
                   generator: torch.Generator | None = None) -> Tensor:
    """GradAlign (Andriushchenko & Flammarion, 2020): lam * (1 - mean cos(grad_x L(x), grad_x L(x + eta))).

    eta ~ U[-eps, eps]^d. As in the official code, the first gradient is taken at the clean x and treated as a
    constant, the second at x + eta with create_graph=True so the regulariser trains the weights; samples
    with a zero gradient are left out of the mean. x [B, ...], y [B] -> scalar.
    """
    x = x.detach()
    with torch.enable_grad():
        x1 = x.clone().requires_grad_(True)
        (g1,) = torch.autograd.grad(F.cross_entropy(model(x1), y), x1)
        noise = torch.rand(x.shape, generator=generator, device=generator.device if generator else x.device)
        x2 = (x + (2 * noise.to(x.device, x.dtype) - 1) * eps).requires_grad_(True)
        (g2,) = torch.autograd.grad(F.cross_entropy(model(x2), y), x2, create_graph=True)
    g1, g2 = g1.detach().flatten(1), g2.flatten(1)
    nz = (g1.norm(dim=1) > 0) & (g2.norm(dim=1) > 0)
    if not nz.any():
        return torch.zeros((), device=x.device)
    cos = F.cosine_similarity(g1[nz], g2[nz], dim=1)
    return lam * (1.0 - cos.mean())


# --------------------------------------------------------------------------------------------- evaluation

def evaluate(model: nn.Module, x: Tensor, y: Tensor, eps: float | None, *, batch_size: int = 256,
             pgd_steps: int = 20, pgd_restarts: int = 1, seed: int = 0) -> dict:
    """Clean and PGD (L-inf, margin loss) accuracy of ``model`` on x [N, ...], y [N].

    The model is evaluated in eval mode (its previous mode is restored). pgd_acc counts samples that are
    correct AND survive the attack; with eps 0/None or pgd_steps 0 it equals clean_acc.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    n = len(x)
    clean = robust = 0
    attack = eps is not None and eps > 0 and pgd_steps > 0
    try:
        for i, start in enumerate(range(0, n, batch_size)):
            xb = x[start:start + batch_size].to(device)
            yb = y[start:start + batch_size].to(device)
            with torch.no_grad():
                ok = model(xb).argmax(dim=1) == yb
            clean += int(ok.sum())
            if attack:
                _, success = pgd_attack(model, xb, yb, eps, steps=pgd_steps, restarts=pgd_restarts,
                                        seed=seed + i)
                robust += int((ok & ~success).sum())
            else:
                robust += int(ok.sum())
    finally:
        model.train(was_training)
    return {"clean_acc": clean / max(n, 1), "pgd_acc": robust / max(n, 1), "n": n}


# --------------------------------------------------------------------------------------------- training

def _lr_factor(schedule: str, total_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        t = min(step, total_steps) / max(total_steps, 1)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * t))
        if schedule == "step":
            return 0.1 ** ((t >= 0.5) + (t >= 0.75))
        return 1.0
    return factor


def _state_path(out_path: Path) -> Path:
    return out_path.with_name(out_path.name + ".state")


def _load_state(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable state: tell the user how to recover
        raise LingraftError(f"resume state {path} is unreadable ({type(e).__name__}); delete it to start over "
                            "or pass --no-resume") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise LingraftError(f"{path} is not a lingraft training state; delete it or pass --no-resume")
    return state


def _config_diff(saved: dict, now: dict) -> str | None:
    for k in sorted(set(saved) | set(now)):
        if k in _RESUMABLE_CHANGES:
            continue
        if saved.get(k) != now.get(k):
            return f"{k}: {saved.get(k)!r} -> {now.get(k)!r}"
    return None


def _to_plain(o):
    """Tensors/tuples in metric dicts -> JSON-able python values."""
    if isinstance(o, dict):
        return {k: _to_plain(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_to_plain(v) for v in o]
    if isinstance(o, Tensor):
        return o.item() if o.numel() == 1 else o.tolist()
    return o


def _score(cfg: TrainConfig, metrics: dict) -> tuple[float, float]:
    if cfg.method != "ce":
        return (metrics["val_pgd_acc"], metrics["val_clean_acc"])
    return (metrics["val_clean_acc"], metrics["val_pgd_acc"])


def train(config: TrainConfig, out_path, *, progress: bool = True, log: Callable[[str], None] = print,
          resume: bool = True, meta: dict | None = None, loss_plugin: LossPlugin | None = None,
          stop_after_epochs: int | None = None, state_every_s: float = 300.0) -> dict:
    """Train ``config.arch`` on ``config.dataset`` and save the best checkpoint to ``out_path``.

    Best = highest validation PGD accuracy for fgsm/pgd (ties: clean), highest clean accuracy for ce.
    ``meta`` (e.g. {"command": "..."}) is stored in the checkpoint next to the config, the per-epoch history and
    the training time. ``loss_plugin`` overrides ``config.loss``. ``stop_after_epochs`` ends this call after that
    many more epochs (the state file lets a later call continue). Returns the metrics dict (also in meta).
    """
    if not isinstance(config, TrainConfig):
        raise UsageError("train() needs a TrainConfig")
    cfg = config
    out_path = Path(out_path)
    if out_path.suffix.lower() == ".json":
        raise UsageError(f"--out {out_path} would clash with the checkpoint's JSON sidecar; use a .pt file name")
    state_path = _state_path(out_path)
    device = pick_device(cfg.device)
    info = dataset_info(cfg.dataset)
    from lingraft.models import create_model, list_models

    if cfg.arch not in list_models():
        close = difflib.get_close_matches(cfg.arch, list_models(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UsageError(f"unknown model {cfg.arch!r}{hint}; available: {', '.join(list_models())}")

    # ---- data: validation = the last val_size training images; training = the first num_train of the rest
    x_all, y_all = load_dataset(info.name, "train", cfg.data_dir)
    if cfg.val_size >= len(x_all):
        raise UsageError(f"val_size {cfg.val_size} leaves no training data ({len(x_all)} images); use a smaller one")
    cut = len(x_all) - cfg.val_size
    x_tr, y_tr = x_all[:cut], y_all[:cut]
    x_val, y_val = x_all[cut:], y_all[cut:]
    if cfg.num_train is not None:
        x_tr, y_tr = x_tr[:cfg.num_train], y_tr[:cfg.num_train]
    del x_all, y_all
    x_tr, y_tr = x_tr.to(device), y_tr.to(device)
    n_train = len(x_tr)
    iters = math.ceil(n_train / cfg.batch_size)
    total_steps = iters * cfg.epochs

    # ---- model, teacher, loss plugin, optimizer, schedule
    arch_kwargs = {"in_shape": list(info.in_shape), "num_classes": info.num_classes,
                   "mean": list(info.mean), "std": list(info.std)}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = create_model(cfg.arch, **arch_kwargs).to(device)
    teacher = None
    if cfg.teacher:
        teacher, teacher_ck = load_checkpoint(cfg.teacher, map_location=device)
        t_shape = tuple(teacher_ck.get("arch_kwargs", {}).get("in_shape", ()))
        if t_shape != tuple(info.in_shape):
            raise UsageError(f"teacher {cfg.teacher} takes inputs {t_shape} but dataset {cfg.dataset} has "
                             f"{tuple(info.in_shape)}; use a teacher trained on {cfg.dataset}")
        teacher.requires_grad_(False)
    plugin = loss_plugin if loss_plugin is not None else make_loss_plugin(cfg.loss, cfg.loss_kwargs)
    extra_params = plugin.setup(model, in_shape=info.in_shape, num_classes=info.num_classes, device=device,
                                teacher=teacher) or []
    params = list(model.parameters()) + list(extra_params)
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor(cfg.schedule, total_steps))
    gen = torch.Generator()  # CPU generator: shuffling and attack noise (identical streams on CPU and GPU)
    gen.manual_seed(cfg.seed)

    cfg_dict = _to_plain(asdict(cfg))
    history: list[dict] = []
    best: dict = {"score": None, "epoch": 0, "metrics": None, "state_dict": None}
    epoch_done = 0
    batch_done = 0
    perm: Tensor | None = None
    running = {"loss": 0.0, "correct": 0, "seen": 0, "time": 0.0}
    train_time = 0.0

    if resume and state_path.exists():
        st = _load_state(state_path)
        diff = _config_diff(st.get("config", {}), cfg_dict)
        if diff:
            raise LingraftError(f"{state_path} belongs to a run with a different config ({diff}); "
                                "delete it, pass --no-resume, or use another output path")
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        plugin.load_state_dict(st.get("plugin", {}))
        gen.set_state(st["generator"])
        history = list(st["history"])
        best = dict(st["best"])
        epoch_done = int(st["epoch"])
        batch_done = int(st.get("batch", 0))
        perm = st.get("perm")
        running = dict(st.get("running", running))
        train_time = float(st.get("train_time_s", 0.0))
        if st["config"].get("epochs") != cfg.epochs and cfg.schedule != "none":
            log(f"note: epochs changed {st['config'].get('epochs')} -> {cfg.epochs}; the {cfg.schedule} "
                "learning-rate schedule is recomputed for the new length")
        log(f"resuming from {state_path}: {epoch_done} epoch(s)"
            + (f" + {batch_done} batch(es)" if batch_done else "") + " done")
    elif not resume and state_path.exists():
        state_path.unlink()

    def save_state(gen_state: Tensor, *, mid_epoch: bool) -> None:
        st = {"format": STATE_FORMAT, "version": 1, "lingraft_version": __version__, "config": cfg_dict,
              "epoch": epoch_done, "batch": batch_done if mid_epoch else 0,
              "perm": perm.cpu() if (mid_epoch and perm is not None) else None,
              "running": running if mid_epoch else {"loss": 0.0, "correct": 0, "seen": 0, "time": 0.0},
              "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
              "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "plugin": plugin.state_dict(),
              "generator": gen_state, "history": history, "best": best, "train_time_s": train_time}
        atomic_write(state_path, lambda f: torch.save(st, f))

    def write_checkpoint(weights: dict, complete: bool, write: bool = True) -> dict:
        result = {"best_epoch": best["epoch"], "best": best["metrics"],
                  "final": history[-1] if history else None, "history": history,
                  "train_time_s": round(train_time, 3), "epochs_done": epoch_done, "complete": complete,
                  "checkpoint": str(out_path)}
        full_meta = dict(meta or {})
        full_meta.update({"config": cfg_dict, "metrics": result, "lingraft_version": __version__,
                          "num_train": n_train, "num_val": len(x_val), "device": str(device)})
        if not write:
            return result
        current = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(weights)
        try:
            save_checkpoint(out_path, model, arch=cfg.arch, arch_kwargs=arch_kwargs, dataset=info.name,
                            meta=full_meta)
        finally:
            model.load_state_dict(current)
        return result

    if epoch_done >= cfg.epochs:
        log(f"{out_path}: already trained for {epoch_done} epoch(s); nothing to do")
        plugin.close()
        weights = best["state_dict"] if best["state_dict"] is not None else model.state_dict()
        return write_checkpoint(weights, complete=True, write=not out_path.exists())

    use_tqdm = progress and sys.stderr.isatty()
    epochs_this_call = 0
    last_state_save = time.monotonic()
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a dependency, but progress bars are optional
        use_tqdm = False

    result: dict = {}
    try:
        while epoch_done < cfg.epochs:
            epoch = epoch_done + 1
            if batch_done == 0 or perm is None:
                perm = torch.randperm(n_train, generator=gen)
                running = {"loss": 0.0, "correct": 0, "seen": 0, "time": 0.0}
                batch_done = 0
            model.train()
            plugin.train(True)
            bar = tqdm(total=iters, initial=batch_done, desc=f"epoch {epoch}/{cfg.epochs}", file=sys.stderr,
                       leave=False, dynamic_ncols=True) if use_tqdm else None
            t_epoch = time.monotonic()
            gen_state = gen.get_state()
            in_update = False  # True while optimizer/scheduler/counters are being advanced (not a resumable point)
            try:
                for b in range(batch_done, iters):
                    gen_state = gen.get_state()  # RNG at the start of this batch, for a save after an interrupt
                    idx = perm[b * cfg.batch_size:(b + 1) * cfg.batch_size].to(device)
                    xb, yb = x_tr[idx], y_tr[idx]
                    step = sched.last_epoch  # global step index (0-based)
                    ramp = cfg.eps_ramp_epochs * iters
                    eps_t = cfg.eps * min(1.0, (step + 1) / ramp) if ramp > 0 else cfg.eps
                    if cfg.method == "fgsm":
                        x_in = fgsm(model, xb, yb, eps_t, step_size=cfg.fgsm_step * eps_t, generator=gen)
                    elif cfg.method == "pgd":
                        x_in, _ = pgd_attack(model, xb, yb, eps_t, steps=cfg.pgd_steps, loss="ce", early_stop=False,
                                             generator=gen)
                    else:
                        x_in = xb
                    logits = plugin.forward(model, x_in)
                    loss = plugin.loss(model, x_in, yb, logits)
                    if cfg.method == "fgsm" and cfg.grad_align > 0 and eps_t > 0:
                        loss = loss + grad_align_reg(model, xb, yb, eps_t, cfg.grad_align, generator=gen)
                    if not torch.isfinite(loss):
                        raise LingraftError(f"training diverged (loss {loss.item()}) at epoch {epoch}, batch {b + 1}; "
                                            "lower --lr or --eps")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    in_update = True
                    opt.step()
                    sched.step()
                    running["loss"] += float(loss.detach()) * len(yb)
                    running["correct"] += int((logits.detach().argmax(1) == yb).sum())
                    running["seen"] += len(yb)
                    batch_done = b + 1
                    gen_state = gen.get_state()  # now the RNG at the start of the next batch
                    in_update = False
                    if bar is not None:
                        bar.set_postfix(loss=f"{running['loss'] / running['seen']:.4f}", eps=f"{eps_t:.4f}")
                        bar.update(1)
                    if state_every_s is not None and time.monotonic() - last_state_save > state_every_s \
                            and batch_done < iters:
                        elapsed = time.monotonic() - t_epoch
                        running["time"] += elapsed
                        train_time += elapsed
                        t_epoch = time.monotonic()
                        save_state(gen_state, mid_epoch=True)
                        last_state_save = time.monotonic()
            except KeyboardInterrupt:
                # Between batches the state is exact: save it so a rerun loses nothing. An interrupt in the middle of
                # an update (rare) falls back to the last saved state.
                if batch_done > 0 and not in_update:
                    elapsed = time.monotonic() - t_epoch
                    running["time"] += elapsed
                    train_time += elapsed
                    save_state(gen_state, mid_epoch=True)
                    log(f"interrupted: state saved to {state_path} ({epoch_done} epoch(s) + {batch_done} "
                        "batch(es)); rerun the same command to resume")
                raise
            finally:
                if bar is not None:
                    bar.close()
            elapsed = time.monotonic() - t_epoch
            running["time"] += elapsed
            train_time += elapsed

            # ---- validation and bookkeeping
            t_eval = time.monotonic()
            plugin.train(False)
            if len(x_val):
                ev = evaluate(model, x_val, y_val, cfg.eps, pgd_steps=cfg.eval_pgd_steps, seed=cfg.seed)
            else:  # no validation set: fall back to training accuracy, so the last epoch wins ties
                acc = running["correct"] / max(running["seen"], 1)
                ev = {"clean_acc": acc, "pgd_acc": acc}
            metrics = {"epoch": epoch, "train_loss": running["loss"] / max(running["seen"], 1),
                       "train_acc": running["correct"] / max(running["seen"], 1),
                       "val_clean_acc": ev["clean_acc"], "val_pgd_acc": ev["pgd_acc"],
                       "lr": opt.param_groups[0]["lr"], "eps": cfg.eps,
                       "epoch_time_s": round(running["time"], 3), "eval_time_s": round(time.monotonic() - t_eval, 3)}
            history.append(metrics)
            epoch_done = epoch
            batch_done = 0
            perm = None
            score = _score(cfg, metrics)
            improved = best["score"] is None or tuple(score) >= tuple(best["score"])
            if improved:
                best = {"score": list(score), "epoch": epoch, "metrics": metrics,
                        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
            log(f"epoch {epoch}/{cfg.epochs}: loss {metrics['train_loss']:.4f} train_acc {metrics['train_acc']:.4f} "
                f"val clean {metrics['val_clean_acc']:.4f} pgd {metrics['val_pgd_acc']:.4f} "
                f"({metrics['epoch_time_s']:.1f} s + eval {metrics['eval_time_s']:.1f} s)" + (" *" if improved else ""))
            save_state(gen.get_state(), mid_epoch=False)
            last_state_save = time.monotonic()
            if improved or epoch_done == cfg.epochs:
                result = write_checkpoint(best["state_dict"], complete=epoch_done == cfg.epochs)
            epochs_this_call += 1
            if stop_after_epochs is not None and epochs_this_call >= stop_after_epochs and epoch_done < cfg.epochs:
                result = write_checkpoint(best["state_dict"], complete=False)
                break
    finally:
        plugin.close()
    return result


def config_from_dict(d: dict) -> TrainConfig:
    """Build a TrainConfig from a mapping (keys with dashes or underscores); unknown keys -> UsageError."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    kw = {}
    for k, v in d.items():
        key = str(k).replace("-", "_")
        if key not in names:
            close = difflib.get_close_matches(key, sorted(names), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UsageError(f"unknown training option {k!r}{hint}")
        kw[key] = v
    for req in ("arch", "dataset"):
        if req not in kw:
            raise UsageError(f"training config needs {req!r}")
    return TrainConfig(**kw)
