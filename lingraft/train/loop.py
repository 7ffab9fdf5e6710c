"""Training: clean (CE), FGSM (+ GradAlign) and PGD adversarial training, with pluggable losses and exact resume.

``train(config, "model.pt")`` writes the best checkpoint to ``model.pt`` (+ ``model.json`` sidecar) and a resume
state to ``model.pt.state`` (model, optimizer, scheduler, RNG, best weights, history, and the position inside the
current epoch). The state is written atomically after every epoch, every ``state_every_s`` seconds, and when the
run is interrupted (Ctrl-C; SIGTERM too under the CLI) between optimizer steps, so a rerun with the same out_path
continues where it stopped and produces the same weights as an uninterrupted run (same device and thread count).

The pieces live next door: settings in :mod:`lingraft.train.config`, loss plugins in :mod:`lingraft.train.plugins`,
the epoch loop (shared with graft fine-tuning) in :mod:`lingraft.train.epoch`, validation in
:mod:`lingraft.train.evaluation` and the resume-state file in :mod:`lingraft.train.state`; they are re-exported here.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from lingraft import __version__
from lingraft.clock import Stopwatch
from lingraft.data.datasets import dataset_info, load_dataset
from lingraft.env import pick_device
from lingraft.errors import LingraftError, UsageError
from lingraft.io.checkpoint import load_checkpoint, save_checkpoint
from lingraft.io.files import atomic_write
from lingraft.signals import Interrupted, interrupted
from lingraft.train.config import TrainConfig, config_from_dict, did_you_mean
from lingraft.train.epoch import AttackRecipe, EpochPosition, fresh_running, grad_align_reg, run_epoch
from lingraft.train.evaluation import evaluate
from lingraft.train.plugins import LossPlugin, RegistryLoss, make_loss_plugin
from lingraft.train.state import STATE_FORMAT, config_diff, load_state, state_path_for, to_plain

__all__ = [
    "TrainConfig",
    "train",
    "evaluate",
    "pick_device",
    "grad_align_reg",
    "LossPlugin",
    "make_loss_plugin",
    "STATE_FORMAT",
    "config_from_dict",
    "RegistryLoss",
]


def lr_factor(schedule: str, total_steps: int) -> Callable[[int], float]:
    """The learning-rate multiplier of each step: cosine to 0, step (x0.1 at 50% and 75%) or constant ('none')."""

    def factor(step: int) -> float:
        t = min(step, total_steps) / max(total_steps, 1)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * t))
        if schedule == "step":
            return 0.1 ** ((t >= 0.5) + (t >= 0.75))
        return 1.0

    return factor


def _score(cfg: TrainConfig, metrics: dict) -> tuple[float, float]:
    """What 'best' maximises: (PGD, clean) validation accuracy for adversarial methods, (clean, PGD) for ce."""
    if cfg.method != "ce":
        return (metrics["val_pgd_acc"], metrics["val_clean_acc"])
    return (metrics["val_clean_acc"], metrics["val_pgd_acc"])


def _cpu_copy(model: torch.nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


class _Trainer:
    """One training run: data, model, optimizer and RNG (built in ``__init__``), optionally restored from a resume
    state (:meth:`restore`), then advanced one epoch at a time (:meth:`fit`)."""

    def __init__(
        self,
        cfg: TrainConfig,
        out_path: Path,
        *,
        log: Callable[[str], None],
        meta: dict | None,
        loss_plugin: LossPlugin | None,
    ):
        self.cfg, self.out_path, self.log, self.meta = cfg, out_path, log, meta
        self.state_path = state_path_for(out_path)
        self.device = pick_device(cfg.device)
        self.info = dataset_info(cfg.dataset)
        self._check_arch()
        self._load_data()
        self._build_model(loss_plugin)
        self.cfg_dict = to_plain(asdict(cfg))
        self.history: list[dict] = []
        self.best: dict = {"score": None, "epoch": 0, "metrics": None, "state_dict": None}
        self.epoch_done = 0
        self.pos = EpochPosition()
        self.train_time = 0.0
        self._unbooked = Stopwatch()  # training time not yet booked
        self._since_save = Stopwatch()  # time since the resume state was last written

    # ------------------------------------------------------------------------------------------------ setup
    def _check_arch(self) -> None:
        from lingraft.models import list_models

        if self.cfg.arch not in list_models():
            raise UsageError(
                f"unknown model {self.cfg.arch!r}{did_you_mean(self.cfg.arch, list_models())}; "
                f"available: {', '.join(list_models())}"
            )

    def _load_data(self) -> None:
        """Validation = the last val_size training images; training = the first num_train of the rest."""
        cfg = self.cfg
        x_all, y_all = load_dataset(self.info.name, "train", cfg.data_dir)
        if cfg.val_size >= len(x_all):
            raise UsageError(
                f"val_size {cfg.val_size} leaves no training data ({len(x_all)} images); use a smaller one"
            )
        cut = len(x_all) - cfg.val_size
        x_tr, y_tr = x_all[:cut], y_all[:cut]
        self.x_val, self.y_val = x_all[cut:], y_all[cut:]
        if cfg.num_train is not None:
            x_tr, y_tr = x_tr[: cfg.num_train], y_tr[: cfg.num_train]
        self.x_tr, self.y_tr = x_tr.to(self.device), y_tr.to(self.device)
        self.n_train = len(self.x_tr)
        self.iters = math.ceil(self.n_train / cfg.batch_size)

    def _load_teacher(self) -> torch.nn.Module | None:
        cfg, info = self.cfg, self.info
        if not cfg.teacher:
            return None
        teacher, teacher_ck = load_checkpoint(cfg.teacher, map_location=self.device)
        t_shape = tuple(teacher_ck.get("arch_kwargs", {}).get("in_shape", ()))
        if t_shape != tuple(info.in_shape):
            raise UsageError(
                f"teacher {cfg.teacher} takes inputs {t_shape} but dataset {cfg.dataset} has "
                f"{tuple(info.in_shape)}; use a teacher trained on {cfg.dataset}"
            )
        teacher.requires_grad_(False)
        return teacher

    def _build_model(self, loss_plugin: LossPlugin | None) -> None:
        """Model (seeded), teacher, loss plugin, optimizer over model + plugin parameters, schedule, RNG."""
        from lingraft.models import create_model

        cfg, info = self.cfg, self.info
        self.arch_kwargs = {
            "in_shape": list(info.in_shape),
            "num_classes": info.num_classes,
            "mean": list(info.mean),
            "std": list(info.std),
        }
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.model = create_model(cfg.arch, **self.arch_kwargs).to(self.device)
        teacher = self._load_teacher()
        self.plugin = loss_plugin if loss_plugin is not None else make_loss_plugin(cfg.loss, cfg.loss_kwargs)
        extra_params = (
            self.plugin.setup(
                self.model, in_shape=info.in_shape, num_classes=info.num_classes, device=self.device, teacher=teacher
            )
            or []
        )
        params = list(self.model.parameters()) + list(extra_params)
        if cfg.optimizer == "sgd":
            self.opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        else:
            self.opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_factor(cfg.schedule, self.iters * cfg.epochs))
        self.gen = torch.Generator()  # CPU generator: shuffling and attack noise (identical streams on CPU and GPU)
        self.gen.manual_seed(cfg.seed)
        self.recipe = AttackRecipe(
            cfg.method,
            cfg.eps,
            fgsm_step=cfg.fgsm_step,
            grad_align=cfg.grad_align,
            pgd_steps=cfg.pgd_steps,
            ramp_steps=cfg.eps_ramp_epochs * self.iters,
            generator=self.gen,
        )

    # ----------------------------------------------------------------------------------------------- resume
    def restore(self, resume: bool) -> None:
        """Continue from the state file when ``resume`` (refusing one of another config); else delete it."""
        if not self.state_path.exists():
            return
        if not resume:
            self.state_path.unlink()
            return
        cfg = self.cfg
        st = load_state(self.state_path)
        diff = config_diff(st.get("config", {}), self.cfg_dict)
        if diff:
            raise LingraftError(
                f"{self.state_path} belongs to a run with a different config ({diff}); "
                "delete it, pass --no-resume, or use another output path"
            )
        self.model.load_state_dict(st["model"])
        self.opt.load_state_dict(st["optimizer"])
        self.sched.load_state_dict(st["scheduler"])
        self.plugin.load_state_dict(st.get("plugin", {}))
        self.gen.set_state(st["generator"])
        self.history = list(st["history"])
        self.best = dict(st["best"])
        self.epoch_done = int(st["epoch"])
        self.pos = EpochPosition(
            perm=st.get("perm"), batch_done=int(st.get("batch", 0)), running=dict(st.get("running", fresh_running()))
        )
        self.train_time = float(st.get("train_time_s", 0.0))
        if st["config"].get("epochs") != cfg.epochs and cfg.schedule != "none":
            self.log(
                f"note: epochs changed {st['config'].get('epochs')} -> {cfg.epochs}; the {cfg.schedule} "
                "learning-rate schedule is recomputed for the new length"
            )
        batches = self.pos.batch_done
        self.log(
            f"resuming from {self.state_path}: {self.epoch_done} epoch(s)"
            + (f" + {batches} batch(es)" if batches else "")
            + " done"
        )

    # ------------------------------------------------------------------------------------------------- save
    def save_state(self, gen_state: torch.Tensor, *, mid_epoch: bool) -> None:
        """Write the resume state atomically; ``mid_epoch`` keeps the position inside the current epoch."""
        pos = self.pos
        st = {
            "format": STATE_FORMAT,
            "version": 1,
            "lingraft_version": __version__,
            "config": self.cfg_dict,
            "epoch": self.epoch_done,
            "batch": pos.batch_done if mid_epoch else 0,
            "perm": pos.perm.cpu() if (mid_epoch and pos.perm is not None) else None,
            "running": pos.running if mid_epoch else fresh_running(),
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "plugin": self.plugin.state_dict(),
            "generator": gen_state,
            "history": self.history,
            "best": self.best,
            "train_time_s": self.train_time,
        }
        atomic_write(self.state_path, lambda f: torch.save(st, f))

    def write_checkpoint(self, weights: dict, complete: bool, write: bool = True) -> dict:
        """The metrics dict; when ``write``, also save ``weights`` as the checkpoint (the model keeps its own)."""
        history = self.history
        result = {
            "best_epoch": self.best["epoch"],
            "best": self.best["metrics"],
            "final": history[-1] if history else None,
            "history": history,
            "train_time_s": round(self.train_time, 3),
            "epochs_done": self.epoch_done,
            "complete": complete,
            "checkpoint": str(self.out_path),
        }
        full_meta = dict(self.meta or {})
        full_meta.update(
            {
                "config": self.cfg_dict,
                "metrics": result,
                "lingraft_version": __version__,
                "num_train": self.n_train,
                "num_val": len(self.x_val),
                "device": str(self.device),
            }
        )
        if not write:
            return result
        current = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.model.load_state_dict(weights)
        try:
            save_checkpoint(
                self.out_path,
                self.model,
                arch=self.cfg.arch,
                arch_kwargs=self.arch_kwargs,
                dataset=self.info.name,
                meta=full_meta,
            )
        finally:
            self.model.load_state_dict(current)
        return result

    # ----------------------------------------------------------------------------------------------- epochs
    def _book_time(self) -> None:
        """Add the time since the last mark to this epoch's and the run's training time."""
        dt = self._unbooked.restart()
        self.pos.running["time"] += dt
        self.train_time += dt

    def _train_epoch(self, epoch: int, bar, state_every_s: float | None) -> None:
        """The optimizer steps of one epoch, with periodic mid-epoch states and a state save on Ctrl-C."""
        pos = self.pos

        def after_batch(_n: int, eps_t: float) -> None:
            if bar is not None:
                bar.set_postfix(loss=f"{pos.running['loss'] / pos.running['seen']:.4f}", eps=f"{eps_t:.4f}")
                bar.update(1)
            if state_every_s is not None and self._since_save.elapsed() > state_every_s and pos.batch_done < self.iters:
                self._book_time()
                self.save_state(pos.gen_state, mid_epoch=True)
                self._since_save.restart()

        self._unbooked.restart()
        try:
            run_epoch(
                self.model,
                self.plugin,
                self.recipe,
                self.opt,
                self.sched,
                self.x_tr,
                self.y_tr,
                batch_size=self.cfg.batch_size,
                shuffle_gen=self.gen,
                pos=pos,
                device=self.device,
                epoch=epoch,
                on_batch=after_batch,
            )
        except KeyboardInterrupt as e:
            # Between batches the state is exact: save it so a rerun loses nothing. An interrupt in the middle of
            # an update (rare: SIGINT/SIGTERM wait for the update under the CLI) falls back to the last saved state.
            if pos.batch_done > 0 and not pos.in_update:
                self._book_time()
                self.save_state(pos.gen_state, mid_epoch=True)
                msg = (
                    f"interrupted: state saved to {self.state_path} ({self.epoch_done} epoch(s) + "
                    f"{pos.batch_done} batch(es)); rerun the same command to resume"
                )
            else:
                msg = self.interrupt_message()
            raise interrupted(msg, self.log) from e
        self._book_time()

    def _validate(self, epoch: int) -> dict:
        """The epoch's metrics: training loss/accuracy and validation clean/PGD accuracy."""
        cfg, running = self.cfg, self.pos.running
        eval_watch = Stopwatch()
        self.plugin.train(False)
        if len(self.x_val):
            ev = evaluate(self.model, self.x_val, self.y_val, cfg.eps, pgd_steps=cfg.eval_pgd_steps, seed=cfg.seed)
        else:  # no validation set: fall back to training accuracy, so the last epoch wins ties
            acc = running["correct"] / max(running["seen"], 1)
            ev = {"clean_acc": acc, "pgd_acc": acc}
        return {
            "epoch": epoch,
            "train_loss": running["loss"] / max(running["seen"], 1),
            "train_acc": running["correct"] / max(running["seen"], 1),
            "val_clean_acc": ev["clean_acc"],
            "val_pgd_acc": ev["pgd_acc"],
            "lr": self.opt.param_groups[0]["lr"],
            "eps": cfg.eps,
            "epoch_time_s": round(running["time"], 3),
            "eval_time_s": round(eval_watch.elapsed(), 3),
        }

    def interrupt_message(self) -> str:
        """The one line for an interrupt outside the points that save a state themselves."""
        if self.state_path.exists():
            return f"interrupted: resume state in {self.state_path}; rerun the same command to resume"
        return "interrupted before the first batch finished; nothing to resume"

    def _validate_saving(self, epoch: int) -> dict:
        """:meth:`_validate`; an interrupt during it saves the finished epoch's state (a rerun only validates)."""
        try:
            return self._validate(epoch)
        except KeyboardInterrupt as e:
            self.save_state(self.pos.gen_state, mid_epoch=True)
            msg = (
                f"interrupted: state saved to {self.state_path} ({epoch} epoch(s) trained, not yet validated); "
                "rerun the same command to resume"
            )
            raise interrupted(msg, self.log) from e

    def _record(self, metrics: dict) -> bool:
        """Close the epoch: history, best weights, log line, end-of-epoch state. True when it is the new best."""
        cfg, epoch = self.cfg, metrics["epoch"]
        self.history.append(metrics)
        self.epoch_done = epoch
        self.pos = EpochPosition()
        score = _score(cfg, metrics)
        improved = self.best["score"] is None or tuple(score) >= tuple(self.best["score"])
        if improved:
            self.best = {"score": list(score), "epoch": epoch, "metrics": metrics, "state_dict": _cpu_copy(self.model)}
        self.log(
            f"epoch {epoch}/{cfg.epochs}: loss {metrics['train_loss']:.4f} train_acc {metrics['train_acc']:.4f} "
            f"val clean {metrics['val_clean_acc']:.4f} pgd {metrics['val_pgd_acc']:.4f} "
            f"({metrics['epoch_time_s']:.1f} s + eval {metrics['eval_time_s']:.1f} s)" + (" *" if improved else "")
        )
        self.save_state(self.gen.get_state(), mid_epoch=False)
        self._since_save.restart()
        return improved

    def fit(self, *, make_bar: Callable | None, stop_after_epochs: int | None, state_every_s: float | None) -> dict:
        """Train the remaining epochs (at most ``stop_after_epochs`` of them); returns the metrics dict.
        ``make_bar(total, desc, unit=, initial=)``: a progress bar/reporter per epoch (None: none)."""
        cfg = self.cfg
        epochs_this_call = 0
        self._since_save.restart()
        result: dict = {}
        while self.epoch_done < cfg.epochs:
            epoch = self.epoch_done + 1
            initial = self.pos.batch_done if self.pos.perm is not None else 0
            bar = None if make_bar is None else make_bar(self.iters, f"epoch {epoch}/{cfg.epochs}", "batches", initial)
            try:
                self._train_epoch(epoch, bar, state_every_s)
            finally:
                if bar is not None:
                    bar.close()
            improved = self._record(self._validate_saving(epoch))
            if improved or self.epoch_done == cfg.epochs:
                result = self.write_checkpoint(self.best["state_dict"], complete=self.epoch_done == cfg.epochs)
            if self.epoch_done == cfg.epochs:
                self.log(
                    f"kept the resume state {self.state_path}: a rerun with more epochs continues from it; "
                    f"{self.out_path.name} does not need it, delete it when done"
                )
            epochs_this_call += 1
            if stop_after_epochs is not None and epochs_this_call >= stop_after_epochs and self.epoch_done < cfg.epochs:
                result = self.write_checkpoint(self.best["state_dict"], complete=False)
                break
        return result


