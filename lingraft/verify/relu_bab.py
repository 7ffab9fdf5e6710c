"""Branch and bound over ReLU activation splits (for networks with many inputs, e.g. images).

A domain is a set of split decisions (neuron i active: z_i >= 0, or inactive: z_i <= 0) on the region's box.
Domains wait in a priority queue ordered by their worst open margin (most negative first); each round pops a
batch, splits every domain on one neuron, bounds all children in ONE batched call
(:func:`lingraft.verify.bounding.bound_domains`: clamped intermediate bounds + joint alpha/beta optimization,
slopes warm-started from the parent) and queues the children that are not yet refuted. Intermediate bounds are
recomputed per domain with CROWN when that is cheap (small networks: tighter), otherwise the root's bounds are
kept with the split neurons clamped and the split constraints act through beta only (large networks: a round
costs a few final backward passes instead of a full CROWN pass per domain). A recomputing search starts each
child from its parent's bounds: they stay as they are up to the layer of the new split, and after it CROWN runs
only on the neurons they leave unstable.

Branching ("intercept score"): the lower bound loses, at an unstable neuron with bounds l < 0 < u whose
output coefficient lambda is negative, the intercept term ``lambda * (-u l / (u - l))`` of the upper
relaxation; splitting the neuron removes it. The score is that loss summed over the open rows,
``sum_r max(-lambda_r, 0) * (-u l / (u - l))``, plus a small term ``0.1 * max(lambda_r, 0) * min(u, -l)`` for
the lower relaxation's gap (so neurons that only enter through the lower line still get ranked). Grafted
neurons (``BoundOp.never_split``), already split neurons and stable neurons are never chosen.

Soundness: the region is reported safe only when the queue is empty, i.e. every domain was refuted (all its
conjunctions have a row whose lower-bound margin clears the proof margin, see :meth:`RegionSpec.refuted`) or
shown infeasible. A domain that has no unstable neuron left but is not refuted cannot be split further: the
search then ends ``unknown``.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lingraft.clock import Stopwatch
from lingraft.spec.region import group_max
from lingraft.verify.bounding import Bounded, bound_domains, input_coefficients, relu_op
from lingraft.verify.falsify import spec_attack
from lingraft.verify.search import BranchAndBound, KeptBounds, SearchOutcome, queue_overflowed, worst_rows


@dataclass
class Domain:
    """One subproblem. splits: int8 [N] over all ReLU neurons (layer after layer, flattened); open_groups: [G]
    bool (conjunctions not refuted yet); alphas: {ReLU node: [S, *shape]} or None; branch: flat neuron index to
    split next (-1: none left); bounds: {node: (lower, upper) [*shape]} its intermediate bounds, kept for its
    children when intermediate bounds are refined per domain (None: not kept, the root's are used)."""

    priority: float
    splits: Tensor
    open_groups: Tensor
    alphas: dict | None
    branch: int
    depth: int
    bounds: dict | None = None


class ReluBaB(BranchAndBound):
    """Branch and bound over ReLU splits for one region.

    The leading arguments and ``batch_size`` (domains popped per round, each gives 2 children; default 64),
    ``iterations`` (alpha/beta steps per round; default 8), ``max_rounds`` and ``log`` are those of
    :class:`BranchAndBound`. attack_every: seconds between attacks from the worst domains' bound minimizers (inf:
    none); seed: the first attack's seed; refine_intermediate: recompute every domain's intermediate bounds with
    CROWN (tighter; costly on large networks) or keep the root's with the split neurons clamped;
    alpha_memory_mb / queue_memory_mb / bounds_memory_mb: memory for warm-start slopes / for the queued domains
    (the search ends ``unknown`` when the queue outgrows it) / for the intermediate bounds queued domains keep
    for their children (refined search: a child recomputes only the layers after its new split, and only the
    neurons its parent's bounds leave unstable).
    """

    def __init__(
        self,
        *args: Any,
        attack_every: float = 2.0,
        seed: int = 0,
        refine_intermediate: bool = True,
        alpha_memory_mb: float = 1024.0,
        queue_memory_mb: float = 2048.0,
        bounds_memory_mb: float = 1024.0,
        **search: Any,
    ):
        super().__init__(*args, **search)
        net, spec = self.net, self.spec
        self.attack_every = attack_every
        self.seed = seed
        # False: keep the root's intermediate bounds (split neurons clamped) instead of recomputing them per domain
        self.refine = refine_intermediate
        self.base_bounds: list | None = None
        self.relus = list(net.relu_input_nodes().keys())
        self.shapes = [tuple(net.nodes[k].shape) for k in self.relus]
        self.sizes = [int(math.prod(s)) for s in self.shapes]
        self.offsets = [0] + list(itertools.accumulate(self.sizes))
        self.N = self.offsets[-1]
        per_domain = sum(self.sizes) * spec.S * 4
        self.max_alpha_domains = int(alpha_memory_mb * 2**20 // max(per_domain, 1))
        # the queue itself (int8 split vectors) is capped at about queue_memory_mb: beyond it the search gives up
        self.max_domains = int(min(2_000_000, queue_memory_mb * 2**20 // max(self.N + 64, 1)))
        self.bounds_memory = bounds_memory_mb * 2**20 if refine_intermediate else 0.0
        self.kept: KeptBounds | None = None  # set from the root's bounds in run()
        pre_of = net.relu_input_nodes()
        #: per ReLU layer (as ``offsets``), its pre-activation node: a child's layers up to the node of its new
        #: split keep the parent's bounds
        self.pre_nodes = [pre_of[k] for k in self.relus]
        # grafted neurons are exact linear functions: never split them
        masks = []
        for k, n in zip(self.relus, self.sizes):
            m = relu_op(net, k).never_split()
            masks.append(torch.zeros(n, dtype=torch.bool) if m is None else m.flatten().cpu())
        self.grafted = torch.cat(masks).to(net.device) if masks else torch.zeros(0, dtype=torch.bool)
        #: [N] bool: every neuron that some domain was split on (for statistics and tests)
        self.branched = torch.zeros(self.N, dtype=torch.bool, device=net.device)

    # ------------------------------------------------------------------------------------------------
    def split_tensors(self, flat: Tensor) -> dict[int, Tensor]:
        """[B, N] int8 -> {ReLU node: [B, *shape]}."""
        B = flat.shape[0]
        return {
            k: flat[:, self.offsets[i] : self.offsets[i + 1]].reshape(B, *self.shapes[i])
            for i, k in enumerate(self.relus)
        }

    def scores(self, res: Bounded, splits: Tensor, row_w: Tensor) -> Tensor:
        """Branching scores [B, N] (-inf where a neuron may not be split). row_w: [B, S] weights of open rows."""
        B = splits.shape[0]
        if not self.relus:
            return torch.full((B, 0), float("-inf"), device=splits.device)
        parts = []
        for i, k in enumerate(self.relus):
            pre = self.net.relu_input_nodes()[k]
            b = res.bounds[pre]
            n = self.sizes[i]
            if b is None or k not in res.relu_lA:
                parts.append(torch.full((B, n), float("-inf"), device=splits.device))
                continue
            lo, up = b[0].reshape(B, n), b[1].reshape(B, n)
            unstable = (lo < 0) & (up > 0)
            lam = res.relu_lA[k].reshape(B, -1, n) * row_w.unsqueeze(-1)  # [B, S, n]
            neg_l = lam.clamp(max=0).neg().sum(1)
            pos_l = lam.clamp(min=0).sum(1)
            denom = torch.where(unstable, up - lo, torch.ones_like(up))
            intercept = torch.where(unstable, -up * lo / denom, torch.zeros_like(up))
            gap = torch.where(unstable, torch.minimum(up, -lo), torch.zeros_like(up))
            s = neg_l * intercept + 0.1 * pos_l * gap
            parts.append(torch.where(unstable, s, torch.full_like(s, float("-inf"))))
        sc = torch.cat(parts, 1)
        forbid = (splits != 0) | self.grafted.unsqueeze(0)
        return sc.masked_fill(forbid, float("-inf"))

    def _row_weight(self, open_groups: Tensor) -> Tensor:
        """[B, G] open groups -> [B, S] float row weights."""
        return open_groups[:, self.spec.group].float()

    def _attack(self, res: Bounded, x_L, x_U, C, worst: Tensor, rows: Tensor):
        """Try the bound minimizers of the given children (indices ``worst``, row ``rows``) as attack starts."""
        bsel = [None if b is None else (b[0][worst], b[1][worst]) for b in res.bounds]
        al = {k: a[worst] for k, a in res.alphas.items()}
        a = input_coefficients(self.net, x_L[worst], x_U[worst], C[worst], bsel, rows, al or None)
        x0 = torch.where(a > 0, self.spec.a_L, self.spec.a_U)
        self.seed += 1
        xs, v = spec_attack(
            self.model,
            self.spec,
            starts=x0.shape[0] + 8,
            steps=20,
            odi_steps=2,
            seed=self.seed,
            x_init=x0,
            deadline=self.deadline,
        )
        return self.confirm(xs, v - self.spec.confirm_slack)  # float32 near misses are re-checked too

    # ------------------------------------------------------------------------------------------------
    def run(self, root: Bounded) -> SearchOutcome:
        """Search the region from its root bounds (alpha-CROWN of the whole box, ``relu_lA`` recorded)."""
        spec = self.spec
        self.base_bounds = root.bounds
        self.kept = KeptBounds(root.bounds, self.bounds_memory)
        margin = spec.lower_margin(root.lower)  # [1, S]
        open0 = ~spec.refuted(margin)[0]
        if not bool(open0.any()) or bool(root.infeasible[0]):
            return SearchOutcome("unsat")
        self._tiebreak = itertools.count()
        heap: list = []
        self._push(heap, self._root_domain(root, margin, open0))
        out = SearchOutcome("unsat")
        if self.attack_every != float("inf"):
            # the root bound's minimizer is a good start (exact for a network without unstable neurons)
            cex = self._attack(
                root,
                spec.x_L,
                spec.x_U,
                spec.C.unsqueeze(0),
                torch.zeros(1, dtype=torch.long, device=self.net.device),
                worst_rows(margin, open0.unsqueeze(0), spec),
            )
            if cex is not None:
                return out.found(cex)
        return self._search(heap, out)

    def _search(self, heap: list, out: SearchOutcome) -> SearchOutcome:
        """The rounds: pop a batch, bound both children of each domain, queue the open ones, attack now and then."""
        stuck = 0
        since_attack = Stopwatch()
        per_domain = 0.0  # seconds per popped domain in the last round: predicts the next round's length
        while heap:
            size = self.round_size(out, per_domain, len(heap))
            if size == 0:
                return out
            batch, n_stuck = self._pop_batch(heap, size)
            stuck += n_stuck
            if not batch:
                break
            round_watch = Stopwatch()
            children = self._bound_children(batch)
            out.branches += 2 * len(batch)
            out.rounds += 1
            self._queue_children(heap, batch, children, out)
            round_time = round_watch.elapsed()
            per_domain = round_time / len(batch)
            if queue_overflowed(out, heap, self.max_domains, round_time, self.log, "relu-bab", "domains", log_every=10):
                return out
            if children.live.numel() and since_attack.elapsed() > self.attack_every:
                since_attack.restart()
                cex = self._attack_worst(children)
                if cex is not None:
                    return out.found(cex)
        out.status = "unknown" if stuck else "unsat"
        return out

    def _push(self, heap: list, d: Domain) -> None:
        heapq.heappush(heap, (d.priority, next(self._tiebreak), d))

    def _root_domain(self, root: Bounded, margin: Tensor, open0: Tensor) -> Domain:
        """The whole box, no splits. margin: [1, S] root margins; open0: [G] open conjunctions."""
        spec = self.spec
        zeros = torch.zeros(1, self.N, dtype=torch.int8, device=self.net.device)
        row_w = self._row_weight(open0.unsqueeze(0))
        sc = self.scores(root, zeros, row_w) if root.relu_lA else torch.full((1, self.N), float("-inf"))
        br = int(sc.argmax(1)) if bool(torch.isfinite(sc).any()) else -1
        pri = float(group_max(margin, spec.group, spec.G)[0][open0].min())
        alphas = {k: a[0] for k, a in root.alphas.items()} if root.alphas else None
        kept = self.kept.keep(root.bounds, 0, 0) if self.kept is not None else None
        return Domain(pri, zeros[0], open0, alphas, br, 0, kept)

    def _parent_reference(self, batch: list[Domain]) -> tuple[list | None, Tensor | None]:
        """ref_bounds and settled_upto (see :func:`bound_domains`) of the 2 * len(batch) children: each parent's
        kept bounds (the root's where it kept none), final up to the pre-activation node of the new split."""
        if not self.refine or self.kept is None:
            return None, None
        ref = self.kept.for_children([d.bounds for d in batch], interleaved=True)
        layer = [bisect.bisect_right(self.offsets, d.branch) - 1 for d in batch]
        settled = [self.pre_nodes[li] if d.bounds is not None else -1 for d, li in zip(batch, layer)]
        return ref, torch.tensor(settled, device=self.net.device).repeat_interleave(2)

    def _pop_batch(self, heap: list, size: int) -> tuple[list[Domain], int]:
        """Up to ``size`` splittable domains off the heap, and how many popped ones had nothing left to split."""
        batch: list[Domain] = []
        stuck = 0
        while heap and len(batch) < size:
            _, _, d = heapq.heappop(heap)
            if d.branch < 0:
                stuck += 1  # nothing left to split and not refuted: cannot be decided by splitting
                continue
            batch.append(d)
        return batch, stuck

    def _children_splits(self, batch: list[Domain]) -> Tensor:
        """[2 * len(batch), N] int8: every domain's splits twice, with its branch neuron active (+1) in the first
        child and inactive (-1) in the second."""
        dev = self.net.device
        B = 2 * len(batch)
        flat = torch.stack([d.splits for d in batch]).repeat_interleave(2, 0)
        which = torch.tensor([d.branch for d in batch], device=dev).repeat_interleave(2)
        sign = torch.tensor([1, -1], dtype=torch.int8, device=dev).repeat(len(batch))
        flat[torch.arange(B, device=dev), which] = sign
        self.branched[which] = True
        return flat

    @staticmethod
    def _warm_start(batch: list[Domain]) -> dict[int, Tensor] | None:
        """The parents' slopes, each twice ({ReLU node: [2 * len(batch), S, *shape]}); None unless every parent
        kept slopes for the same nodes."""
        keys = set(batch[0].alphas) if batch[0].alphas else set()
        if keys and all(d.alphas is not None and set(d.alphas) == keys for d in batch):
            return {
                k: torch.stack([d.alphas[k] for d in batch]).repeat_interleave(2, 0)  # type: ignore[index]
                for k in keys
            }
        return None

    def _bound_children(self, batch: list[Domain]) -> _Children:
        """Split every domain of the batch on its branch neuron and bound the 2 * len(batch) children at once."""
        spec, dev = self.spec, self.net.device
        B = 2 * len(batch)
        flat = self._children_splits(batch)
        open_p = torch.stack([d.open_groups for d in batch]).repeat_interleave(2, 0)
        x_L = spec.x_L.expand(B, *spec.x_L.shape[1:])
        x_U = spec.x_U.expand(B, *spec.x_U.shape[1:])
        C = spec.C.unsqueeze(0).expand(B, -1, -1)
        alpha_init = self._warm_start(batch)
        rw = self._row_weight(open_p)
        # bound only the rows of conjunctions still open somewhere in the batch (the others are refuted on
        # every parent, hence on every child); their lower bounds read -inf below and are never used
        rows = torch.nonzero(rw.any(0)).flatten()
        ref, settled = self._parent_reference(batch)
        res = bound_domains(
            self.net,
            x_L,
            x_U,
            C[:, rows],
            splits=self.split_tensors(flat),
            iterations=self.iterations,
            base_bounds=None if self.refine else self.base_bounds,
            ref_bounds=ref,
            settled_upto=settled,
            alpha_init=None if alpha_init is None else {k: v[:, rows] for k, v in alpha_init.items()},
            row_weight=rw[:, rows],
            record_lA=True,
            target=spec.target(rows),
            deadline=self.deadline,
        )
        lower = torch.full((B, spec.S), float("-inf"), device=dev)
        lower[:, rows] = res.lower
        res.alphas = self._alphas_on_all_rows(res.alphas, alpha_init, rows, B)
        m = spec.lower_margin(lower)
        open_c = open_p & ~spec.refuted(m)
        done = res.infeasible | ~open_c.any(1)
        return _Children(
            flat=flat,
            x_L=x_L,
            x_U=x_U,
            C=C,
            rows=rows,
            res=res,
            margin=m,
            group_margin=group_max(m, spec.group, spec.G),
            open_groups=open_c,
            live=torch.nonzero(~done).flatten(),
        )

    def _alphas_on_all_rows(
        self, alphas: dict[int, Tensor], alpha_init: dict[int, Tensor] | None, rows: Tensor, B: int
    ) -> dict[int, Tensor]:
        """Optimized slopes of the bounded ``rows`` ([B, len(rows), *shape]) back to all S rows; the other rows
        keep the parent's slopes."""
        out = {}
        for k, a in alphas.items():
            full = a[:, :1].expand(B, self.spec.S, *a.shape[2:]).clone()
            if alpha_init is not None and k in alpha_init:
                full.copy_(alpha_init[k])
            full[:, rows] = a
            out[k] = full
        return out

    def _queue_children(self, heap: list, batch: list[Domain], children: _Children, out: SearchOutcome) -> None:
        """Push the children that are neither refuted nor infeasible, with their branching neuron chosen."""
        live = children.live
        if not live.numel():
            return
        open_c = children.open_groups
        sc = self.scores(children.res, children.flat, self._row_weight(open_c)[:, children.rows])
        best = sc.max(1)
        pri = children.group_margin.masked_fill(~open_c, float("inf")).min(1).values
        keep_alpha = len(heap) + live.numel() <= self.max_alpha_domains
        alphas = children.res.alphas
        for i in live.tolist():
            br = int(best.indices[i]) if math.isfinite(float(best.values[i])) else -1
            al = {k: a[i] for k, a in alphas.items()} if keep_alpha and alphas else None
            kept = self.kept.keep(children.res.bounds, i, len(heap)) if self.kept is not None else None
            d = Domain(
                float(pri[i]), children.flat[i].clone(), open_c[i].clone(), al, br, batch[i // 2].depth + 1, kept
            )
            out.max_depth = max(out.max_depth, d.depth)
            self._push(heap, d)

    def _attack_worst(self, children: _Children):
        """Attack from the bound minimizers of the (up to 8) worst open children. -> (x, y) or None."""
        c = children
        pri_live = c.group_margin.masked_fill(~c.open_groups, float("inf")).min(1)
        order = c.live[torch.argsort(pri_live.values[c.live])][:8]
        rows_worst = worst_rows(c.margin[order], c.open_groups[order], self.spec)
        return self._attack(c.res, c.x_L, c.x_U, c.C, order, rows_worst)


@dataclass
class _Children:
    """One round's 2B children: flat splits [2B, N] int8; their boxes x_L, x_U [2B, *in] and C [2B, S, n_out];
    rows: [R] the rows that were bounded; res: the bounds (alphas on all S rows); margin: [2B, S];
    group_margin / open_groups: [2B, G]; live: [L] indices of the children still to search."""

    flat: Tensor
    x_L: Tensor
    x_U: Tensor
    C: Tensor
    rows: Tensor
    res: Bounded
    margin: Tensor
    group_margin: Tensor
    open_groups: Tensor
    live: Tensor
