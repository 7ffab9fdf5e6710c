"""Which neurons to graft: the paper's staged rule and the baselines (random, magnitude, instability).

The paper's rule grafts in stages: score = gamma * rank(instability) - rank(significance) with gamma decaying
over the stages (default 2, 1.5, 1, 0), each stage taking an equal share of the requested ratio from the
neurons not chosen yet. Ranks are ascending (rank 0 = least unstable / least significant), computed globally
across layers (default) or within each layer.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lingraft.errors import UsageError
from lingraft.graft.scores import NeuronScores

__all__ = ["RULES", "select_neurons"]

RULES = ("lg", "random", "magnitude", "instability")


def _rank(v: Tensor) -> Tensor:
    """Ascending ranks 0..n-1 (ties broken by position, deterministic)."""
    order = torch.argsort(v, stable=True)
    r = torch.empty_like(order)
    r[order] = torch.arange(v.numel())
    return r.float()


def _check_options(ratio: float, rule: str, scope: str, significance: str) -> None:
    if not 0.0 <= ratio <= 1.0 or math.isnan(ratio):
        raise UsageError(f"--ratio must be in [0, 1], got {ratio}")
    if rule not in RULES:
        raise UsageError(f"unknown graft rule {rule!r}; choose one of {', '.join(RULES)}")
    if scope not in ("global", "layer"):
        raise UsageError(f"--scope must be global or layer, got {scope!r}")
    if significance not in ("gradient", "magnitude"):
        raise UsageError(f"--significance must be gradient or magnitude, got {significance!r}")


def _choose_staged(chosen: Tensor, need: int, inst: Tensor, sig: Tensor, gammas) -> None:
    """Add ``need`` neurons to the flat bool mask ``chosen`` in len(gammas) stages of top gamma*rank(inst)-rank(sig)."""
    stages = list(gammas)
    per = [need // len(stages) + (1 if i < need % len(stages) else 0) for i in range(len(stages))]
    r_sig = _rank(sig)
    r_inst = _rank(inst)
    for gamma, k in zip(stages, per):
        if k == 0:
            continue
        score = gamma * r_inst - r_sig
        score[chosen] = -float("inf")
        chosen[torch.topk(score, k).indices] = True


def _choose_baseline(chosen: Tensor, need: int, rule: str, inst: Tensor, mag: Tensor, gen: torch.Generator) -> None:
    """Add ``need`` neurons to ``chosen``: random, smallest magnitude or most unstable first."""
    if rule == "random":
        score = torch.rand(chosen.numel(), generator=gen)
    elif rule == "magnitude":
        score = -mag  # least significant first
    else:
        score = inst.clone()
    score[chosen] = -float("inf")
    chosen[torch.topk(score, need).indices] = True


def select_neurons(
    scores: NeuronScores,
    ratio: float,
    *,
    rule: str = "lg",
    scope: str = "global",
    gammas=(2.0, 1.5, 1.0, 0.0),
    significance: str = "gradient",
    seed: int = 0,
) -> dict[str, Tensor]:
    """Masks (bool, layer activation shape) of the neurons to graft: ``ratio`` of all ReLU neurons (counting
    already-grafted ones, which stay grafted). Returns {layer: mask}."""
    _check_options(ratio, rule, scope, significance)
    names = list(scores.shapes)
    groups = [names] if scope == "global" else [[n] for n in names]
    masks = {n: scores.grafted[n].clone() for n in names}
    sig_src = scores.gradient if significance == "gradient" else scores.magnitude
    gen = torch.Generator().manual_seed(seed)
    for group in groups:
        inst = torch.cat([scores.instability[n].flatten() for n in group])
        chosen = torch.cat([masks[n].flatten() for n in group])
        need = int(round(ratio * chosen.numel())) - int(chosen.sum())
        if need <= 0:
            continue
        if rule == "lg":
            _choose_staged(chosen, need, inst, torch.cat([sig_src[n].flatten() for n in group]), gammas)
        else:
            mag = torch.cat([scores.magnitude[n].flatten() for n in group])
            _choose_baseline(chosen, need, rule, inst, mag, gen)
        off = 0
        for n in group:
            k = masks[n].numel()
            masks[n] = chosen[off : off + k].reshape(masks[n].shape)
            off += k
    return masks
