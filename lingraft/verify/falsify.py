"""Counterexample search for one region: batched PGD on the specification margins.

Unlike :func:`lingraft.train.attack.pgd_attack_spec` (a disjunction of single rows), the unsafe set here is a
disjunction of CONJUNCTIONS (e.g. ACAS Xu property 3: "output 0 is the minimum" = 4 rows at once), so the
objective is the violation ``min_g max_{r in g} (A_r y - b_r)`` (<= 0 means unsafe). Every start targets one
conjunction (start j attacks g = j mod G), all starts run in one batch, and the first few steps of each start
are output-diversified (ODI: ascend a random direction of the outputs) to spread the starts out.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lingraft.clock import now
from lingraft.spec.region import RegionSpec, group_max


def spec_attack(
    model: nn.Module,
    spec: RegionSpec,
    *,
    starts: int = 64,
    steps: int = 50,
    odi_steps: int = 5,
    seed: int = 0,
    x_init: Tensor | None = None,
    deadline: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Search the region's (inward-rounded) box for inputs violating the specification.

    deadline: a :func:`lingraft.clock.now` value after which no further step starts (None: none).
    x_init: optional [k, *in_shape] starting points (e.g. bound minimizers from branch and bound); they are
    used as they are (no ODI) and the rest of the ``starts`` begin at the box centre and random points.
    Returns (x [N, *in_shape] float32 inside the box, violation [N]) sorted by violation, best first;
    violation <= 0 marks a candidate counterexample (to be re-checked, see :mod:`lingraft.verify.witness`).
    """
    lo, hi = spec.a_L, spec.a_U
    dev = lo.device
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    n_init = 0 if x_init is None else x_init.shape[0]
    N = max(int(starts), n_init + 1)
    x = lo + (hi - lo) * torch.rand((N, *lo.shape[1:]), generator=gen).to(dev)
    x[n_init] = ((lo + hi) / 2)[0]
    if x_init is not None and n_init:
        x[:n_init] = torch.max(torch.min(x_init.to(dev, x.dtype), hi), lo)
    target = torch.arange(N, device=dev) % spec.G
    half = (hi - lo) / 2
    odi = torch.zeros(N, dtype=torch.bool, device=dev)
    odi[n_init:] = True
    odi[n_init] = False  # the centre start goes straight for the margin
    w = None

    best_x = x.clone()
    with torch.no_grad():
        best_v = spec.violation(model(x).float())
    total = odi_steps + steps
    for t in range(total):
        if deadline is not None and now() > deadline:
            break
        xr = x.detach().requires_grad_(True)
        with torch.enable_grad():
            y = model(xr).reshape(N, -1).float()
            m = spec.margins(y)
            v_target = group_max(m, spec.group, spec.G).gather(1, target[:, None]).squeeze(1)
            if t < odi_steps:
                if w is None:
                    w = (2 * torch.rand(y.shape, generator=gen) - 1).to(dev)
                obj = torch.where(odi, -(w * y).sum(1), v_target)
            else:
                obj = v_target
            (grad,) = torch.autograd.grad(obj.sum(), xr)
        with torch.no_grad():
            v = group_max(m.detach(), spec.group, spec.G).min(dim=1).values
            better = v < best_v
            best_v = torch.where(better, v, best_v)
            best_x[better] = x[better]
            if bool((best_v <= 0).any()):
                break
            if t < odi_steps:
                step = torch.where(odi.reshape(-1, *[1] * (x.dim() - 1)), half, half * 0.25)
            else:
                # cosine decay from a quarter of the box half-width to a small fraction of it
                k = (t - odi_steps) / max(steps - 1, 1)
                step = half * (0.005 + 0.245 * (1 + math.cos(math.pi * k)) / 2)
            x = torch.max(torch.min(x - step * grad.sign(), hi), lo)
    with torch.no_grad():
        v = spec.violation(model(x).float())
        better = v < best_v
        best_v = torch.where(better, v, best_v)
        best_x[better] = x[better]
    order = torch.argsort(best_v)
    return best_x[order].detach(), best_v[order].detach()
