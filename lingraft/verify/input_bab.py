"""Branch and bound over the input box (for networks with few inputs, e.g. ACAS Xu's 5).

Each round pops the worst sub-boxes (most negative open margin first), bisects each along one dimension and
bounds all halves with one batched CROWN call. The split dimension is gradient-weighted: with the linear
lower bound ``a . x + c`` of the box's worst open row, dimension d gets the score ``|a_d| * width_d`` (how much
of the bound's looseness comes from that side of the box). The bound's minimizer ``x* = where(a > 0, x_L, x_U)``
and the box centre are evaluated concretely every round, so counterexamples show up as the boxes shrink.

Each sub-box starts from its parent's intermediate bounds (valid on every sub-box): CROWN runs only on the
neurons those leave unstable, and a child's bounds lie inside its parent's. On cifar_biasfield (16
inputs, 8 convolutions) that cuts a child's CROWN pass to a fraction of the root's.

Soundness: the region is safe only when every sub-box is refuted (each conjunction has a row whose lower-bound
margin clears the proof margin, see :meth:`RegionSpec.refuted`); the boxes always cover the region's
outward-rounded box exactly.
"""

from __future__ import annotations

import heapq
import itertools

import torch
from torch import Tensor

from lingraft.clock import Stopwatch
from lingraft.spec.region import group_max
from lingraft.verify.bounding import Bounded, bound_domains, input_coefficients
from lingraft.verify.search import BranchAndBound, KeptBounds, SearchOutcome, queue_overflowed, worst_rows

#: the search gives up (``unknown``) when more sub-boxes than this wait in the queue
MAX_BOXES = 2_000_000
#: queued boxes keep their intermediate bounds (for their children) while these take at most this many bytes
MAX_KEPT_BOUND_BYTES = 1 << 30


