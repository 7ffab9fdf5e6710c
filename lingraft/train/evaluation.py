"""Validation metrics: clean and PGD accuracy of a model on a labelled set."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lingraft.train.attack import pgd_attack

__all__ = ["evaluate"]


def evaluate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float | None,
    *,
    batch_size: int = 256,
    pgd_steps: int = 20,
    pgd_restarts: int = 1,
    seed: int = 0,
) -> dict:
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
            xb = x[start : start + batch_size].to(device)
            yb = y[start : start + batch_size].to(device)
            with torch.no_grad():
                ok = model(xb).argmax(dim=1) == yb
            clean += int(ok.sum())
            if attack:
                _, success = pgd_attack(model, xb, yb, eps, steps=pgd_steps, restarts=pgd_restarts, seed=seed + i)
                robust += int((ok & ~success).sum())
            else:
                robust += int(ok.sum())
    finally:
        model.train(was_training)
    return {"clean_acc": clean / max(n, 1), "pgd_acc": robust / max(n, 1), "n": n}
