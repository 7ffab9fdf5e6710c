"""Grafting itself: replace a model's ReLU modules by GraftedReLU with given masks and initial a, b."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from lingraft.errors import UsageError
from lingraft.graft.scores import NeuronScores, relu_modules
from lingraft.io.checkpoint import replace_module
from lingraft.models.layers import GraftedReLU

__all__ = ["INITS", "apply_graft", "graft_summary"]

INITS = ("paper", "identity", "zero", "fit")


def apply_graft(
    model: nn.Module,
    masks: dict[str, Tensor],
    *,
    init: str = "paper",
    scores: NeuronScores | None = None,
    init_a: float = 0.4,
    init_b: float = 0.0,
) -> nn.Module:
    """Return a copy of ``model`` whose ReLU modules are GraftedReLU with the given masks. Already grafted neurons
    keep their a, b; new ones get the ``init`` values (paper: a=0.4, b=0; identity: a=1; zero: a=b=0; fit: the
    least-squares line of relu over the score images)."""
    if init not in INITS:
        raise UsageError(f"unknown --init {init!r}; choose one of {', '.join(INITS)}")
    model = copy.deepcopy(model)
    relus = relu_modules(model)
    unknown = set(masks) - set(relus)
    if unknown:
        raise UsageError(f"mask names layers the model does not have: {sorted(unknown)}")
    for name, mask in masks.items():
        old = relus[name]
        shape = tuple(mask.shape)
        g = GraftedReLU(shape, mask.float())
        a0 = {"paper": init_a, "identity": 1.0, "zero": 0.0, "fit": init_a}[init]
        b0 = {"paper": init_b, "identity": 0.0, "zero": 0.0, "fit": init_b}[init]
        with torch.no_grad():
            g.a.fill_(a0)
            g.b.fill_(b0)
            if init == "fit" and scores is not None:
                g.a.copy_(scores.fit_a[name].reshape(shape))
                g.b.copy_(scores.fit_b[name].reshape(shape))
            if isinstance(old, GraftedReLU):
                keep = old.mask.reshape(shape) > 0.5
                g.a[keep] = old.a.reshape(shape)[keep]
                g.b[keep] = old.b.reshape(shape)[keep]
        dev = next(model.parameters()).device
        replace_module(model, name, g.to(dev))
    return model


def graft_summary(model: nn.Module) -> dict:
    """{layer: {"neurons": n, "grafted": g}} over the model's ReLU modules."""
    out = {}
    for n, m in relu_modules(model).items():
        if isinstance(m, GraftedReLU):
            out[n] = {"neurons": m.num_neurons, "grafted": m.num_grafted}
        else:
            out[n] = {"neurons": None, "grafted": 0}
    return out