def _tqdm_available() -> bool:
    try:
        import tqdm  # noqa: F401
    except ImportError:  # tqdm is a dependency, but progress bars are optional
        return False
    return True


def _tqdm_bar(total: int, desc: str, unit: str, initial: int):
    """The library's own bar (``progress=True`` on a TTY); the CLI passes its reporter instead."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True)


def train(
    config: TrainConfig,
    out_path,
    *,
    progress: bool | Callable = True,
    log: Callable[[str], None] = print,
    resume: bool = True,
    meta: dict | None = None,
    loss_plugin: LossPlugin | None = None,
    stop_after_epochs: int | None = None,
    state_every_s: float = 300.0,
) -> dict:
    """Train ``config.arch`` on ``config.dataset`` and save the best checkpoint to ``out_path``.

    Best = highest validation PGD accuracy for fgsm/pgd (ties: clean), highest clean accuracy for ce.
    ``meta`` (e.g. {"command": "..."}) is stored in the checkpoint next to the config, the per-epoch history and
    the training time. ``loss_plugin`` overrides ``config.loss``. ``stop_after_epochs`` ends this call after that
    many more epochs (the state file lets a later call continue). ``progress``: True for a tqdm bar per epoch on a
    TTY, or ``make_bar(total, desc, unit, initial)`` returning an object with update/set_postfix/close (the CLI's
    reporter). An interrupt saves the state and raises :class:`lingraft.signals.Interrupted`.
    Returns the metrics dict (also in meta).
    """
    if not isinstance(config, TrainConfig):
        raise UsageError("train() needs a TrainConfig")
    out_path = Path(out_path)
    if out_path.suffix.lower() == ".json":
        raise UsageError(f"--out {out_path} would clash with the checkpoint's JSON sidecar; use a .pt file name")
    trainer = _Trainer(config, out_path, log=log, meta=meta, loss_plugin=loss_plugin)
    trainer.restore(resume)
    try:
        if trainer.epoch_done >= config.epochs:
            log(f"{out_path}: already trained for {trainer.epoch_done} epoch(s); nothing to do")
            best = trainer.best["state_dict"]
            weights = best if best is not None else trainer.model.state_dict()
            return trainer.write_checkpoint(weights, complete=True, write=not out_path.exists())
        if callable(progress):
            make_bar = progress
        else:
            make_bar = _tqdm_bar if progress and sys.stderr.isatty() and _tqdm_available() else None
        try:
            return trainer.fit(make_bar=make_bar, stop_after_epochs=stop_after_epochs, state_every_s=state_every_s)
        except Interrupted:
            raise  # the state is saved and the message given
        except KeyboardInterrupt as e:  # between the points above (bookkeeping): the last state stands
            raise interrupted(trainer.interrupt_message(), log) from e
    finally:
        trainer.plugin.close()
