"""Bounding a batch of branch-and-bound domains: CROWN intermediate bounds + alpha/beta-CROWN final bounds.

A domain is the region's input box (or a sub-box) together with ReLU split decisions. Split neurons enter the
bound computation in two ways (beta-CROWN, Wang et al. 2021):

- their pre-activation bounds are clamped (active: lower = max(lower, 0); inactive: upper = min(upper, 0)) via
  the engine's ``interm_bounds``, so they are stable in the relaxation and every later layer's bounds tighten;
- the split constraint ``s * z >= 0`` (s = +1 active, -1 inactive) is added to the final bound with a
  Lagrange multiplier beta >= 0: for every feasible x, ``f(x) >= f(x) - beta * s * z(x)``, so a lower bound of
  the right-hand side over the relaxation is a lower bound of f over the domain. The engine adds the term
  through ``extra_lA`` (coefficient ``-beta * s`` on the pre-activation).

alpha (lower ReLU slopes in [0, 1]) and beta (>= 0) are optimized jointly by projected Adam on the sum of the
lower bounds; every iterate is a valid bound and the best one per row is kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from lingraft.bounds import BoundedNetwork
from lingraft.bounds.alpha_crown import crown_slopes, optimize_alpha
from lingraft.bounds.input_set import InputSet
from lingraft.bounds.ops.base import BoundOp
from lingraft.bounds.optimizer import ParamGroup, ProjectedAdam
from lingraft.clock import now

#: a domain whose clamped pre-activation bounds cross by more than this is empty (a sound lower bound above
#: a sound upper bound); smaller crossings are treated as rounding noise and bounded normally
INFEASIBLE_TOL = 1e-4


@dataclass
class Bounded:
    """Result of bounding B domains with S specification rows.

    lower: [B, S] lower bounds of C f(x); infeasible: [B] bool (the domain's split decisions are contradictory);
    bounds: the engine's intermediate bounds (list by node, [B, *shape] pairs); alphas: {ReLU node: [B, S, *shape]}
    optimized slopes (warm start for children); relu_lA: {ReLU node: [B, S, *shape]} lower-bound coefficients
    at each ReLU output from the last pass (only when requested; used by the branching heuristic).
    """

    lower: Tensor
    infeasible: Tensor
    bounds: list
    alphas: dict = field(default_factory=dict)
    relu_lA: dict = field(default_factory=dict)


def relu_op(net: BoundedNetwork, k: int) -> BoundOp:
    """The splittable op (a ReLU) of node k (a key of ``net.relu_input_nodes()``)."""
    op = net.nodes[k].op
    if op is None or not op.splittable:
        raise TypeError(f"node {k} is a {type(op).__name__}, which has no neurons to split")
    return op


def split_clamps(net: BoundedNetwork, splits: dict[int, Tensor] | None) -> dict | None:
    """interm_bounds for the engine from split decisions {ReLU node: int8 [B, *shape]} (+1 active, -1 inactive,
    0 free): the pre-activation gets [0, inf) / (-inf, 0], the ReLU output of an inactive neuron (-inf, 0]."""
    if not splits:
        return None
    pre_of = net.relu_input_nodes()
    out = {}
    for k, s in splits.items():
        if not bool((s != 0).any()):
            continue
        s = s.to(net.device)
        zero = torch.zeros((), device=net.device)
        inf = torch.tensor(float("inf"), device=net.device)
        lo = torch.where(s > 0, zero, -inf)
        up = torch.where(s < 0, zero, inf)
        out[pre_of[k]] = (lo, up)
        out[k] = (torch.full_like(lo, float("-inf")), up)  # used only where the engine needs ReLU-output bounds
    return out or None


def infeasible_domains(net: BoundedNetwork, bounds: list, B: int) -> Tensor:
    """[B] bool: some clamped pre-activation interval is empty (lower > upper + INFEASIBLE_TOL)."""
    bad = torch.zeros(B, dtype=torch.bool, device=net.device)
    for pre in net.relu_input_nodes().values():
        b = bounds[pre]
        if b is not None:
            bad |= (b[0] > b[1] + INFEASIBLE_TOL).reshape(B, -1).any(1)
    return bad


def clamp_bounds(net: BoundedNetwork, base: list, splits: dict[int, Tensor] | None, B: int) -> list:
    """Intermediate bounds for B domains from fixed ``base`` bounds (list by node of [1 or B, *shape] pairs or
    None, e.g. the root's) with the split neurons' pre-activation intervals clamped as in :func:`split_clamps`."""
    out = [None if b is None else (b[0].expand(B, *b[0].shape[1:]), b[1].expand(B, *b[1].shape[1:])) for b in base]
    for node, (lo_c, up_c) in (split_clamps(net, splits) or {}).items():
        if out[node] is not None:
            out[node] = (torch.maximum(out[node][0], lo_c), torch.minimum(out[node][1], up_c))
    return out


def bound_domains(
    net: BoundedNetwork,
    x_L: Tensor,
    x_U: Tensor,
    C: Tensor,
    *,
    splits: dict[int, Tensor] | None = None,
    base_bounds: list | None = None,
    iterations: int = 0,
    alpha_init: dict[int, Tensor] | None = None,
    row_weight: Tensor | None = None,
    lr_alpha: float = 0.1,
    lr_beta: float = 0.05,
    record_lA: bool = False,
    target: Tensor | None = None,
    deadline: float | None = None,
    intermediate_alpha: bool = False,
    ref_bounds: list | None = None,
    settled_upto: Tensor | None = None,
) -> Bounded:
    """Bound C f(x) on B domains.

    x_L, x_U: [B, *in_shape]; C: [B, S, n_out]; splits: {ReLU node: int8 [B, *shape]}; base_bounds: if given,
    intermediate bounds are NOT recomputed: these fixed bounds (e.g. the root's, valid on every sub-domain) are
    used with the split neurons clamped (much cheaper on large networks, looser); iterations: alpha/beta
    optimization steps (0 = plain CROWN); alpha_init: {ReLU node: [B, S, *shape]} warm-start slopes;
    row_weight: [B, S] weights of the rows in the objective (0 = row already settled); target: [B, S] margins
    that count as done (the optimization stops once every weighted row exceeds them); deadline: a
    :func:`lingraft.clock.now` time: no optimisation step starts after it, and a CROWN pass still running then
    raises :class:`lingraft.clock.DeadlineExceeded`; intermediate_alpha:
    first run alpha-CROWN with slopes for every intermediate bound (:mod:`lingraft.bounds.alpha_crown`; for the
    root, without splits): the tightened intermediate bounds are kept in the result, so a search that reuses
    them (``base_bounds``) starts with fewer unstable neurons; ref_bounds: intermediate bounds known to hold on
    the domains (list by node of [B, *shape] pairs or None; in input splitting, the parent boxes'): CROWN runs
    only on the neurons they leave unstable and the result lies inside them (ignored with ``base_bounds``);
    settled_upto: [B] node index up to which each domain's ref_bounds are final (no CROWN pass there).
    """
    B, S = C.shape[:2]
    dev = net.device
    x_L, x_U, C = x_L.to(dev), x_U.to(dev), C.to(dev)
    if base_bounds is not None:
        bounds = clamp_bounds(net, base_bounds, splits, B)
    else:
        bounds = net.intermediate_bounds(
            x_L,
            x_U,
            interm_bounds=split_clamps(net, splits),
            deadline=deadline,
            ref_bounds=ref_bounds,
            settled_upto=settled_upto,
        )
    infeasible = infeasible_domains(net, bounds, B)
    C_out = C.reshape(B, S, *net.out_shape)
    w = torch.ones(B, S, device=dev) if row_weight is None else row_weight.to(dev, torch.float32)
    with torch.no_grad():
        best, _ = net.backward_bound(C_out, x_L, x_U, bounds, alphas=None)
    alphas: dict = {}
    betas = _initial_betas(net, splits, B, S) if iterations > 0 and splits else {}
    optimized = False
    if intermediate_alpha and iterations > 0 and not splits:
        # alpha-CROWN on every layer; its final slopes are the result (no second, final-layer-only optimisation)
        found = optimize_alpha(
            net, (C_out, InputSet(x_L, x_U), bounds), best, iterations, lr_alpha, target=target, deadline=deadline
        )
        best, bounds = torch.maximum(best, found.lower), found.bounds
        alphas = {k: {"l": a} for k, a in found.slopes.items()}
        optimized = bool(alphas)
    elif iterations > 0:
        alphas = _initial_alphas(net, bounds, B, S, alpha_init)
        if alphas or betas:
            problem = (C_out, x_L, x_U, bounds)
            best = _optimize_alpha_beta(
                net, problem, alphas, betas, best, w, iterations, lr_alpha, lr_beta, target, deadline
            )
            optimized = True
    store: dict = {}
    if record_lA or optimized:
        # one more pass with the final slopes (its bound counts too), recording the ReLU coefficients if asked
        with torch.no_grad():
            lo, _ = net.backward_bound(
                C_out,
                x_L,
                x_U,
                bounds,
                alphas=alphas or None,
                extra_lA=_beta_terms(betas),
                record_lA=store if record_lA else None,
            )
        best = torch.maximum(best, lo)
    return Bounded(
        lower=best,
        infeasible=infeasible,
        bounds=bounds,
        alphas={k: v["l"].detach() for k, v in alphas.items()},
        relu_lA=store,
    )


def _initial_alphas(
    net: BoundedNetwork, bounds: list, B: int, S: int, alpha_init: dict[int, Tensor] | None
) -> dict[int, dict[str, Tensor]]:
    """Trainable lower slopes {ReLU node: {"l": [B, S, *shape]}} for the ReLUs with unstable neurons: the warm
    start where given, else CROWN's slopes (:func:`lingraft.bounds.alpha_crown.crown_slopes`)."""
    alphas = crown_slopes(net, bounds, B, S)
    for k in alphas:
        if alpha_init is not None and k in alpha_init:
            alphas[k] = {"l": alpha_init[k].to(net.device).clone().requires_grad_(True)}
    return alphas


def _initial_betas(net: BoundedNetwork, splits: dict[int, Tensor], B: int, S: int) -> dict[int, tuple[Tensor, Tensor]]:
    """{pre-activation node: (beta [B, S, *shape] = 0, trainable; split sign [B, 1, *shape] float)} for every
    ReLU with split neurons."""
    pre_of = net.relu_input_nodes()
    betas: dict[int, tuple[Tensor, Tensor]] = {}
    for k, s in splits.items():
        if not bool((s != 0).any()):
            continue
        sign = s.to(net.device, torch.float32).unsqueeze(1)  # [B, 1, *shape]
        beta = torch.zeros(B, S, *s.shape[1:], device=net.device, requires_grad=True)
        betas[pre_of[k]] = (beta, sign)
    return betas


def _beta_terms(betas: dict[int, tuple[Tensor, Tensor]]) -> dict[int, Tensor] | None:
    """The engine's extra_lA: coefficient ``-beta * s`` on each split pre-activation (None without splits)."""
    return {p: -beta * sign for p, (beta, sign) in betas.items()} or None


def _optimize_alpha_beta(
    net: BoundedNetwork,
    problem: tuple,
    alphas: dict[int, dict[str, Tensor]],
    betas: dict[int, tuple[Tensor, Tensor]],
    best: Tensor,
    w: Tensor,
    iterations: int,
    lr_alpha: float,
    lr_beta: float,
    target: Tensor | None,
    deadline: float | None,
) -> Tensor:
    """Projected Adam on the weighted sum of the lower bounds (alpha in [0, 1], beta >= 0; updated in place).
    problem: (C_out, x_L, x_U, bounds); best: [B, S] bound so far. -> the best bound [B, S] over all iterates."""
    C_out, x_L, x_U, bounds = problem
    opt = ProjectedAdam(
        [
            ParamGroup([a["l"] for a in alphas.values()], lr_alpha, 0.0, 1.0),
            ParamGroup([b for b, _ in betas.values()], lr_beta, 0.0, None),
        ]
    )
    for _ in range(iterations):
        if deadline is not None and now() > deadline:
            break
        if target is not None and bool(((best > target) | (w == 0)).all()):
            break
        lo, _ = net.backward_bound(C_out, x_L, x_U, bounds, alphas=alphas, extra_lA=_beta_terms(betas))
        best = torch.maximum(best, lo.detach())
        opt.step(-(lo * w).sum())
    return best


def input_coefficients(
    net: BoundedNetwork, x_L: Tensor, x_U: Tensor, C: Tensor, bounds: list, rows: Tensor, alphas: dict | None = None
) -> Tensor:
    """Input coefficients of the linear lower bound of row ``rows[b]`` for each domain b: lower(x) = a . x + c.

    Read off by differentiating the concretized bound w.r.t. the box (d/dx_L = a+, d/dx_U = a-); the
    intermediate bounds are constants here. x_L, x_U: [B, *in]; C: [B, S, n_out]; rows: [B] long.
    Returns a: [B, *in_shape].
    """
    B = x_L.shape[0]
    Cr = C.to(net.device)[torch.arange(B), rows].unsqueeze(1)  # [B, 1, n_out]
    xl = x_L.to(net.device).clone().requires_grad_(True)
    xu = x_U.to(net.device).clone().requires_grad_(True)
    al = None
    if alphas:
        al = {k: {"l": a[torch.arange(B), rows].unsqueeze(1)} for k, a in alphas.items()}
    with torch.enable_grad():
        lo, _ = net.backward_bound(Cr.reshape(B, 1, *net.out_shape), xl, xu, bounds, alphas=al)
        gl, gu = torch.autograd.grad(lo.sum(), [xl, xu], allow_unused=True)
    gl = torch.zeros_like(xl) if gl is None else gl
    gu = torch.zeros_like(xu) if gu is None else gu
    return (gl + gu).detach()
