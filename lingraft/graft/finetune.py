"""Fine-tuning a grafted model: the paper's recipe on the training loop of :mod:`lingraft.train.epoch`.

FGSM + GradAlign at a fixed eps, SGD with two parameter groups (network weights vs grafted a, b), a per-step cosine
schedule, and the weights with the best validation (PGD, clean) accuracy kept. Masks never change (they are
buffers). The attack noise is drawn from torch's global RNG and the shuffling from a generator seeded by cfg.seed.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lingraft.clock import Stopwatch
from lingraft.models.layers import GraftedReLU
from lingraft.train.epoch import AttackRecipe, EpochPosition, run_epoch
from lingraft.train.evaluation import evaluate
from lingraft.train.plugins import LossPlugin

__all__ = ["FinetuneConfig", "finetune", "graft_param_groups"]


@dataclass
class FinetuneConfig:
    """How :func:`finetune` trains: SGD with momentum and a cosine schedule over ``epochs``, FGSM adversarial
    training at radius ``eps`` (step ``fgsm_step`` * eps, gradient alignment weight ``grad_align``). The caller
    picks the training and validation images."""

    epochs: int = 1
    batch_size: int = 128
    lr: float = 1e-3  # network weights
    lr_graft: float = 0.01  # grafted a, b
    weight_decay: float = 5e-4  # weights only; a, b get none
    momentum: float = 0.9
    eps: float = 0.1
    grad_align: float = 0.2
    fgsm_step: float = 1.25
    seed: int = 0


def _owner(model: nn.Module, param_name: str) -> nn.Module | None:
    mod_name = param_name.rsplit(".", 1)[0]
    return dict(model.named_modules()).get(mod_name)


def graft_param_groups(model: nn.Module, cfg: FinetuneConfig) -> list[dict]:
    """Two SGD groups: the network weights (cfg.lr, weight decay) and the GraftedReLU a, b (cfg.lr_graft, none)."""
    graft_params = [
        p
        for n, p in model.named_parameters()
        if (n.endswith(".a") or n.endswith(".b")) and isinstance(_owner(model, n), GraftedReLU)
    ]
    graft_ids = {id(p) for p in graft_params}
    weights = [p for p in model.parameters() if id(p) not in graft_ids]
    return [
        {"params": weights, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
        {"params": graft_params, "lr": cfg.lr_graft, "weight_decay": 0.0},
    ]


def _cosine(steps: int):
    # written as pi * t / steps (not train's pi * (t / steps)): the float rounding of the schedule stays as it was
    return lambda t: 0.5 * (1 + math.cos(math.pi * min(t, steps) / steps))


def finetune(
    model: nn.Module,
    x_train: Tensor,
    y_train: Tensor,
    x_val: Tensor,
    y_val: Tensor,
    cfg: FinetuneConfig,
    *,
    log=print,
    progress=None,
) -> tuple[nn.Module, dict]:
    """Fine-tune the grafted ``model`` on x_train [N, ...], y_train [N]; validate on x_val, y_val after each epoch.

    Returns (the model with its best weights, in eval mode; {"best": metrics, "history": per-epoch metrics from
    epoch 0 = before fine-tuning, "time_s": seconds}). ``progress(n)`` is called after each batch of n images.
    """
    dev = next(model.parameters()).device
    opt = torch.optim.SGD(graft_param_groups(model, cfg), momentum=cfg.momentum)
    steps = max(1, cfg.epochs * math.ceil(x_train.shape[0] / cfg.batch_size))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _cosine(steps))
    gen = torch.Generator().manual_seed(cfg.seed)
    recipe = AttackRecipe("fgsm", cfg.eps, fgsm_step=cfg.fgsm_step, grad_align=cfg.grad_align, generator=None)
    on_batch = (lambda n, _eps: progress(n)) if progress else None
    best = evaluate(model, x_val, y_val, cfg.eps, seed=cfg.seed)
    best_state = copy.deepcopy(model.state_dict())
    history = [{"epoch": 0, **best}]
    log(f"finetune start: val clean {best['clean_acc']:.4f} pgd {best['pgd_acc']:.4f}")
    watch = Stopwatch()
    for ep in range(1, cfg.epochs + 1):
        # a diverged loss is not fatal here: the best (possibly the un-tuned) weights are kept
        run_epoch(
            model,
            LossPlugin(),
            recipe,
            opt,
            sched,
            x_train,
            y_train,
            batch_size=cfg.batch_size,
            shuffle_gen=gen,
            pos=EpochPosition(),
            device=dev,
            epoch=ep,
            on_batch=on_batch,
            raise_on_divergence=False,
        )
        model.eval()
        ev = evaluate(model, x_val, y_val, cfg.eps, seed=cfg.seed)
        history.append({"epoch": ep, **ev})
        log(f"finetune epoch {ep}: val clean {ev['clean_acc']:.4f} pgd {ev['pgd_acc']:.4f}")
        if (ev["pgd_acc"], ev["clean_acc"]) > (best["pgd_acc"], best["clean_acc"]):
            best, best_state = ev, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    model.eval()
    return model, {"best": best, "history": history, "time_s": watch.elapsed()}
