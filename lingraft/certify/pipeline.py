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
import time
from dataclasses import dataclass, field, asdict

import torch
from torch import Tensor, nn

from lingraft.train.attack import pgd_attack
from lingraft.bounds import BoundedNetwork, margin_spec, input_box
from lingraft.bounds.tolerance import is_proved
from lingraft.errors import UsageError

STATUSES = ("verified", "falsified", "unknown", "misclassified", "timeout")


@dataclass
class SampleResult:
    index: int
    label: int
    prediction: int
    status: str
    margin_lower: float | None  # min over j of the bound method's lower bound of f_y - f_j (None if not bounded)
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
    neurons_per_layer: dict   # layer -> {"neurons": n, "grafted": g}
    time_per_sample_s: float  # mean bound-propagation time per bounded sample
    total_time_s: float
    samples: list = field(default_factory=list)
    # with bab_timeout: {"timeout_per_sample_s", "attempted", "verified", "falsified", "undecided", "time_s"}
    bab: dict | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        return d


def check_eps(eps: float) -> float:
    if eps is None or not isinstance(eps, (int, float)) or math.isnan(eps) or math.isinf(eps):
        raise UsageError(f"eps must be a finite number, got {eps!r}")
    if eps < 0:
        raise UsageError(f"eps must be >= 0, got {eps}")
    if eps > 1:
        raise UsageError(f"eps {eps} exceeds the input range [0, 1] (eps is in pixel/255 space: e.g. 0.1 or 8/255)")
    return float(eps)


def certify(model: nn.Module, x: Tensor, y: Tensor, eps: float, *, in_shape=None, method: str = "crown",
            norm: str = "inf", batch_size: int = 32, pgd_steps: int = 20, pgd_restarts: int = 1, seed: int = 0,
            timeout: float | None = None, indices=None, progress=None, alpha_iterations: int = 20,
            device=None, net: BoundedNetwork | None = None, bab_timeout: float = 0.0,
            bab_progress=None) -> CertifyReport:
    """Certify ``model`` on samples x [N, *in_shape] (values in [0, 1]) with labels y [N] at radius eps.

    progress: optional callable(n_done) for progress bars. timeout: wall-clock budget in seconds for the run.
    bab_timeout: > 0 runs branch and bound (:mod:`lingraft.certify.complete`) on every sample left ``unknown``, at most
    that many seconds each (L-inf only); bab_progress: optional callable(sample_index, outcome dict).
    """
    eps = check_eps(eps)
    norm = str(norm).lower().replace("l", "")
    if norm not in ("inf", "2"):
        raise UsageError(f"unknown norm {norm!r}; use 'inf' or '2'")
    bab_timeout = float(bab_timeout or 0.0)
    if math.isnan(bab_timeout) or bab_timeout < 0:
        raise UsageError(f"bab_timeout must be >= 0 seconds, got {bab_timeout}")
    if bab_timeout > 0 and norm != "inf":
        raise UsageError("branch and bound (--bab-timeout) splits boxes: it works with --norm inf only")
    t_start = time.perf_counter()
    model = model.eval()
    dev = torch.device(device) if device else next((p.device for p in model.parameters()), torch.device("cpu"))
    in_shape = tuple(in_shape or x.shape[1:])
    if net is None:
        net = BoundedNetwork(model, in_shape, device=dev)
    N = x.shape[0]
    indices = list(range(N)) if indices is None else list(indices)
    samples: list[SampleResult] = []
    unstable_sum: dict = {}
    bounded = 0
    bound_time = 0.0
    neurons = {}
    for s in range(0, N, batch_size):
        xb = x[s:s + batch_size].to(dev)
        yb = y[s:s + batch_size].to(dev)
        B = xb.shape[0]
        if timeout is not None and time.perf_counter() - t_start > timeout:
            for k in range(B):
                samples.append(SampleResult(indices[s + k], int(yb[k]), -1, "timeout", None, 0.0))
            if progress:
                progress(B)
            continue
        with torch.no_grad():
            logits = model(xb)
        pred = logits.argmax(1)
        correct = pred == yb
        _, attacked = pgd_attack(model, xb, yb, eps, steps=pgd_steps, restarts=pgd_restarts, norm=norm,
                                 seed=seed + s)
        attacked = attacked & correct
        todo = correct & ~attacked
        margins = torch.full((B,), float("nan"))
        proved = torch.zeros(B, dtype=torch.bool)
        per_time = 0.0
        if bool(todo.any()):
            xt, yt = xb[todo], yb[todo]
            if norm == "inf":
                xl, xu = input_box(xt, eps)
            else:
                xl, xu = input_box(xt, eps)  # the L2 ball lies in this box; the engine also uses the ball itself
            C = margin_spec(yt, net.num_outputs)
            res = net.compute_bounds(xl, xu, method=method, C=C, bound_upper=False, alpha_iterations=alpha_iterations,
                                     l2_center=(xt if norm == "2" else None), l2_eps=(eps if norm == "2" else None))
            margins[todo.cpu()] = res.lower.min(1).values.cpu()
            # float32 rounding grows with the magnitudes involved: |f_y - f_j| is made of logits of this size
            scale = 2 * logits[todo].abs().amax(1, keepdim=True).double() + res.lower.double().abs()
            proved[todo.cpu()] = is_proved(res.lower.double(), scale).all(1).cpu()
            bounded += int(todo.sum())
            bound_time += res.time_s
            per_time = res.time_s / int(todo.sum())
            for k, v in res.unstable.items():
                unstable_sum[k] = unstable_sum.get(k, 0) + int(v.sum())
            neurons = {k: {"neurons": n, "grafted": g} for k, (n, g) in res.neurons.items()}
        for k in range(B):
            if not bool(correct[k]):
                st, m = "misclassified", None
            elif bool(attacked[k]):
                st, m = "falsified", None
            else:
                m = float(margins[k])
                st = "verified" if bool(proved[k]) else "unknown"
            samples.append(SampleResult(indices[s + k], int(yb[k]), int(pred[k]), st, m,
                                        per_time if st in ("verified", "unknown") else 0.0))
        if progress:
            progress(B)
    bab = None
    if bab_timeout > 0:
        bab = _complete_unknowns(model, x, samples, eps, in_shape, net.num_outputs, bab_timeout, seed, dev,
                                 t_start, timeout, bab_progress)
    if not neurons:  # nothing was bounded: still report the layers (and grafted counts) from the graph
        neurons = {name: {"neurons": int(math.prod(op.shape)), "grafted": op.num_grafted}
                   for name, op in net.relu_layers()}
    rows = [asdict(r) for r in samples]
    counts, clean, pgd, cert = summarize_samples(rows)
    return CertifyReport(
        method=method, eps=eps, norm=norm, num_samples=len(rows), clean_acc=clean, pgd_acc=pgd,
        certified_acc=cert, counts=counts,
        unstable_per_layer={k: v / max(bounded, 1) for k, v in unstable_sum.items()},
        neurons_per_layer=neurons, time_per_sample_s=bound_time / max(bounded, 1),
        total_time_s=time.perf_counter() - t_start, samples=rows, bab=bab)


