"""One epoch of (adversarial) training: the loop shared by ``lingraft train`` and graft's fine-tuning.

The callers differ only in what they build around it: the parameter groups of the optimizer, the learning-rate
schedule, the loss plugin and what happens after each batch (progress bars, resume states). Within an epoch a
batch is: shuffle order -> attack (:class:`AttackRecipe`) -> plugin logits and loss (+ GradAlign) -> one optimizer
and one scheduler step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lingraft.errors import LingraftError
from lingraft.signals import critical
from lingraft.train.attack import fgsm, pgd_attack
from lingraft.train.plugins import LossPlugin

__all__ = ["AttackRecipe", "EpochPosition", "fresh_running", "batch_loss", "run_epoch", "grad_align_reg"]


def grad_align_reg(
    model: nn.Module, x: Tensor, y: Tensor, eps: float, lam: float, generator: torch.Generator | None = None
) -> Tensor:
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


@dataclass
class AttackRecipe:
    """How a clean batch becomes the batch the model trains on, and what regularises it.

    method "ce" trains on clean inputs, "fgsm" on one FGSM step of ``fgsm_step * eps`` (plus GradAlign of weight
    ``grad_align`` when > 0), "pgd" on ``pgd_steps`` of CE-PGD. eps grows linearly over the first ``ramp_steps``
    optimizer steps (0: constant). ``generator`` feeds the attacks' noise; None draws from torch's global RNG.
    """

    method: str
    eps: float
    fgsm_step: float = 1.25
    grad_align: float = 0.0
    pgd_steps: int = 10
    ramp_steps: float = 0.0
    generator: torch.Generator | None = None

    def eps_at(self, step: int) -> float:
        """The radius of 0-based optimizer step ``step``."""
        ramp = self.ramp_steps
        return self.eps * min(1.0, (step + 1) / ramp) if ramp > 0 else self.eps

    def perturb(self, model: nn.Module, xb: Tensor, yb: Tensor, eps: float) -> Tensor:
        """xb [B, ...] -> the (possibly attacked) inputs [B, ...] at radius eps."""
        if self.method == "fgsm":
            return fgsm(model, xb, yb, eps, step_size=self.fgsm_step * eps, generator=self.generator)
        if self.method == "pgd":
            x_adv, _ = pgd_attack(
                model, xb, yb, eps, steps=self.pgd_steps, loss="ce", early_stop=False, generator=self.generator
            )
            return x_adv
        return xb


def batch_loss(
    model: nn.Module, plugin: LossPlugin, recipe: AttackRecipe, xb: Tensor, yb: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """Loss (scalar) and logits [B, K] of the clean batch xb [B, ...], yb [B] under ``recipe`` at radius eps."""
    x_in = recipe.perturb(model, xb, yb, eps)
    logits = plugin.forward(model, x_in)
    loss = plugin.loss(model, x_in, yb, logits)
    # fgsm needs eps > 0 (TrainConfig) and the ramp keeps eps_t > 0, so GradAlign never sees eps 0 from train()
    if recipe.method == "fgsm" and recipe.grad_align > 0:
        loss = loss + grad_align_reg(model, xb, yb, eps, recipe.grad_align, generator=recipe.generator)
    return loss, logits


def fresh_running() -> dict:
    """Per-epoch sums: loss (times batch size), correct predictions, samples seen, seconds spent."""
    return {"loss": 0.0, "correct": 0, "seen": 0, "time": 0.0}


@dataclass
class EpochPosition:
    """Where the current epoch stands; exact between optimizer steps, so an interrupted epoch can resume."""

    perm: Tensor | None = None  # [N] sample order of this epoch (None: draw a new one)
    batch_done: int = 0  # batches of this epoch already trained
    running: dict = field(default_factory=fresh_running)
    gen_state: Tensor | None = None  # shuffling RNG state at the start of the next batch
    in_update: bool = False  # True while optimizer/scheduler/counters advance (not a resumable point)


def run_epoch(
    model: nn.Module,
    plugin: LossPlugin,
    recipe: AttackRecipe,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    x: Tensor,
    y: Tensor,
    *,
    batch_size: int,
    shuffle_gen: torch.Generator,
    pos: EpochPosition,
    device: torch.device,
    epoch: int,
    on_batch: Callable[[int, float], None] | None = None,
    raise_on_divergence: bool = True,
) -> None:
    """Train one epoch, or its rest from ``pos.batch_done``, over x [N, ...], y [N] (batches move to ``device``).

    A new epoch draws its order from ``shuffle_gen``. ``pos`` is updated after every step; ``on_batch(batch size,
    eps)`` runs after each. A non-finite loss raises LingraftError unless ``raise_on_divergence`` is False.
    """
    n = len(x)
    iters = math.ceil(n / batch_size)
    if pos.batch_done == 0 or pos.perm is None:
        pos.perm = torch.randperm(n, generator=shuffle_gen)
        pos.running = fresh_running()
        pos.batch_done = 0
    model.train()
    plugin.train(True)
    pos.gen_state = shuffle_gen.get_state()
    pos.in_update = False
    for b in range(pos.batch_done, iters):
        pos.gen_state = shuffle_gen.get_state()  # RNG at the start of this batch, for a save after an interrupt
        idx = pos.perm[b * batch_size : (b + 1) * batch_size].to(x.device)
        xb, yb = x[idx].to(device), y[idx].to(device)
        eps_t = recipe.eps_at(sched.last_epoch)  # last_epoch = the global (0-based) step index
        loss, logits = batch_loss(model, plugin, recipe, xb, yb, eps_t)
        if raise_on_divergence and not torch.isfinite(loss):
            raise LingraftError(
                f"training diverged (loss {loss.item()}) at epoch {epoch}, batch {b + 1}; lower --lr or --eps"
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        pos.in_update = True
        with critical():  # a SIGINT/SIGTERM (under a guard) waits until the step is booked: a resumable point
            opt.step()
            sched.step()
            pos.running["loss"] += float(loss.detach()) * len(yb)
            pos.running["correct"] += int((logits.detach().argmax(1) == yb).sum())
            pos.running["seen"] += len(yb)
            pos.batch_done = b + 1
            pos.gen_state = shuffle_gen.get_state()  # now the RNG at the start of the next batch
            pos.in_update = False
        if on_batch is not None:
            on_batch(len(yb), eps_t)
