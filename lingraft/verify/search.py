"""What the two branch-and-bound searches (input splitting, ReLU splitting) share: their settings and the checks
before a round (:class:`BranchAndBound`), their outcome, the choice of each domain's worst open row, the
bookkeeping at the end of a round, and the bounds queued domains keep for their children (:class:`KeptBounds`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lingraft.bounds import BoundedNetwork
from lingraft.clock import now
from lingraft.spec.region import RegionSpec, group_max


@dataclass
class SearchOutcome:
    status: str  # "unsat" (region safe), "sat", "unknown", "timeout"
    counterexample: tuple | None = None
    branches: int = 0
    max_depth: int = 0
    rounds: int = 0

    def found(self, counterexample: tuple) -> SearchOutcome:
        """This outcome, now ``sat`` with ``counterexample`` (x, y)."""
        self.status, self.counterexample = "sat", counterexample
        return self


class BranchAndBound:
    """The settings both searches share; a subclass adds ``run`` (the search) and its own defaults.

    net: the bound engine's network; spec: the region's tensors; model: the PyTorch model (for concrete checks and
    attacks); confirm: callable(x [N, *in], violation [N]) -> (x, y) or None (the independent re-check);
    deadline: a :func:`lingraft.clock.now` value to stop at; batch_size: items popped per round (None: the class's
    ``BATCH_SIZE``); iterations: alpha(/beta) steps per bounding call (None: ``ITERATIONS``); max_rounds: rounds
    at most (None: until the deadline), then ``unknown``.
    """

    BATCH_SIZE = 64
    ITERATIONS = 8

    def __init__(
        self,
        net: BoundedNetwork,
        spec: RegionSpec,
        model,
        confirm: Callable,
        deadline: float,
        *,
        batch_size: int | None = None,
        iterations: int | None = None,
        max_rounds: int | None = None,
        log: Callable[[str], None] | None = None,
    ):
        self.net, self.spec, self.model, self.confirm = net, spec, model, confirm
        self.deadline = deadline
        # a work budget independent of the clock: the search ends "unknown" after this many rounds
        self.max_rounds = max_rounds
        self.batch_size = max(1, int(self.BATCH_SIZE if batch_size is None else batch_size))
        self.iterations = self.ITERATIONS if iterations is None else iterations
        self.log = log or (lambda s: None)

    def round_size(self, out: SearchOutcome, per_item: float, queued: int) -> int:
        """Before a round: how many queued items to pop, at most ``batch_size``, and no more than the last round's
        seconds per popped item (``per_item``; 0 before the first round) predict to finish by the deadline, so the
        budget's last seconds still bound a smaller round. 0 (and ``out.status`` "timeout" or "unknown") when not
        even one item fits or no rounds are left."""
        n = min(self.batch_size, queued)
        if per_item > 0:
            n = min(n, int((self.deadline - now()) / per_item))
        if n < 1:
            out.status = "timeout"
            return 0
        if self.max_rounds is not None and out.rounds >= self.max_rounds:
            out.status = "unknown"
            return 0
        return n


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


class KeptBounds:
    """The intermediate bounds queued domains keep for their children (both searches: a child's bounds are
    computed from its parent's, see ``ref_bounds`` in :func:`lingraft.verify.bounding.bound_domains`).

    root: the region's bounds (list by node of [1, *shape] pairs or None); a domain keeps a copy of the bounded
    nodes' (lower, upper) [*shape] (node 0, the box itself, excluded) while the copies of the queued domains fit
    in memory_bytes; a domain that kept none hands its children the root's (valid on every domain of the region).
    """

    def __init__(self, root: list, memory_bytes: float):
        self.root = root
        self.nodes = [j for j, b in enumerate(root) if j > 0 and b is not None]
        per_domain = sum(2 * 4 * int(root[j][0][0].numel()) for j in self.nodes)
        self.max_kept = int(memory_bytes // max(1, per_domain))

    def keep(self, bounds: list, i: int, queued: int) -> dict | None:
        """A copy of domain i's bounds (from a batch's ``bounds``), or None when ``queued`` domains already use
        the memory."""
        if queued >= self.max_kept:
            return None
        return {j: (bounds[j][0][i].clone(), bounds[j][1][i].clone()) for j in self.nodes}

    def for_children(self, kept: list, interleaved: bool) -> list:
        """Reference bounds of the 2n children of n parents (their ``keep`` results): list by node of
        [2n, *shape] pairs. interleaved: children are ordered parent by parent (ReLU splits: 0, 0, 1, 1, ...),
        else all first halves then all second halves (input splits: 0, 1, ..., 0, 1, ...)."""
        ref: list = [None] * len(self.root)
        for j in self.nodes:
            own = [self.root[j] if k is None else (k[j][0].unsqueeze(0), k[j][1].unsqueeze(0)) for k in kept]
            lo, up = torch.cat([o[0] for o in own]), torch.cat([o[1] for o in own])
            if interleaved:
                ref[j] = (lo.repeat_interleave(2, 0), up.repeat_interleave(2, 0))
            else:
                ref[j] = (torch.cat([lo, lo]), torch.cat([up, up]))
        return ref
