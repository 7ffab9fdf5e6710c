"""Projected gradient attacks: PGD (L-inf / L2 balls and VNN-LIB boxes), a general linear-spec PGD, and FGSM.

All inputs are in [0, 1] pixel space (models normalize internally). Attacks never change the model's train/eval
mode and work whether or not the caller has gradients enabled. Randomness comes from ``seed`` (a private
generator) or an explicit ``generator``, so results are reproducible and the global RNG is left untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lingraft.errors import UsageError

__all__ = ["pgd_attack", "pgd_attack_spec", "fgsm", "margin_loss", "spec_margins"]


# --------------------------------------------------------------------------------------------- objectives


def margin_loss(logits: Tensor, y: Tensor) -> Tensor:
    """CW-style margin max_{j != y} z_j - z_y per sample: logits [B, K], y [B] -> [B] (> 0 means misclassified)."""
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf"))
    return others.max(dim=1).values - z_y


def spec_margins(logits: Tensor, C: Tensor, d: Tensor | None = None) -> Tensor:
    """Rows of the linear spec C f(x) + d: logits [B, K], C [B, R, K] or [R, K], d [B, R] or [R] -> [B, R]."""
    logits = logits.reshape(logits.shape[0], -1)
    if C.dim() == 2:
        out = logits @ C.T
    else:
        out = torch.einsum("brk,bk->br", C, logits)
    return out if d is None else out + d


# --------------------------------------------------------------------------------------------- helpers


def _rand(shape, generator: torch.Generator | None, like: Tensor, normal: bool = False) -> Tensor:
    """Uniform [0,1) (or standard normal) noise of ``shape`` on like's device, drawn from ``generator``."""
    fn = torch.randn if normal else torch.rand
    if generator is None:
        return fn(shape, device=like.device, dtype=like.dtype)
    out = fn(shape, generator=generator, device=generator.device, dtype=like.dtype)
    return out.to(like.device)


def _make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


def _bound(v, like: Tensor) -> Tensor:
    """A float or tensor bound broadcast to like's shape (a [B, ...] box, or a scalar)."""
    t = torch.as_tensor(v, dtype=like.dtype, device=like.device)
    return torch.broadcast_to(t, like.shape).clone()


def _per_sample_norm(t: Tensor) -> Tensor:
    """L2 norm of each sample, shaped [B, 1, 1, ...] for broadcasting."""
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).reshape((-1,) + (1,) * (t.dim() - 1))


class _Problem:
    """What the generic PGD loop needs: a per-sample objective to maximise and a per-sample success test."""

    def __init__(self, objective: Callable[[Tensor, Tensor], Tensor], success: Callable[[Tensor, Tensor], Tensor]):
        self.objective = objective  # (logits of the active samples, their batch indices) -> [b]
        self.success = success  # (logits, indices) -> [b] bool


class _BestIterates:
    """Per sample, the best point found so far: the first success, else the highest objective."""

    def __init__(self, model: nn.Module, x_start: Tensor, problem: _Problem):
        self.problem = problem
        all_idx = torch.arange(x_start.shape[0], device=x_start.device)
        with torch.no_grad():
            logits = model(x_start)
            self.obj = problem.objective(logits, all_idx).detach().clone()  # [B]
            self.succ = problem.success(logits, all_idx).clone()  # [B] bool
        self.x = x_start.detach().clone()  # [B, ...]

    def record(self, xa: Tensor, logits: Tensor, idx: Tensor) -> Tensor:
        """Offer the points xa [b, ...] (logits [b, K]) of samples idx [b]; returns their success [b] bool."""
        obj = self.problem.objective(logits, idx).detach()
        s = self.problem.success(logits, idx)
        new_succ = s & ~self.succ[idx]
        # already-successful samples keep their witness; others take any improvement or a first success
        upd = ((obj > self.obj[idx]) & ~self.succ[idx]) | new_succ
        if upd.any():
            self.obj[idx[upd]] = obj[upd]
            self.x[idx[upd]] = xa[upd].detach()
        self.succ[idx[new_succ]] = True
        return s


