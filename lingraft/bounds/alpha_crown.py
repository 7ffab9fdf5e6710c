"""alpha-CROWN: optimise the lower slopes of unstable ReLUs, of every layer, by projected gradient ascent.

CROWN relaxes an unstable ReLU (l < 0 < u) from below by alpha * x with alpha in [0, 1]; any alpha is sound, so
the slopes can be chosen to maximise the bound. As in auto_LiRPA, every *start node* has its own slopes: the
final specification rows ([B, S, *relu_shape] per ReLU) and every intermediate pre-activation bounded by CROWN
(per (sample, unstable neuron) pair of that node: [P, *relu_shape] in the dense pass, the neuron's receptive
window [1, P, C, kh, kw] in the patch pass; "l" slopes for its lower bound and "u" for its upper bound).

Each iteration re-bounds the intermediate pairs in topological order with their slopes, intersects the result
with the tightest bounds found so far (CROWN's, then every earlier iteration's: all are sound, and the gradient
passes straight through the intersection), bounds the
specification with the tightened intermediate bounds, and takes an Adam step (lr decay 0.98 per step) on
-sum(lower) of the samples not yet proved; slopes are clipped to [0, 1]. A sample leaves the optimisation once
every row is proved (early stop). The bound returned is the elementwise best over the iterations, so it is never
looser than CROWN's (the warm start).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from lingraft.bounds.input_set import InputSet
from lingraft.bounds.optimizer import ParamGroup, ProjectedAdam
from lingraft.bounds.tolerance import is_proved
from lingraft.clock import now

if TYPE_CHECKING:
    from lingraft.bounds.engine import BoundedNetwork


class AlphaResult(NamedTuple):
    """What :func:`optimize_alpha` found. lower: [B, S], elementwise >= CROWN's; bounds: intermediate bounds (list
    by node of [B, *shape] pairs or None), the tightest of all passes, at least as tight as CROWN's; slopes: {ReLU
    node: [B, S, *shape]} the final specification's lower slopes of the pass that gave ``lower`` (CROWN's where a
    sample was not optimised), a warm start for a later optimisation (e.g. beta-CROWN's)."""

    lower: Tensor
    bounds: list
    slopes: dict


class _StartNode:
    """The unstable (sample, neuron) pairs of one intermediate node, and their slopes."""

    def __init__(self, index: int, rows: Tensor, b_idx: Tensor, alpha: dict):
        self.index, self.rows, self.b_idx, self.alpha = index, rows, b_idx, alpha

    def params(self) -> list[Tensor]:
        return [a for sides in self.alpha.values() for a in sides.values()]


def optimize_alpha(
    net: BoundedNetwork,
    problem: tuple[Tensor, InputSet, list],
    crown_lower: Tensor,
    iterations: int,
    lr: float,
    *,
    intermediate: bool = True,
    proof_scale: Tensor | None = None,
    target: Tensor | None = None,
    deadline: float | None = None,
    early_stop: bool = True,
) -> AlphaResult:
    """alpha-CROWN lower bounds of the specification.

    problem: (C_out [B, S, *out_shape], the input set (:class:`~lingraft.bounds.input_set.InputSet`, B samples),
    CROWN's intermediate bounds (list by node));
    crown_lower: [B, S].
    intermediate=False optimises the final specification's slopes only (intermediate bounds stay CROWN's).
    proof_scale: [B, 1] magnitude of the numbers behind each sample's bounds (see :mod:`lingraft.bounds.tolerance`);
    a sample stops early once every row clears the proof margin at that scale (default: the bound's own size).
    target: [B, S] lower bounds that count as done instead (branch and bound's thresholds); deadline: a
    :func:`lingraft.clock.now` time after which no further step starts. early_stop=False: every sample is
    optimised for all iterations, proved or not (as auto_LiRPA does; for comparisons).
    Returns an :class:`AlphaResult`: the tightest intermediate bounds of all passes, and the slopes of the last
    pass that raised some sample's bound. Samples CROWN already proves are not optimised at all.
    """
    C_out, inp, bounds = problem
    scale = torch.zeros_like(crown_lower[:, :1]) if proof_scale is None else proof_scale.to(crown_lower)
    done = _Done(scale, target, deadline, early_stop)
    todo = torch.nonzero(~done(crown_lower), as_tuple=True)[0]
    B, S = crown_lower.shape
    if iterations <= 0 or todo.numel() == 0:
        return AlphaResult(crown_lower.detach().clone(), bounds, crown_slopes(net, bounds, B, S, grad=False))
    if todo.numel() == B:
        return AlphaResult(*_optimize(net, C_out, inp, bounds, crown_lower, iterations, lr, intermediate, done))
    sub = [None if b is None else (b[0][todo], b[1][todo]) for b in bounds]
    lo, sub, sub_slopes = _optimize(
        net, C_out[todo], inp.select(todo), sub, crown_lower[todo], iterations, lr, intermediate, done[todo]
    )
    best = crown_lower.detach().clone()
    best[todo] = lo
    out = []
    for b, t in zip(bounds, sub):
        if b is None or t is None:
            out.append(b)
        else:
            lo_b, up_b = b[0].clone(), b[1].clone()
            lo_b[todo], up_b[todo] = t
            out.append((lo_b, up_b))
    slopes = crown_slopes(net, out, B, S, grad=False)
    for k, a in sub_slopes.items():
        if k in slopes:
            slopes[k][todo] = a
    return AlphaResult(best, out, slopes)


class _Done:
    """When a sample needs no more optimisation: every row of its lower bound clears the proof margin at scale
    |lower| + scale [B, 1], or exceeds target [B, S] when one is given; no step starts after the deadline."""

    def __init__(self, scale: Tensor, target: Tensor | None, deadline: float | None, early_stop: bool = True):
        self.scale, self.target, self.deadline, self.early_stop = scale, target, deadline, early_stop

    def __getitem__(self, idx: Tensor) -> _Done:
        target = None if self.target is None else self.target[idx]
        return _Done(self.scale[idx], target, self.deadline, self.early_stop)

    def __call__(self, lower: Tensor) -> Tensor:
        """lower [B, S] -> [B] bool."""
        if not self.early_stop:
            return torch.zeros(lower.shape[0], dtype=torch.bool, device=lower.device)
        if self.target is not None:
            return (lower > self.target.to(lower)).all(1)
        return is_proved(lower, lower.abs() + self.scale).all(1)

    def out_of_time(self) -> bool:
        return self.deadline is not None and now() > self.deadline


def _optimize(net, C_out, inp: InputSet, bounds, crown_lower, iterations, lr, intermediate, done: _Done):
    """:func:`optimize_alpha` on samples that all need it."""
    B, S = C_out.shape[:2]
    last = len(net.nodes) - 1
    final_alpha = crown_slopes(net, bounds, B, S)
    starts = _start_nodes(net, bounds) if intermediate else []
    best = crown_lower.detach().clone()
    best_slopes = {k: a["l"].detach().clone() for k, a in final_alpha.items()}
    if not (final_alpha or starts):  # no unstable ReLU: no slope to optimise
        return best, bounds, best_slopes
    opt: ProjectedAdam | None = None
    ref = bounds  # the tightest intermediate bounds so far: every pass is intersected with them
    for it in range(iterations + 1):
        cur = _tightened_bounds(net, starts, inp, ref)
        lo, _ = net._backward(last, C_out, inp, cur, False, alphas=final_alpha)
        ref = [None if b is None else (b[0].detach(), b[1].detach()) for b in cur]
        improved = (lo.detach() > best).any(1)  # [B]
        if bool(improved.any()):
            best = torch.maximum(best, lo.detach())
            best_slopes = {k: a["l"].detach().clone() for k, a in final_alpha.items()}
        open_samples = ~done(best)  # [B]: some row not yet proved (early stop per sample)
        if it == iterations or not bool(open_samples.any()) or done.out_of_time():
            break
        if opt is None:  # patch-form slopes are created by the first pass, so the optimiser starts here
            params = [a["l"] for a in final_alpha.values()] + [p for st in starts for p in st.params()]
            opt = ProjectedAdam([ParamGroup(params, lr, 0.0, 1.0)])
        opt.step(-(lo * open_samples.unsqueeze(1)).sum())
    return best, ref, best_slopes  # ref: the tightest intermediate bounds of all passes


def crown_slopes(net: BoundedNetwork, bounds: list, B: int, S: int, grad: bool = True) -> dict:
    """The specification's lower slopes as CROWN chooses them, for every op with slopes (``has_alpha``) that has an
    unstable neuron under ``bounds``: {node: {"l": [B, S, *shape]}} as leaves that require grad (alpha-CROWN's and
    beta-CROWN's starting point); grad=False: {node: [B, S, *shape]} plain tensors."""
    alphas: dict = {}
    for k, nd in enumerate(net.nodes):
        if nd.op is not None and nd.op.has_alpha and bounds[nd.inputs[0]] is not None:
            _, _, l_slope, unstable = nd.op.relaxation(*bounds[nd.inputs[0]])
            if bool(unstable.any()):
                a = l_slope.detach().unsqueeze(1).expand(B, S, *nd.shape).clone()
                alphas[k] = {"l": a.requires_grad_(True)} if grad else a
    return alphas


def _start_nodes(net: BoundedNetwork, bounds: list) -> list[_StartNode]:
    """The intermediate nodes CROWN bounded, with their unstable (sample, needed neuron) pairs and slopes."""
    out = []
    for i in net.crown_nodes():
        lo, up = bounds[i]
        B = lo.shape[0]
        needed = net.needed_rows(i)
        lo, up = lo.reshape(B, -1)[:, needed], up.reshape(B, -1)[:, needed]
        b_idx, col = torch.nonzero((lo < 0) & (up > 0), as_tuple=True)
        if b_idx.numel() == 0:
            continue
        alpha: dict = {}
        if net._chain(i) is None:  # dense pass: one slope per (pair, neuron) of every ReLU below
            for k in range(i):
                op = net.nodes[k].op
                if op is None or not op.has_alpha or bounds[net.nodes[k].inputs[0]] is None:
                    continue
                pre = bounds[net.nodes[k].inputs[0]]
                _, _, l_slope, unstable = op.relaxation(*pre)
                if bool(unstable[b_idx].any()):
                    a = l_slope.detach()[b_idx]
                    alpha[k] = {"l": a.clone().requires_grad_(True), "u": a.clone().requires_grad_(True)}
        out.append(_StartNode(i, needed[col], b_idx, alpha))
    return out


def _tightened_bounds(net: BoundedNetwork, starts: list[_StartNode], inp: InputSet, bounds: list):
    """``bounds`` with every start node's pairs re-bounded under its slopes (in order, each pass using the
    tightened bounds of the nodes below) and intersected with the given bounds. Differentiable in the slopes."""
    cur = list(bounds)
    for st in starts:
        lo0, up0 = bounds[st.index]
        B = lo0.shape[0]
        l_r, u_r = net.bound_pairs(st.index, st.rows, st.b_idx, inp, cur, alpha=st.alpha)
        lo, up = lo0.reshape(B, -1), up0.reshape(B, -1)
        at = (st.b_idx, st.rows)
        # the value is the intersection (sound, and never looser than CROWN), the gradient is that of the
        # alpha bound alone: through torch.maximum it would vanish wherever CROWN is still tighter, and those
        # slopes would never move (measured: 20 iterations on CNN-B end 0.1 looser per margin that way)
        lo = lo.index_put(at, l_r + (torch.maximum(lo[at], l_r) - l_r).detach())
        up = up.index_put(at, u_r + (torch.minimum(up[at], u_r) - u_r).detach())
        cur[st.index] = (lo.reshape(lo0.shape), up.reshape(up0.shape))
    return cur