class InputBaB(BranchAndBound):
    """Input-splitting branch and bound for one region (see the module docstring); the settings are those of
    :class:`BranchAndBound`, with 512 boxes per round and plain CROWN bounds (no alpha steps) by default."""

    BATCH_SIZE = 512
    ITERATIONS = 0

    def _bound(self, x_L: Tensor, x_U: Tensor, open_p: Tensor, ref_bounds: list | None = None):
        """Bound B boxes (ref_bounds: bounds known to hold on them, see :func:`bound_domains`). Returns (margins
        [B, S], open groups [B, G], split dim [B], candidates [2B, *in], intermediate bounds)."""
        spec = self.spec
        B = x_L.shape[0]
        C = spec.C.unsqueeze(0).expand(B, -1, -1)
        rw = open_p[:, spec.group].float()
        res = bound_domains(
            self.net,
            x_L,
            x_U,
            C,
            iterations=self.iterations,
            row_weight=rw,
            target=spec.target(),
            deadline=self.deadline,
            ref_bounds=ref_bounds,
        )
        return self._assess(res, x_L, x_U, open_p)

    def _assess(self, res: Bounded, x_L: Tensor, x_U: Tensor, open_p: Tensor):
        """Margins, open groups, split dimensions and candidate points of B bounded boxes (see :meth:`_bound`)."""
        spec = self.spec
        B = x_L.shape[0]
        C = spec.C.unsqueeze(0).expand(B, -1, -1)
        m = spec.lower_margin(res.lower)
        open_c = open_p & ~spec.refuted(m)
        rows = worst_rows(m, open_c, spec)
        a = input_coefficients(self.net, x_L, x_U, C, res.bounds, rows, res.alphas or None)
        width = (x_U - x_L).reshape(B, -1)
        score = a.reshape(B, -1).abs() * width
        # a box whose bound ignores every input (a == 0) still needs splitting: fall back to the widest side
        score = torch.where(score.sum(1, keepdim=True) > 0, score, width)
        dim = score.argmax(1)
        xstar = torch.where(a > 0, x_L, x_U)
        cands = torch.cat([xstar, (x_L + x_U) / 2])
        return m, open_c, dim, cands, res.bounds

    def _check(self, cands: Tensor):
        """Concrete evaluation of candidate points (clipped into the attack box); confirm the best violators."""
        spec = self.spec
        x = torch.max(torch.min(cands, spec.a_U), spec.a_L)
        with torch.no_grad():
            # a float32 near miss (within the proof margin) may be unsafe in the reference pass: re-check it too
            v = spec.violation(self.model(x).float()) - spec.confirm_slack
        if not bool((v <= 0).any()):
            return None
        order = torch.argsort(v)
        return self.confirm(x[order], v[order])

    def run(self, root: Bounded | None = None) -> SearchOutcome:
        """The search; root: the region's own box already bounded with plain CROWN (reused, not recomputed)."""
        spec, dev = self.spec, self.net.device
        out = SearchOutcome("unsat")
        counter = itertools.count()
        heap: list = []
        x_L, x_U = spec.x_L, spec.x_U
        open0 = torch.ones(1, spec.G, dtype=torch.bool, device=dev)
        if root is not None:
            m, open_c, dim, cands, bounds = self._assess(root, x_L, x_U, open0)
        else:
            m, open_c, dim, cands, bounds = self._bound(x_L, x_U, open0)
        kept = KeptBounds(bounds, MAX_KEPT_BOUND_BYTES)
        out.branches = 1
        cex = self._check(cands)
        if cex is not None:
            return out.found(cex)
        if not bool(open_c.any()):
            return out
        pri = group_max(m, spec.group, spec.G).masked_fill(~open_c, float("inf")).min(1).values
        heapq.heappush(
            heap, (float(pri[0]), next(counter), x_L[0], x_U[0], open_c[0], int(dim[0]), 0, kept.keep(bounds, 0, 0))
        )
        per_box = 0.0  # seconds per popped box in the last round: predicts the next round's length
        while heap:
            size = self.round_size(out, per_box, len(heap))
            if size == 0:
                return out
            round_watch = Stopwatch()
            items = [heapq.heappop(heap) for _ in range(size)]
            lo2, up2, op2, depth = self._bisect(items)
            n = len(items)
            parents = kept.for_children([it[7] for it in items], interleaved=False)
            m, open_c, dim, cands, bounds = self._bound(lo2, up2, op2, parents)
            out.branches += 2 * n
            out.rounds += 1
            cex = self._check(cands)
            if cex is not None:
                return out.found(cex)
            live = torch.nonzero(open_c.any(1)).flatten()
            if live.numel():
                pri = group_max(m, spec.group, spec.G).masked_fill(~open_c, float("inf")).min(1).values
                dep = depth.repeat(2) + 1
                out.max_depth = max(out.max_depth, int(dep.max()))
                for i in live.tolist():
                    entry = (float(pri[i]), next(counter), lo2[i], up2[i], open_c[i], int(dim[i]), int(dep[i]))
                    heapq.heappush(heap, (*entry, kept.keep(bounds, i, len(heap))))
            round_time = round_watch.elapsed()
            per_box = round_time / n
            if queue_overflowed(out, heap, MAX_BOXES, round_time, self.log, "input-bab", "boxes", log_every=20):
                return out
        return out

    def _bisect(self, items: list) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Halve n popped boxes along their split dimensions. items: heap entries (priority, tiebreak, x_L, x_U,
        open groups [G], split dim, depth, kept bounds). -> (x_L, x_U [2n, *in]: the lower halves, then the upper
        halves; open groups [2n, G]; the parents' depths [n])."""
        dev = self.net.device
        lo = torch.stack([it[2] for it in items])
        up = torch.stack([it[3] for it in items])
        op = torch.stack([it[4] for it in items])
        d = torch.tensor([it[5] for it in items], device=dev)
        depth = torch.tensor([it[6] for it in items], device=dev)
        n = len(items)
        flat_lo, flat_up = lo.reshape(n, -1), up.reshape(n, -1)
        idx = torch.arange(n, device=dev)
        mid = (flat_lo[idx, d] + flat_up[idx, d]) / 2
        lo2, up2 = flat_lo.repeat(2, 1), flat_up.repeat(2, 1)  # first half: lower halves, then upper halves
        up2[idx, d] = mid
        lo2[idx + n, d] = mid
        return lo2.reshape(2 * n, *lo.shape[1:]), up2.reshape(2 * n, *up.shape[1:]), op.repeat(2, 1), depth