@dataclass
class _Restart:
    """The samples one restart still attacks: indices [b], iterates [b, ...], feasible box and step."""

    idx: Tensor
    xa: Tensor
    lo: Tensor
    hi: Tensor
    step: Tensor | float
    odi_w: Tensor | None = None  # [b, K] output-diversification direction, drawn at the first ODI step

    def keep(self, keep: Tensor, grad: Tensor) -> Tensor:
        """Drop the samples where ``keep`` [b] is False; returns grad [b, ...] restricted the same way."""
        self.idx, self.xa, self.lo, self.hi = self.idx[keep], self.xa[keep], self.lo[keep], self.hi[keep]
        if isinstance(self.step, Tensor):
            self.step = self.step[keep]
        if self.odi_w is not None:
            self.odi_w = self.odi_w[keep]
        return grad[keep]


def _random_start(
    lo: Tensor, hi: Tensor, center: Tensor | None, eps: float | None, l2: bool, generator: torch.Generator | None
) -> Tensor:
    """A random feasible point per sample: uniform in the box, or uniform radius on a random L2 direction."""
    if l2:
        direction = _rand(center.shape, generator, center, normal=True)
        direction = direction / _per_sample_norm(direction)
        radius = eps * _rand((center.shape[0],) + (1,) * (center.dim() - 1), generator, center)
        return torch.min(torch.max(center + direction * radius, lo), hi)
    return lo + (hi - lo) * _rand(lo.shape, generator, lo)


