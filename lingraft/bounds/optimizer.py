"""The one optimiser of relaxation parameters: projected Adam with exponential learning-rate decay.

alpha-CROWN (:mod:`lingraft.bounds.alpha_crown`: ReLU lower slopes, alpha in [0, 1]) and beta-CROWN
(:mod:`lingraft.verify.bounding`: split multipliers, beta >= 0) both maximise a lower bound by gradient ascent on
parameters that every value of which gives a sound bound; after each step the parameters are projected back onto
their feasible set, so every iterate is a valid bound. auto_LiRPA and alpha-beta-CROWN use Adam with the learning
rate decaying by 0.98 per step; so does this.

Written out rather than ``torch.optim.Adam``: torch.optim's first use imports ``torch._dynamo`` (about 2 s of
start-up on this machine, paid by every ``lingraft verify`` call), and the projection belongs with the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

LR_DECAY = 0.98  # per step, as auto_LiRPA's ExponentialLR default for alpha/beta
#: added to Adam's second moment before the square root: sqrt(0) takes a slow path on CPU (measured 2-4x slower
#: per element than a normal number), and most slopes get zero gradient (stable neurons); the shift changes the
#: denominator by at most 1e-15, far below eps
_SQRT_SHIFT = 1e-30


@dataclass
class ParamGroup:
    """Tensors that share a learning rate and a feasible box [low, high] (None: unbounded on that side)."""

    params: list[Tensor]
    lr: float
    low: float | None = None
    high: float | None = None


class ProjectedAdam:
    """Adam ascent-ready minimiser over a few parameter groups, each projected onto its box after every step.

    Usage: ``opt.step(loss)`` computes the gradients of ``loss`` w.r.t. all parameters (parameters that do not
    reach the loss get none and stay put), takes one Adam step with the current learning rates, projects, and
    decays the learning rates by ``decay``. Parameters are updated in place and stay leaves that require grad.
    """

    def __init__(self, groups: list[ParamGroup], *, decay: float = LR_DECAY, betas=(0.9, 0.999), eps: float = 1e-8):
        self.groups = [g for g in groups if g.params]
        self.decay = decay
        self.b1, self.b2, self.eps = betas[0], betas[1], eps
        self.params = [p for g in self.groups for p in g.params]
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.t = 0
        self.scale = 1.0  # learning-rate multiplier: decay ** steps taken

    def step(self, loss: Tensor) -> None:
        """One projected Adam step on ``loss`` (to be minimised)."""
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        self.t += 1
        c1 = 1 - self.b1**self.t
        c2 = 1 - self.b2**self.t
        i = 0
        with torch.no_grad():
            for g in self.groups:
                lr = g.lr * self.scale
                for p in g.params:
                    grad, m, v = grads[i], self.m[i], self.v[i]
                    i += 1
                    if grad is not None:
                        m.mul_(self.b1).add_(grad, alpha=1 - self.b1)
                        v.mul_(self.b2).addcmul_(grad, grad, value=1 - self.b2)
                        p.addcdiv_(m, (v / c2).add_(_SQRT_SHIFT).sqrt_().add_(self.eps), value=-lr / c1)
                    if g.low is not None or g.high is not None:
                        p.clamp_(g.low, g.high)
        self.scale *= self.decay
