"""Branch and bound over ReLU activation splits (for networks with many inputs, e.g. images).

A domain is a set of split decisions (neuron i active: z_i >= 0, or inactive: z_i <= 0) on the region's box.
Domains wait in a priority queue ordered by their worst open margin (most negative first); each round pops a
batch, splits every domain on one neuron, bounds all children in ONE batched call
(:func:`lingraft.verify.bounding.bound_domains`: clamped intermediate bounds + joint alpha/beta optimization,
slopes warm-started from the parent) and queues the children that are not yet refuted. Intermediate bounds are
recomputed per domain with CROWN when that is cheap (small networks: tighter), otherwise the root's bounds are
kept with the split neurons clamped and the split constraints act through beta only (large networks: a round
costs a few final backward passes instead of a full CROWN pass per domain).

Branching ("intercept score"): the lower bound loses, at an unstable neuron with bounds l < 0 < u whose
output coefficient lambda is negative, the intercept term ``lambda * (-u l / (u - l))`` of the upper
relaxation; splitting the neuron removes it. The score is that loss summed over the open rows,
``sum_r max(-lambda_r, 0) * (-u l / (u - l))``, plus a small term ``0.1 * max(lambda_r, 0) * min(u, -l)`` for
the lower relaxation's gap (so neurons that only enter through the lower line still get ranked). Grafted
neurons (``ReLUOp.mask``), already split neurons and stable neurons are never chosen.

Soundness: the region is reported safe only when the queue is empty, i.e. every domain was refuted (all its
conjunctions have a row whose lower-bound margin clears the proof margin, see :meth:`RegionSpec.refuted`) or
shown infeasible. A domain that has no unstable neuron left but is not refuted cannot be split further: the
search then ends ``unknown``.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from lingraft.bounds import BoundedNetwork
from lingraft.verify.bounding import Bounded, bound_domains, input_coefficients
from lingraft.verify.falsify import spec_attack
from lingraft.spec.region import RegionSpec, group_max


@dataclass
class Domain:
    """One subproblem. splits: int8 [N] over all ReLU neurons (layer after layer, flattened); open_groups: [G]
    bool (conjunctions not refuted yet); alphas: {ReLU node: [S, *shape]} or None; branch: flat neuron index to
    split next (-1: none left)."""

    priority: float
    splits: Tensor
    open_groups: Tensor
    alphas: dict | None
    branch: int
    depth: int


@dataclass
class SearchOutcome:
    status: str  # "unsat" (region safe), "sat", "unknown", "timeout"
    counterexample: tuple | None = None
    branches: int = 0
    max_depth: int = 0
    rounds: int = 0


class ReluBaB:
    """Branch and bound over ReLU splits for one region.

    net: the bound engine's network; spec: the region's tensors; model: the PyTorch model (for attacks);
    confirm: callable(x [N, *in], violation [N]) -> (x, y) or None (the independent re-check);
    deadline: time.perf_counter() value to stop at; batch_size: domains popped per round (each gives 2 children);
    iterations: alpha/beta steps per round; refine_intermediate: recompute every domain's intermediate bounds with
    CROWN (tighter; costly on large networks) or keep the root's with the split neurons clamped;
    alpha_memory_mb / queue_memory_mb: memory for warm-start slopes / for the queued domains (the search ends
    ``unknown`` when the queue outgrows it).
    """

    def __init__(self, net: BoundedNetwork, spec: RegionSpec, model, confirm: Callable, deadline: float, *,
                 batch_size: int = 64, iterations: int = 8, attack_every: float = 2.0, seed: int = 0,
                 refine_intermediate: bool = True, alpha_memory_mb: float = 1024.0, queue_memory_mb: float = 2048.0,
                 log: Callable[[str], None] | None = None):
        self.net, self.spec, self.model, self.confirm = net, spec, model, confirm
        self.deadline = deadline
        self.batch_size = max(1, int(batch_size))
        self.iterations = iterations
        self.attack_every = attack_every
        self.seed = seed
        # False: keep the root's intermediate bounds (split neurons clamped) instead of recomputing them per domain
        self.refine = refine_intermediate
        self.base_bounds = None
        self.log = log or (lambda s: None)
        self.relus = list(net.relu_input_nodes().keys())
        self.shapes = [tuple(net.nodes[k].shape) for k in self.relus]
        self.sizes = [int(math.prod(s)) for s in self.shapes]
        self.offsets = [0] + list(itertools.accumulate(self.sizes))
        self.N = self.offsets[-1]
        per_domain = sum(self.sizes) * spec.S * 4
        self.max_alpha_domains = int(alpha_memory_mb * 2 ** 20 // max(per_domain, 1))
        # the queue itself (int8 split vectors) is capped at about queue_memory_mb: beyond it the search gives up
        self.max_domains = int(min(2_000_000, queue_memory_mb * 2 ** 20 // max(self.N + 64, 1)))
        # grafted neurons are exact linear functions: never split them
        masks = []
        for k, n in zip(self.relus, self.sizes):
            m = net.nodes[k].op.mask
            masks.append(torch.zeros(n, dtype=torch.bool) if m is None else m.flatten().cpu())
        self.grafted = torch.cat(masks).to(net.device) if masks else torch.zeros(0, dtype=torch.bool)
        #: [N] bool: every neuron that some domain was split on (for statistics and tests)
        self.branched = torch.zeros(self.N, dtype=torch.bool, device=net.device)

    # ------------------------------------------------------------------------------------------------
    def split_tensors(self, flat: Tensor) -> dict[int, Tensor]:
        """[B, N] int8 -> {ReLU node: [B, *shape]}."""
        B = flat.shape[0]
        return {k: flat[:, self.offsets[i]:self.offsets[i + 1]].reshape(B, *self.shapes[i])
                for i, k in enumerate(self.relus)}

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
        xs, v = spec_attack(self.model, self.spec, starts=x0.shape[0] + 8, steps=20, odi_steps=2, seed=self.seed,
                            x_init=x0, deadline=self.deadline)
        return self.confirm(xs, v - self.spec.confirm_slack)  # float32 near misses are re-checked too

    # ------------------------------------------------------------------------------------------------
    def run(self, root: Bounded) -> SearchOutcome:
        spec, dev = self.spec, self.net.device
        self.base_bounds = root.bounds
        margin = spec.lower_margin(root.lower)  # [1, S]
        open0 = ~spec.refuted(margin)[0]
        if not bool(open0.any()) or bool(root.infeasible[0]):
            return SearchOutcome("unsat")
        counter = itertools.count()
        heap: list = []
        zeros = torch.zeros(1, self.N, dtype=torch.int8, device=dev)
        row_w = self._row_weight(open0.unsqueeze(0))
        sc = self.scores(root, zeros, row_w) if root.relu_lA else torch.full((1, self.N), float("-inf"))
        br = int(sc.argmax(1)) if bool(torch.isfinite(sc).any()) else -1
        pri = float(group_max(margin, spec.group, spec.G)[0][open0].min())
        alphas = {k: a[0] for k, a in root.alphas.items()} if root.alphas else None
        heapq.heappush(heap, (pri, next(counter), Domain(pri, zeros[0], open0, alphas, br, 0)))
        out = SearchOutcome("unsat")
        if self.attack_every != float("inf"):
            # the root bound's minimizer is a good start (exact for a network without unstable neurons)
            cex = self._attack(root, spec.x_L, spec.x_U, spec.C.unsqueeze(0), torch.zeros(1, dtype=torch.long,
                               device=dev), _worst_rows(margin, open0.unsqueeze(0), spec))
            if cex is not None:
                out.status, out.counterexample = "sat", cex
                return out
        stuck = 0
        last_attack = time.perf_counter()
        round_time = 0.0
        per_domain = 0.0  # seconds per popped domain in the last round: predicts the next round's length
        while heap:
            now = time.perf_counter()
            if now + per_domain * min(self.batch_size, len(heap)) > self.deadline:
                out.status = "timeout"
                return out
            batch = []
            while heap and len(batch) < self.batch_size:
                _, _, d = heapq.heappop(heap)
                if d.branch < 0:
                    stuck += 1  # nothing left to split and not refuted: cannot be decided by splitting
                    continue
                batch.append(d)
            if not batch:
                break
            t0 = time.perf_counter()
            B = 2 * len(batch)
            flat = torch.stack([d.splits for d in batch]).repeat_interleave(2, 0)
            which = torch.tensor([d.branch for d in batch], device=dev).repeat_interleave(2)
            sign = torch.tensor([1, -1], dtype=torch.int8, device=dev).repeat(len(batch))
            flat[torch.arange(B, device=dev), which] = sign
            self.branched[which] = True
            open_p = torch.stack([d.open_groups for d in batch]).repeat_interleave(2, 0)
            x_L = spec.x_L.expand(B, *spec.x_L.shape[1:])
            x_U = spec.x_U.expand(B, *spec.x_U.shape[1:])
            C = spec.C.unsqueeze(0).expand(B, -1, -1)
            alpha_init = None
            keys = set(batch[0].alphas) if batch[0].alphas else set()
            if keys and all(d.alphas is not None and set(d.alphas) == keys for d in batch):
                alpha_init = {k: torch.stack([d.alphas[k] for d in batch]).repeat_interleave(2, 0) for k in keys}
            rw = self._row_weight(open_p)
            # bound only the rows of conjunctions still open somewhere in the batch (the others are refuted on
            # every parent, hence on every child); their lower bounds read -inf below and are never used
            rows = torch.nonzero(rw.any(0)).flatten()
            res = bound_domains(self.net, x_L, x_U, C[:, rows], splits=self.split_tensors(flat),
                                iterations=self.iterations, base_bounds=None if self.refine else self.base_bounds,
                                alpha_init=None if alpha_init is None else {k: v[:, rows] for k, v in
                                                                            alpha_init.items()},
                                row_weight=rw[:, rows], record_lA=True,
                                target=spec.target(rows), deadline=self.deadline)
            lower = torch.full((B, spec.S), float("-inf"), device=dev)
            lower[:, rows] = res.lower
            alphas = {}
            for k, a in res.alphas.items():  # back to all S rows (unused rows keep the parent's slopes)
                full = a[:, :1].expand(B, spec.S, *a.shape[2:]).clone()
                if alpha_init is not None and k in alpha_init:
                    full.copy_(alpha_init[k])
                full[:, rows] = a
                alphas[k] = full
            out.branches += B
            out.rounds += 1
            m = spec.lower_margin(lower)
            gm = group_max(m, spec.group, spec.G)
            open_c = open_p & ~spec.refuted(m)
            done = res.infeasible | ~open_c.any(1)
            live = torch.nonzero(~done).flatten()
            res.alphas = alphas
            if live.numel():
                sc = self.scores(res, flat, self._row_weight(open_c)[:, rows])
                best = sc.max(1)
                pri = gm.masked_fill(~open_c, float("inf")).min(1).values
                keep_alpha = len(heap) + live.numel() <= self.max_alpha_domains
                for i in live.tolist():
                    br = int(best.indices[i]) if math.isfinite(float(best.values[i])) else -1
                    al = {k: a[i] for k, a in res.alphas.items()} if keep_alpha and res.alphas else None
                    d = Domain(float(pri[i]), flat[i].clone(), open_c[i].clone(), al, br, batch[i // 2].depth + 1)
                    out.max_depth = max(out.max_depth, d.depth)
                    heapq.heappush(heap, (d.priority, next(counter), d))
            round_time = time.perf_counter() - t0
            per_domain = round_time / len(batch)
            if len(heap) > self.max_domains:
                self.log(f"  relu-bab: {len(heap)} domains exceed the queue limit; giving up")
                out.status = "unknown"
                return out
            if out.rounds % 10 == 1:
                self.log(f"  relu-bab round {out.rounds}: {len(heap)} domains left, worst margin "
                         f"{heap[0][0] if heap else float('nan'):.4f}, {round_time:.2f}s/round")
            if live.numel() and time.perf_counter() - last_attack > self.attack_every:
                last_attack = time.perf_counter()
                pri_live = gm.masked_fill(~open_c, float("inf")).min(1)
                order = live[torch.argsort(pri_live.values[live])][:8]
                rows_worst = _worst_rows(m[order], open_c[order], spec)
                cex = self._attack(res, x_L, x_U, C, order, rows_worst)
                if cex is not None:
                    out.status, out.counterexample = "sat", cex
                    return out
        out.status = "unknown" if stuck else "unsat"
        return out


def _worst_rows(m: Tensor, open_c: Tensor, spec: RegionSpec) -> Tensor:
    """Per domain, the best row of its worst open conjunction: m [B, S], open_c [B, G] -> [B] row indices."""
    gm = group_max(m, spec.group, spec.G).masked_fill(~open_c, float("inf"))
    g = gm.argmin(1)  # worst open group
    in_g = spec.group.unsqueeze(0) == g.unsqueeze(1)  # [B, S]
    return m.masked_fill(~in_g, float("-inf")).argmax(1)