def _ascent_direction(
    model: nn.Module, problem: _Problem, r: _Restart, odi: bool, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """(gradient [b, ...] of the objective, or of the ODI objective w . f(x), at r.xa; logits [b, K] there)."""
    with torch.enable_grad():
        xr = r.xa.detach().requires_grad_(True)
        logits = model(xr)
        if odi:
            flat = logits.flatten(1)
            if r.odi_w is None:
                r.odi_w = 2 * _rand(flat.shape, generator, flat) - 1
            obj = (r.odi_w * flat).sum(1)
        else:
            obj = problem.objective(logits, r.idx)
        (grad,) = torch.autograd.grad(obj.sum(), xr)
    return grad, logits.detach()


def _step(r: _Restart, grad: Tensor, odi: bool, center: Tensor | None, eps: float | None, l2: bool) -> None:
    """One projected ascent step of r.xa: signed (L-inf/box) or normalised (L2) gradient, then projection."""
    with torch.no_grad():
        if odi:  # jump by the radius: eps for L2, the half-width of the feasible box otherwise
            cur = eps if l2 else (r.hi - r.lo) / 2
        else:
            cur = r.step
        xa = r.xa
        if l2:
            c_i = center[r.idx]
            xa = xa + cur * grad / _per_sample_norm(grad)
            delta = xa - c_i
            delta = delta * (eps / _per_sample_norm(delta)).clamp(max=1.0)
            xa = c_i + delta
        else:
            xa = xa + cur * grad.sign()
        r.xa = torch.min(torch.max(xa, r.lo), r.hi)


@dataclass
class _Ascent:
    """What every restart of one PGD run shares: ``odi_steps`` ODI steps then ``steps`` PGD steps; the L2 ball's
    center [B, ...] and radius eps when l2 (else the box alone bounds the steps); the random generator;
    early_stop: drop samples from the computation once they succeed."""

    steps: int
    odi_steps: int
    center: Tensor | None
    eps: float | None
    l2: bool
    generator: torch.Generator | None
    early_stop: bool


def _run_restart(model: nn.Module, problem: _Problem, best: _BestIterates, r: _Restart, a: _Ascent) -> None:
    """The ascent ``a`` from r.xa, offering every iterate to ``best``."""
    for t in range(a.odi_steps + a.steps):
        odi = t < a.odi_steps
        grad, logits = _ascent_direction(model, problem, r, odi, a.generator)
        s = best.record(r.xa, logits, r.idx)
        if a.early_stop:
            keep = ~s
            if not keep.any():
                return
            if not keep.all():
                grad = r.keep(keep, grad)
        _step(r, grad, odi, a.center, a.eps, a.l2)
    if r.idx.numel() > 0:
        with torch.no_grad():
            best.record(r.xa, model(r.xa), r.idx)


def _pgd(
    model: nn.Module,
    x_start: Tensor,
    lo: Tensor,
    hi: Tensor,
    problem: _Problem,
    *,
    steps: int,
    restarts: int,
    step: Tensor | float,
    norm: str,
    center: Tensor | None,
    eps: float | None,
    generator: torch.Generator | None,
    early_stop: bool,
    odi_steps: int = 0,
) -> tuple[Tensor, Tensor]:
    """Generic PGD maximising ``problem.objective`` over {lo <= x <= hi} (∩ L2 ball around ``center`` for norm "2").

    x_start [B, ...] (feasible) is evaluated first; each restart begins at a random feasible point, optionally
    followed by ``odi_steps`` output-diversified steps (Tashiro et al. 2020: ascend w . f(x) for a random
    w ~ U[-1, 1]^K, step = the radius) that spread the starts out. The best iterate per sample (first success, else
    highest objective) is returned with a final plain-forward success test.
    """
    all_idx = torch.arange(x_start.shape[0], device=x_start.device)
    l2 = norm == "2" and eps is not None
    best = _BestIterates(model, x_start, problem)
    ascent = _Ascent(steps, odi_steps, center, eps, l2, generator, early_stop)
    for _ in range(max(int(restarts), 0)):
        idx = (~best.succ).nonzero().squeeze(1) if early_stop else all_idx
        if idx.numel() == 0 or steps <= 0:
            break
        lo_i, hi_i = lo[idx], hi[idx]
        xa = _random_start(lo_i, hi_i, center[idx] if l2 else None, eps, l2, generator)
        r = _Restart(idx, xa, lo_i, hi_i, step[idx] if isinstance(step, Tensor) else step)
        _run_restart(model, problem, best, r, ascent)

    with torch.no_grad():  # re-check the returned points with a plain forward pass
        final = problem.success(model(best.x), all_idx)
    return best.x, final


# --------------------------------------------------------------------------------------------- public attacks


def pgd_attack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float | None,
    *,
    norm: str = "inf",
    x_min: float | Tensor = 0.0,
    x_max: float | Tensor = 1.0,
    steps: int = 20,
    restarts: int = 1,
    step_size: float | None = None,
    loss: str = "margin",
    early_stop: bool = True,
    odi_steps: int = 0,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Untargeted PGD: maximise the margin (or CE) loss of label ``y`` inside the eps-ball ∩ [x_min, x_max].

    x [B, ...] in [0, 1], y [B] int64. ``x_min``/``x_max`` are floats or [B, ...] tensors (e.g. a VNN-LIB box);
    with ``eps=None`` the feasible set is just that box. ``norm`` is "inf" or "2". The default step is
    2.5 * eps / steps (2.5 * box half-width / steps per coordinate when eps is None). Random start in the
    feasible set for every restart; the clean x is evaluated first, so eps=0 returns x unchanged.

    Returns (x_adv [B, ...] inside the feasible set, success [B] bool = the model misclassifies x_adv, re-checked
    by a plain forward pass). ``early_stop`` drops samples from the computation once they are misclassified.
    ``odi_steps`` > 0 adds output-diversified initialization steps to each restart. Deterministic given ``seed``
    (or ``generator``).
    """
    norm = str(norm).lower().replace("l", "")
    if norm not in ("inf", "2"):
        raise UsageError(f"unknown attack norm {norm!r}; use 'inf' or '2'")
    if loss not in ("margin", "ce"):
        raise UsageError(f"unknown attack loss {loss!r}; use 'margin' or 'ce'")
    if eps is not None and eps < 0:
        raise UsageError(f"eps must be >= 0, got {eps}")
    x = x.detach()
    y = y.to(x.device)
    box_lo, box_hi = _bound(x_min, x), _bound(x_max, x)
    if eps is None or norm == "2":
        lo, hi = box_lo, box_hi
    else:
        lo, hi = torch.max(x - eps, box_lo), torch.min(x + eps, box_hi)
    if eps is None:
        step: Tensor | float = (2.5 * (hi - lo) / 2 / max(steps, 1)) if step_size is None else float(step_size)
        x_start = torch.min(torch.max(x, lo), hi)
    else:
        step = 2.5 * eps / max(steps, 1) if step_size is None else float(step_size)
        x_start = x
    if generator is None:
        generator = _make_generator(seed, x.device)

    def objective(logits, idx):
        if loss == "ce":
            return F.cross_entropy(logits, y[idx], reduction="none")
        return margin_loss(logits, y[idx])

    def success(logits, idx):
        return logits.argmax(dim=1) != y[idx]

    steps_eff = 0 if (eps is not None and eps == 0) else steps
    return _pgd(
        model,
        x_start,
        lo,
        hi,
        _Problem(objective, success),
        steps=steps_eff,
        restarts=restarts,
        step=step,
        norm=norm if eps is not None else "inf",
        center=x,
        eps=eps,
        generator=generator,
        early_stop=early_stop,
        odi_steps=odi_steps if steps_eff else 0,
    )


def pgd_attack_spec(
    model: nn.Module,
    x_lower: Tensor,
    x_upper: Tensor,
    C: Tensor,
    *,
    d: Tensor | None = None,
    steps: int = 50,
    restarts: int = 10,
    step_size: float | None = None,
    seed: int | None = 0,
    early_stop: bool = True,
    odi_steps: int = 5,
) -> tuple[Tensor, Tensor]:
    """Search the box [x_lower, x_upper] for an input violating a linear output specification.

    Sign convention: the property HOLDS iff every row of C f(x) + d is > 0 (e.g. row "y_label - y_j" for
    robustness). A point VIOLATES it iff some row is <= 0; the attack minimises the smallest row.
    x_lower/x_upper [B, ...]; C [B, R, K] or [R, K]; d [B, R], [R] or None. The unsafe set is a disjunction of
    single rows; a VNN-LIB disjunct that is a conjunction of several rows must be attacked by the caller.
    Each restart starts at a random point followed by ``odi_steps`` output-diversified steps (these find
    counterexamples that plain PGD misses, e.g. VNN-COMP mnist_fc prop_2).

    Returns (x_adv [B, ...] inside the box, violated [B] bool, re-checked by a plain forward pass).
    """
    x_lower, x_upper = x_lower.detach(), x_upper.detach()
    if x_lower.shape != x_upper.shape:
        raise UsageError(f"box bounds differ in shape: {tuple(x_lower.shape)} vs {tuple(x_upper.shape)}")
    if (x_lower > x_upper).any():
        raise UsageError("box has a lower bound above its upper bound; check the VNN-LIB input constraints")
    C = C.to(x_lower.device, x_lower.dtype)
    d = None if d is None else d.to(x_lower.device, x_lower.dtype)

    def rows(logits, idx):
        Ci = C if C.dim() == 2 else C[idx]
        di = None if d is None else (d if d.dim() == 1 else d[idx])
        return spec_margins(logits, Ci, di)

    def objective(logits, idx):
        return -rows(logits, idx).min(dim=1).values

    def success(logits, idx):
        return rows(logits, idx).min(dim=1).values <= 0

    steps = max(int(steps), 1)
    step = (2.5 * (x_upper - x_lower) / 2 / steps) if step_size is None else float(step_size)
    centre = (x_lower + x_upper) / 2
    return _pgd(
        model,
        centre,
        x_lower,
        x_upper,
        _Problem(objective, success),
        steps=steps,
        restarts=restarts,
        step=step,
        norm="inf",
        center=None,
        eps=None,
        generator=_make_generator(seed, x_lower.device),
        early_stop=early_stop,
        odi_steps=max(int(odi_steps), 0),
    )


def fgsm(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    *,
    step_size: float | None = None,
    random_start: bool = True,
    x_min: float = 0.0,
    x_max: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One signed-gradient step on the CE loss ("fast is better than free", Wong et al. 2020).

    delta starts uniform in [-eps, eps] (if ``random_start``), then delta += step_size * sign(grad) (default
    step 1.25 * eps), projected to [-eps, eps] and to [x_min, x_max]. x [B, ...], y [B] -> x_adv [B, ...] detached.
    Uses the model in whatever mode the caller set (train mode during training).
    """
    x = x.detach()
    if eps <= 0:
        return x.clone()
    step = 1.25 * eps if step_size is None else float(step_size)
    delta = (2 * _rand(x.shape, generator, x) - 1) * eps if random_start else torch.zeros_like(x)
    delta = (x + delta).clamp(x_min, x_max) - x
    with torch.enable_grad():
        xr = (x + delta).requires_grad_(True)
        loss = F.cross_entropy(model(xr), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, xr)
    delta = (delta + step * grad.sign()).clamp(-eps, eps)
    return (x + delta).clamp(x_min, x_max).detach()