def summarize_samples(samples: list[dict]) -> tuple[dict, float, float, float]:
    """(count per status, clean accuracy, PGD accuracy, certified accuracy) of per-sample result dicts."""
    counts = {st: sum(1 for s in samples if s["status"] == st) for st in STATUSES}
    n = max(len(samples), 1)
    clean = sum(1 for s in samples if s["status"] not in ("misclassified", "timeout")) / n
    # PGD accuracy: robust to the PGD attack (a counterexample found later by branch and bound does not count)
    pgd = sum(1 for s in samples if s["status"] in ("verified", "unknown") or s.get("bab") == "sat") / n
    return counts, clean, pgd, counts["verified"] / n


def _complete_unknowns(model, x, samples: list[SampleResult], eps, in_shape, num_outputs, bab_timeout, seed, dev,
                       t_start, timeout, bab_progress) -> dict:
    """Branch and bound on each ``unknown`` sample (in place); returns the summary dict of CertifyReport.bab."""
    from lingraft.certify.complete import decide_sample

    summary = {"timeout_per_sample_s": bab_timeout, "attempted": 0, "verified": 0, "falsified": 0, "undecided": 0,
               "time_s": 0.0}
    for i, r in enumerate(samples):
        if r.status != "unknown":
            continue
        budget = bab_timeout
        if timeout is not None:
            budget = min(budget, timeout - (time.perf_counter() - t_start))
            if budget <= 0:
                break  # the run's budget is spent: the rest stay unknown
        out = decide_sample(model, x[i].to(dev), r.label, eps, in_shape=in_shape, num_outputs=num_outputs,
                            timeout=budget, seed=seed + i, device=dev)
        r.status, r.bab = out["status"], out["bab"]
        r.time_s += out["time_s"]
        summary["attempted"] += 1
        summary["time_s"] += out["time_s"]
        key = r.status if r.status in ("verified", "falsified") else "undecided"
        summary[key] += 1
        if bab_progress:
            bab_progress(r.index, out)
    return summary
