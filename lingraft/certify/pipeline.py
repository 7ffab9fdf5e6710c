"""Certification pipeline: clean check, PGD attack, then bound propagation, per sample.

A sample is, in this order of precedence:
  misclassified  - the clean input is already wrong;
  falsified      - PGD found an adversarial example inside the ball (never counted as certified);
  verified       - the lower bound of every margin f_y - f_j over the ball clears the float32 proof margin
                   (:mod:`lingraft.bounds.tolerance`: 1e-5 plus 1e-5 of the logits' size; or, with ``bab_timeout``,
                   branch and bound proved it: field ``bab`` is "unsat");
  unknown        - neither (with ``bab_timeout``: branch and bound also ran out of time);
  timeout        - the run's time budget ran out before the sample was bounded.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from lingraft.bounds import BoundedNetwork, input_box, margin_spec
from lingraft.bounds.tolerance import is_proved
from lingraft.clock import Stopwatch
from lingraft.errors import UsageError
from lingraft.train.attack import pgd_attack

STATUSES = ("verified", "falsified", "unknown", "misclassified", "timeout")


@dataclass
class SampleResult:
    index: int
    label: int
    prediction: int
    status: str
    margin_lower: float | None  # min over j of the bound method's lower bound of f_y - f_j (None if not bounded)
    # seconds spent on this sample: its share of its batch's bound time (the samples of a batch are bounded
    # together, so the share is the batch's time / samples bounded in it), plus its own branch-and-bound time
    time_s: float
    bab: str | None = None  # branch-and-bound outcome (unsat/sat/timeout/unknown/error) when it ran on this sample


@dataclass
class CertifyReport:
    method: str
    eps: float
    norm: str
    num_samples: int
    clean_acc: float
    pgd_acc: float
    certified_acc: float
    counts: dict
    unstable_per_layer: dict  # layer -> mean unstable (non-grafted) neurons per bounded image
    neurons_per_layer: dict  # layer -> {"neurons": n, "grafted": g}
    time_per_sample_s: float  # mean bound-propagation time per bounded sample
    total_time_s: float
    samples: list = field(default_factory=list)
    # with bab_timeout: {"timeout_per_sample_s", "attempted", "verified", "falsified", "undecided", "time_s"}
    bab: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class CertifySettings:
    """How :func:`certify` treats every sample: what the results depend on besides model, data and eps.

    norm: "inf" or "2" (also "Linf", "L2"); timeout: wall-clock budget in seconds for the run; bab_timeout:
    > 0 runs branch and bound (:mod:`lingraft.certify.complete`) on every sample left ``unknown``, at most that
    many seconds each (L-inf only). alpha_iterations / alpha_scope ("all": a slope per (start node, neuron) of
    every layer; "final": the specification's slopes only) apply to method "alpha-crown". The PGD seed of a
    batch is ``seed`` + the batch's first position.
    """

    method: str = "crown"
    norm: str = "inf"
    batch_size: int = 32
    pgd_steps: int = 20
    pgd_restarts: int = 1
    seed: int = 0
    timeout: float | None = None
    alpha_iterations: int = 20
    bab_timeout: float = 0.0
    alpha_scope: str = "all"

    def checked(self) -> CertifySettings:
        """These settings with norm and bab_timeout normalised; UsageError when they cannot work."""
        norm = str(self.norm).lower().replace("l", "")
        if norm not in ("inf", "2"):
            raise UsageError(f"unknown norm {norm!r}; use 'inf' or '2'")
        if self.alpha_scope not in ("all", "final"):
            raise UsageError(f"unknown alpha scope {self.alpha_scope!r}; use 'all' or 'final'")
        bab_timeout = float(self.bab_timeout or 0.0)
        if math.isnan(bab_timeout) or bab_timeout < 0:
            raise UsageError(f"bab_timeout must be >= 0 seconds, got {bab_timeout}")
        if bab_timeout > 0 and norm != "inf":
            raise UsageError("branch and bound (--bab-timeout) splits boxes: it works with --norm inf only")
        return replace(self, norm=norm, bab_timeout=bab_timeout)


def check_eps(eps: float) -> float:
    if eps is None or not isinstance(eps, (int, float)) or math.isnan(eps) or math.isinf(eps):
        raise UsageError(f"eps must be a finite number, got {eps!r}")
    if eps < 0:
        raise UsageError(f"eps must be >= 0, got {eps}")
    if eps > 1:
        raise UsageError(
            f"eps {eps} exceeds the input range [0, 1] (eps is a radius in [0, 1] pixel space: for 8 of 255 grey "
            "levels write 8/255)"
        )
    return float(eps)


def default_eps(meta: dict | None) -> float:
    """The radius to certify a checkpoint at: its certify_eps, else its graft/training eps, else 0.1."""
    meta = meta or {}
    for v in (meta.get("certify_eps"), meta.get("eps"), (meta.get("config") or {}).get("eps")):
        if isinstance(v, (int, float)) and v == v:
            return float(v)
    return 0.1


@dataclass
class _BoundTally:
    """Running totals over the samples of a run that were bounded."""

    unstable: dict = field(default_factory=dict)  # layer -> unstable neurons summed over the bounded samples
    bounded: int = 0
    time_s: float = 0.0
    neurons: dict = field(default_factory=dict)  # layer -> {"neurons": n, "grafted": g}

    def add(self, res, n: int) -> None:
        self.bounded += n
        self.time_s += res.time_s
        for k, v in res.unstable.items():
            self.unstable[k] = self.unstable.get(k, 0) + int(v.sum())
        self.neurons = {k: {"neurons": n_, "grafted": g} for k, (n_, g) in res.neurons.items()}


def certify(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    settings: CertifySettings | None = None,
    *,
    in_shape: Sequence[int] | None = None,
    indices: Iterable[int] | None = None,
    progress: Callable[[int], Any] | None = None,
    device: torch.device | str | None = None,
    net: BoundedNetwork | None = None,
    bab_progress: Callable[[int, dict], Any] | None = None,
    **setting_overrides: Any,
) -> CertifyReport:
    """Certify ``model`` on samples x [N, *in_shape] (values in [0, 1]) with labels y [N] at radius eps.

    settings: :class:`CertifySettings`; keyword arguments named like its fields override them (so
    ``certify(model, x, y, eps, method="ibp")`` works). indices: the samples' dataset indices (default 0..N-1).
    progress: optional callable(n_done) for progress bars; bab_progress: optional callable(sample_index,
    outcome dict). net: a BoundedNetwork of ``model`` to reuse.
    """
    eps = check_eps(eps)
    cs = replace(settings or CertifySettings(), **setting_overrides).checked()
    watch = Stopwatch()
    model = model.eval()
    dev = torch.device(device) if device else next((p.device for p in model.parameters()), torch.device("cpu"))
    in_shape = tuple(in_shape or x.shape[1:])
    if net is None:
        net = BoundedNetwork(model, in_shape, device=dev)
    indices = list(range(x.shape[0])) if indices is None else list(indices)
    samples: list[SampleResult] = []
    tally = _BoundTally()
    for s in range(0, x.shape[0], cs.batch_size):
        xb, yb = x[s : s + cs.batch_size].to(dev), y[s : s + cs.batch_size].to(dev)
        if cs.timeout is not None and watch.elapsed() > cs.timeout:
            samples += [SampleResult(indices[s + k], int(yb[k]), -1, "timeout", None, 0.0) for k in range(len(xb))]
        else:
            samples += _certify_batch(model, net, xb, yb, eps, cs, indices[s : s + len(xb)], cs.seed + s, tally)
        if progress:
            progress(len(xb))
    bab = None
    if cs.bab_timeout > 0:
        bab = _complete_unknowns(
            model,
            x,
            samples,
            eps,
            in_shape,
            net.num_outputs,
            cs.bab_timeout,
            cs.seed,
            dev,
            watch,
            cs.timeout,
            bab_progress,
        )
    if not tally.neurons:  # nothing was bounded: still report the layers (and grafted counts) from the graph
        tally.neurons = {
            name: {"neurons": int(math.prod(op.shape)), "grafted": op.num_grafted} for name, op in net.relu_layers()
        }
    rows = [asdict(r) for r in samples]
    counts, clean, pgd, cert = summarize_samples(rows)
    return CertifyReport(
        method=cs.method,
        eps=eps,
        norm=cs.norm,
        num_samples=len(rows),
        clean_acc=clean,
        pgd_acc=pgd,
        certified_acc=cert,
        counts=counts,
        unstable_per_layer={k: v / max(tally.bounded, 1) for k, v in tally.unstable.items()},
        neurons_per_layer=tally.neurons,
        time_per_sample_s=tally.time_s / max(tally.bounded, 1),
        total_time_s=watch.elapsed(),
        samples=rows,
        bab=bab,
    )


def _certify_batch(
    model: nn.Module,
    net: BoundedNetwork,
    xb: Tensor,
    yb: Tensor,
    eps: float,
    cs: CertifySettings,
    indices: list,
    seed: int,
    tally: _BoundTally,
) -> list[SampleResult]:
    """Clean check, attack, bounds of one batch xb [B, *in_shape], yb [B] -> one SampleResult per sample."""
    with torch.no_grad():
        logits = model(xb)
    pred = logits.argmax(1)
    correct = pred == yb
    _, attacked = pgd_attack(model, xb, yb, eps, steps=cs.pgd_steps, restarts=cs.pgd_restarts, norm=cs.norm, seed=seed)
    attacked = attacked & correct
    margins, proved, per_time = _bound(net, xb, yb, logits, correct & ~attacked, eps, cs, tally)
    return [
        _sample_result(
            indices[k],
            int(yb[k]),
            int(pred[k]),
            bool(correct[k]),
            bool(attacked[k]),
            float(margins[k]),
            bool(proved[k]),
            per_time,
        )
        for k in range(len(xb))
    ]


def _bound(
    net: BoundedNetwork,
    xb: Tensor,
    yb: Tensor,
    logits: Tensor,
    todo: Tensor,
    eps: float,
    cs: CertifySettings,
    tally: _BoundTally,
) -> tuple[Tensor, Tensor, float]:
    """Bound the margins of the samples marked in todo [B] (bool). Returns (smallest margin lower bound [B], nan
    where not bounded; proved [B] bool; bound time per bounded sample)."""
    B = xb.shape[0]
    margins = torch.full((B,), float("nan"))
    proved = torch.zeros(B, dtype=torch.bool)
    if not bool(todo.any()):
        return margins, proved, 0.0
    xt, yt = xb[todo], yb[todo]
    xl, xu = input_box(xt, eps)  # for L2 the ball lies in this box; the engine also uses the ball itself
    C = margin_spec(yt, net.num_outputs)
    l2 = cs.norm == "2"
    # float32 rounding grows with the magnitudes involved: |f_y - f_j| is made of logits of this size
    logit_scale = 2 * logits[todo].abs().amax(1, keepdim=True)
    res = net.compute_bounds(
        xl,
        xu,
        method=cs.method,
        C=C,
        bound_upper=False,
        alpha_iterations=cs.alpha_iterations,
        alpha_intermediate=cs.alpha_scope == "all",
        l2_center=(xt if l2 else None),
        l2_eps=(eps if l2 else None),
        proof_scale=logit_scale,
    )
    margins[todo.cpu()] = res.lower.min(1).values.cpu()
    scale = logit_scale.double() + res.lower.double().abs()
    proved[todo.cpu()] = is_proved(res.lower.double(), scale).all(1).cpu()
    n = int(todo.sum())
    tally.add(res, n)
    return margins, proved, res.time_s / n


def _sample_result(
    index: int,
    label: int,
    prediction: int,
    correct: bool,
    attacked: bool,
    margin: float,
    proved: bool,
    bound_time: float,
) -> SampleResult:
    """The status of one sample, by the precedence of the module docstring."""
    if not correct:
        return SampleResult(index, label, prediction, "misclassified", None, 0.0)
    if attacked:
        return SampleResult(index, label, prediction, "falsified", None, 0.0)
    return SampleResult(index, label, prediction, "verified" if proved else "unknown", margin, bound_time)


def summarize_samples(samples: list[dict]) -> tuple[dict, float, float, float]:
    """(count per status, clean accuracy, PGD accuracy, certified accuracy) of per-sample result dicts."""
    counts = {st: sum(1 for s in samples if s["status"] == st) for st in STATUSES}
    n = max(len(samples), 1)
    clean = sum(1 for s in samples if s["status"] not in ("misclassified", "timeout")) / n
    # PGD accuracy: robust to the PGD attack (a counterexample found later by branch and bound does not count)
    pgd = sum(1 for s in samples if s["status"] in ("verified", "unknown") or s.get("bab") == "sat") / n
    return counts, clean, pgd, counts["verified"] / n


def _complete_unknowns(
    model,
    x,
    samples: list[SampleResult],
    eps,
    in_shape,
    num_outputs,
    bab_timeout,
    seed,
    dev,
    watch: Stopwatch,
    timeout,
    bab_progress,
) -> dict:
    """Branch and bound on each ``unknown`` sample (in place); returns the summary dict of CertifyReport.bab.
    ``timeout`` (None: no limit) counts from the start of ``watch``, the whole run's stopwatch."""
    from lingraft.certify.complete import decide_sample

    summary = {
        "timeout_per_sample_s": bab_timeout,
        "attempted": 0,
        "verified": 0,
        "falsified": 0,
        "undecided": 0,
        "time_s": 0.0,
    }
    for i, r in enumerate(samples):
        if r.status != "unknown":
            continue
        budget = bab_timeout
        if timeout is not None:
            budget = min(budget, timeout - watch.elapsed())
            if budget <= 0:
                break  # the run's budget is spent: the rest stay unknown
        out = decide_sample(
            model,
            x[i].to(dev),
            r.label,
            eps,
            in_shape=in_shape,
            num_outputs=num_outputs,
            timeout=budget,
            seed=seed + i,
            device=dev,
        )
        r.status, r.bab = out["status"], out["bab"]
        r.time_s += out["time_s"]
        summary["attempted"] += 1
        summary["time_s"] += out["time_s"]
        key = r.status if r.status in ("verified", "falsified") else "undecided"
        summary[key] += 1
        if bab_progress:
            bab_progress(r.index, out)
    return summary
