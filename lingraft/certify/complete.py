"""Complete verification of the samples that bound propagation left undecided.

``lingraft certify --bab-timeout S`` hands every ``unknown`` sample to the pipeline of ``lingraft verify``
(counterexample search, alpha-CROWN, then branch and bound over ReLU splits; grafted neurons are never split)
with the L-inf robustness property of that sample, for at most S seconds each:

  unsat            -> the sample becomes ``verified`` (every margin proven positive on every branch);
  sat              -> ``falsified`` (the counterexample was re-checked by a forward pass before it is reported);
  timeout/unknown  -> stays ``unknown``; error -> stays ``unknown`` and the message is kept.

The property's box is the one certify bounds (``input_box``: the L-inf ball clipped to [0, 1]), and its unsafe set
is "y_label - y_j <= 0 for some j != label", so ``verified`` means the same thing with or without branch and bound.
"""

from __future__ import annotations

from torch import Tensor, nn

from lingraft.clock import Stopwatch
from lingraft.spec.benchmark import robustness_property

#: VerifyResult status -> certify status
STATUS_FROM_BAB = {
    "unsat": "verified",
    "sat": "falsified",
    "timeout": "unknown",
    "unknown": "unknown",
    "error": "unknown",
}


def decide_sample(
    model: nn.Module,
    x: Tensor,
    label: int,
    eps: float,
    *,
    in_shape,
    num_outputs: int,
    timeout: float,
    seed: int = 0,
    device=None,
) -> dict:
    """Run branch and bound on one sample x [*in_shape]. Returns {"status": certify status, "bab": verify status,
    "time_s": float, "branches": int, "method": what decided it, "counterexample": (x [n_in], y [n_out]) float64
    arrays for ``sat`` else None, "error": str (only on error)}."""
    from lingraft.verify.core import verify_property  # the verify package imports the engine; keep certify light

    watch = Stopwatch()
    prop = robustness_property(x, int(label), float(eps), int(num_outputs))
    res = verify_property(
        model, prop, timeout=max(float(timeout), 1e-3), in_shape=tuple(in_shape), seed=seed, device=device
    )
    out = {
        "status": STATUS_FROM_BAB.get(res.status, "unknown"),
        "bab": res.status,
        "time_s": watch.elapsed(),
        "branches": int(res.stats.get("branches", 0)),
        "method": res.stats.get("method"),
        "counterexample": res.counterexample,
    }
    if res.status == "error":
        out["error"] = str(res.stats.get("error", ""))
    return out
