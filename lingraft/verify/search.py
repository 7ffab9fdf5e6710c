"""What the two branch-and-bound searches (input splitting, ReLU splitting) share: their outcome, the choice of
each domain's worst open row, and the bookkeeping at the end of a round."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from lingraft.spec.region import RegionSpec, group_max


@dataclass
class SearchOutcome:
    status: str  # "unsat" (region safe), "sat", "unknown", "timeout"
    counterexample: tuple | None = None
    branches: int = 0
    max_depth: int = 0
    rounds: int = 0


def worst_rows(m: Tensor, open_c: Tensor, spec: RegionSpec) -> Tensor:
    """Per domain, the best row of its worst open conjunction: m [B, S], open_c [B, G] -> [B] row indices."""
    gm = group_max(m, spec.group, spec.G).masked_fill(~open_c, float("inf"))
    g = gm.argmin(1)  # worst open group
    in_g = spec.group.unsqueeze(0) == g.unsqueeze(1)  # [B, S]
    return m.masked_fill(~in_g, float("-inf")).argmax(1)


def queue_overflowed(
    out: SearchOutcome,
    heap: list,
    limit: int,
    round_time: float,
    log: Callable[[str], None],
    name: str,
    items: str,
    log_every: int,
) -> bool:
    """End of a round: True (and ``out.status = "unknown"``) when more than ``limit`` items wait in the heap
    (entries ``(priority, ...)``); otherwise logs the progress every ``log_every`` rounds and returns False.
    name: the search in the log ("relu-bab"); items: what it queues ("domains")."""
    if len(heap) > limit:
        log(f"  {name}: {len(heap)} {items} exceed the queue limit; giving up")
        out.status = "unknown"
        return True
    if out.rounds % log_every == 1:
        log(
            f"  {name} round {out.rounds}: {len(heap)} {items} left, worst margin "
            f"{heap[0][0] if heap else float('nan'):.4f}, {round_time:.2f}s/round"
        )
    return False
