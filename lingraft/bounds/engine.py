"""The bound engine: IBP, CROWN and alpha-CROWN over a graph of operators.

Inputs are boxes x_L <= x <= x_U ([B, *in_shape]); the quantity bounded is C @ f(x) with C [B, S, n_out]
(for robustness: the margins f_y - f_j, see :func:`lingraft.spec.margin.margin_spec`).

CROWN computes, node by node in topological order, bounds of every pre-activation that a nonlinear operator
needs (a ReLU's input, but only for its non-grafted neurons) by a backward pass of linear relaxations down to
the input, then the final bounds by one more backward pass from the output. Pre-activations whose value is an
affine function of the box (input -> elementwise/reshape/pad ops -> at most one Linear/Conv) get interval
bounds, which are exact there. Intermediate CROWN bounds are intersected with interval references (IBP
of the node from its inputs' tightest bounds; both are sound, so their intersection is), and neurons that the
reference already proves stable skip the CROWN pass.

Networks with few inputs (e.g. VNN-COMP's cifar_biasfield: 16 coefficients -> Linear -> Reshape -> Conv) have
nodes that are one affine map of the input yet far wider than it. A backward pass that reaches such a node
multiplies its coefficients by the node's precomputed input map (:meth:`BoundedNetwork.input_maps`) instead of
going through the ops below it: the same linear function, one matmul instead of transposed convolutions.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lingraft.bounds.alpha_crown import optimize_alpha
from lingraft.bounds.graph import GraphNode, build_graph
from lingraft.bounds.input_set import InputSet
from lingraft.bounds.linear_bounds import LinearBounds
from lingraft.bounds.methods import METHODS
from lingraft.bounds.ops import LinearOp, ReLUOp
from lingraft.bounds.ops.base import neg, pos
from lingraft.bounds.patches import backward_patches, chain_to_input
from lingraft.clock import check_deadline
from lingraft.errors import UsageError

#: the patch pass is used only while every patch covers at most this share of its plane (else the dense pass)
PATCH_MAX_FILL = 0.75
#: input maps (see BoundedNetwork.input_maps) are built only for networks with at most this many inputs (one
#: map row costs n multiply-adds, what a 3x3 convolution over 7 channels costs per output: cheaper than the ops
#: it skips for few inputs, far dearer for images) and kept only while each takes at most this many bytes
INPUT_MAP_MAX_INPUTS = 64
INPUT_MAP_MAX_BYTES = 64 * 2**20


@dataclass
class BoundResult:
    """Bounds of C @ f(x) over the box. lower/upper: [B, S] (upper may be None)."""

    lower: Tensor
    upper: Tensor | None
    # per nonlinear layer name: number of unstable (non-grafted) neurons per sample [B]
    unstable: dict = field(default_factory=dict)
    # per nonlinear layer name: (total neurons, grafted neurons)
    neurons: dict = field(default_factory=dict)
    time_s: float = 0.0


class BoundedNetwork:
    """A network ready for bound propagation.

    model: nn.Module built from supported layers (see :mod:`lingraft.bounds.graph`);
    in_shape: per-sample input shape, e.g. (1, 28, 28).
    mode: "tight" (default) intersects CROWN intermediate bounds with interval references; "autolirpa"
    reproduces auto_LiRPA 0.3's CROWN exactly (used by the equivalence tests).
    """

    def __init__(
        self,
        model: nn.Module,
        in_shape,
        device: str | torch.device | None = None,
        memory_budget_mb: float = 512.0,
        mode: str = "tight",
    ):
        if mode not in ("tight", "autolirpa"):
            raise UsageError(f"unknown engine mode {mode!r}; use 'tight' or 'autolirpa'")
        self.mode = mode
        self.use_patches = True
        self._patch_chains: dict = {}
        self.model = model.eval()
        self.in_shape = tuple(in_shape)
        self.device = (
            torch.device(device)
            if device is not None
            else next((p.device for p in model.parameters()), torch.device("cpu"))
        )
        self.nodes: list[GraphNode] = build_graph(model, self.in_shape)
        for nd in self.nodes:
            if nd.op is not None:
                nd.op.to(self.device).flush_subnormals()  # copies: the model keeps its weights
        self.out_shape = self.nodes[-1].shape
        self.num_outputs = int(math.prod(self.out_shape))
        self.memory_budget = memory_budget_mb * 2**20
        self._box_exact = self._find_box_exact()
        self._ibp_exact = self._find_ibp_exact()
        self._needed = self._find_needed_bounds()
        self._input_maps: dict[int, tuple[Tensor, Tensor]] | None = None

    # ---------------------------------------------------------------------------------------------
    # structure
    def _find_box_exact(self) -> list[int]:
        """0: value is a box (input through diagonal ops); 1: one affine map of a box (IBP exact); 2: other."""
        level = []
        for nd in self.nodes:
            if nd.op is None:
                level.append(0)
            elif nd.op.diagonal and len(nd.inputs) == 1:
                level.append(level[nd.inputs[0]])
            elif nd.op.affine and level[nd.inputs[0]] == 0:
                level.append(1)
            else:
                level.append(2)
        return level

    def input_maps(self) -> dict[int, tuple[Tensor, Tensor]]:
        """{node k: (W [N_k, n], b [N_k])} with node k's value ``W x_flat + b`` for every input x, for the nodes that
        are one affine map of the input (single-input affine or diagonal ops all the way down) and wider than it
        (N_k = prod(shape_k) > n = prod(in_shape)), while W fits INPUT_MAP_MAX_BYTES; empty for networks with more
        than INPUT_MAP_MAX_INPUTS inputs. Built once, in float32, by the ops' forward-mode maps of the identity (no
        differences of outputs, so no cancellation)."""
        if self._input_maps is not None:
            return self._input_maps
        n = int(math.prod(self.in_shape))
        maps: dict[int, tuple[Tensor, Tensor]] = {}
        self._input_maps = maps
        if n > INPUT_MAP_MAX_INPUTS:
            return maps
        lin = {0: LinearBounds.identity(self.in_shape, device=self.device)}
        with torch.no_grad():
            for i, nd in enumerate(self.nodes[1:], 1):
                op = nd.bound_op
                N = int(math.prod(nd.shape))
                if len(nd.inputs) != 1 or nd.inputs[0] not in lin or not (op.affine or op.diagonal):
                    continue
                if not op.forward_linear_ok() or 4 * n * N > INPUT_MAP_MAX_BYTES:
                    continue
                # affine and diagonal ops map linear bounds without looking at intervals: none are passed
                lb = op.forward_linear([lin[nd.inputs[0]]], [], (torch.empty(0), torch.empty(0)))
                if lb.rad is not None:
                    continue
                lin[i] = lb
                if N > n:
                    M = lb.mid[0].reshape(n + 1, N)
                    maps[i] = (M[:n].T.contiguous(), M[n].contiguous())
        return maps

    def _find_ibp_exact(self) -> set[int]:
        """Nodes whose interval (IBP) bounds are the exact range of every neuron: box-exact nodes (level <= 1) and
        ops declaring ``exact_ibp`` (ReLU, grafted ReLU, diagonal ops) of them, since each output neuron is a monotone
        function of one exactly-bounded input neuron. No linear bound can be tighter there, so CROWN is skipped."""
        exact: set[int] = set()
        for i, nd in enumerate(self.nodes):
            if self._box_exact[i] <= 1:
                exact.add(i)
            elif nd.bound_op.exact_ibp and len(nd.inputs) == 1 and nd.inputs[0] in exact:
                exact.add(i)
        return exact

    def _find_needed_bounds(self) -> dict[int, Tensor | None]:
        """Node index -> flat neuron rows whose bounds some nonlinear consumer needs (None = all)."""
        need: dict[int, Tensor | None] = {}
        for nd in self.nodes:
            if nd.op is None or not nd.op.nonlinear:
                continue
            for i in nd.inputs:
                rows = nd.op.needed_rows()
                if rows is not None and rows.numel() == 0:
                    continue  # fully grafted: no bounds needed
                if i in need:
                    prev = need[i]
                    need[i] = None if prev is None or rows is None else torch.unique(torch.cat([prev, rows]))
                else:
                    need[i] = rows
        return need

    def relu_layers(self) -> list[tuple[str, ReLUOp]]:
        return [(nd.module_name or nd.name, nd.op) for nd in self.nodes if isinstance(nd.op, ReLUOp)]

    def describe(self) -> list[dict]:
        out = []
        for nd in self.nodes:
            out.append(
                {
                    "name": nd.module_name or nd.name,
                    "op": "Input" if nd.op is None else nd.op.describe(),
                    "shape": list(nd.shape),
                    "neurons": int(math.prod(nd.shape)),
                    "grafted": 0 if nd.op is None else nd.op.num_grafted,
                }
            )
        return out

    # ---------------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """Evaluate the graph (should equal model(x)). x: [B, *in_shape] -> [B, *out_shape]."""
        vals: list[Any] = [None] * len(self.nodes)  # node values, filled in topological order
        for i, nd in enumerate(self.nodes):
            vals[i] = x if nd.op is None else nd.op.forward(*[vals[j] for j in nd.inputs])
        return vals[-1]

    def ibp_all(self, x_L: Tensor, x_U: Tensor) -> list:
        bnds: list[Any] = [None] * len(self.nodes)  # node boxes, filled in topological order
        for i, nd in enumerate(self.nodes):
            bnds[i] = (x_L, x_U) if nd.op is None else nd.op.ibp(*[bnds[j] for j in nd.inputs])
        return bnds

    # ---------------------------------------------------------------------------------------------
    def compute_bounds(
        self,
        x_L: Tensor,
        x_U: Tensor,
        method: str = "crown",
        C: Tensor | None = None,
        bound_upper: bool = True,
        alpha_iterations: int = 20,
        alpha_lr: float = 0.5,
        interm_bounds: dict | None = None,
        l2_center: Tensor | None = None,
        l2_eps: float | None = None,
        alpha_intermediate: bool = True,
        proof_scale: Tensor | None = None,
        alpha_early_stop: bool = True,
    ) -> BoundResult:
        """Bounds of C @ f(x) for all x in [x_L, x_U].

        x_L, x_U: [B, *in_shape]; C: [B, S, n_out] or None (identity, S = n_out).
        interm_bounds: optional {node index: (lower, upper)} that replace/tighten computed pre-activation
        bounds (used by branch and bound for split neurons).
        l2_center [B, *in_shape], l2_eps: the input set is also inside the L2 ball of that radius; linear bounds
        are concretized over both the box and the ball and the tighter value is kept (both are sound).
        alpha_intermediate: alpha-CROWN optimises a slope per (start node, unstable neuron) for every
        intermediate bound CROWN computes too (auto_LiRPA's default); False: the final specification's only.
        proof_scale [B, 1]: magnitude of the numbers behind each sample's bounds; alpha-CROWN stops on a sample
        once its bounds clear the proof margin at that scale (:mod:`lingraft.bounds.tolerance`); with
        alpha_early_stop=False every sample is optimised for all iterations (to compare with auto_LiRPA).
        """
        if method not in METHODS:
            raise UsageError(f"unknown bound method {method!r}; choose one of {', '.join(METHODS)}")
        t0 = time.perf_counter()
        x_L = x_L.to(self.device, torch.float32)
        x_U = x_U.to(self.device, torch.float32)
        B = x_L.shape[0]
        if tuple(x_L.shape[1:]) != self.in_shape:
            raise UsageError(f"input shape {tuple(x_L.shape[1:])} does not match the model's {self.in_shape}")
        if C is None:
            C = torch.eye(self.num_outputs, device=self.device).unsqueeze(0).expand(B, -1, -1)
        C = C.to(self.device, torch.float32)
        if l2_center is not None and l2_eps is None:
            raise UsageError("l2_center needs l2_eps, the radius of the L2 ball")
        inp = InputSet(x_L, x_U, l2_center, l2_eps or 0.0).to(self.device)
        with torch.no_grad():
            ibp = self.ibp_all(inp.lower, inp.upper)
        if method == "ibp":
            res = self._ibp_result(C, ibp, bound_upper)
            res.time_s = time.perf_counter() - t0
            return res
        with torch.no_grad():
            bounds = self._intermediate_bounds(inp, ibp, interm_bounds)
            C_out = C.reshape(B, C.shape[1], *self.out_shape)
            lo, up = self._backward(len(self.nodes) - 1, C_out, inp, bounds, bound_upper)
        if method == "alpha-crown":
            lo, bounds, _ = optimize_alpha(
                self,
                (C_out, inp, bounds),
                lo,
                alpha_iterations,
                alpha_lr,
                intermediate=alpha_intermediate,
                proof_scale=proof_scale,
                early_stop=alpha_early_stop,
            )
        res = BoundResult(lo, up if bound_upper else None)
        self._stats(res, bounds)
        res.time_s = time.perf_counter() - t0
        return res

    def _ibp_result(self, C: Tensor, ibp: list, bound_upper: bool) -> BoundResult:
        """IBP bounds of C f(x) [B, S] from the interval of every node (``ibp``)."""
        B = C.shape[0]
        last = self.nodes[-1]
        if isinstance(last.op, LinearOp) and len(self.nodes[last.inputs[0]].shape) == 1:
            # fold C into the last linear layer (C W) before the interval step: much tighter margins
            hl, hu = ibp[last.inputs[0]]
            W = torch.einsum("bso,oi->bsi", C, last.op.weight)
            bias = 0 if last.op.bias is None else torch.einsum("bso,o->bs", C, last.op.bias)
            c, r = ((hu + hl) / 2).unsqueeze(-1), ((hu - hl) / 2).unsqueeze(-1)
            mid = torch.bmm(W, c).squeeze(-1) + bias
            rad = torch.bmm(W.abs(), r).squeeze(-1)
            lo, up = mid - rad, mid + rad
        else:
            out_l, out_u = ibp[-1]
            out_l, out_u = out_l.reshape(B, -1), out_u.reshape(B, -1)
            lo = torch.einsum("bso,bo->bs", pos(C), out_l) + torch.einsum("bso,bo->bs", neg(C), out_u)
            up = torch.einsum("bso,bo->bs", pos(C), out_u) + torch.einsum("bso,bo->bs", neg(C), out_l)
        res = BoundResult(lo, up if bound_upper else None)
        self._stats(res, ibp)
        return res

    def _stats(self, res: BoundResult, bounds):
        for nd in self.nodes:
            if nd.op is not None and nd.op.splittable:
                name = nd.module_name or nd.name
                b = bounds[nd.inputs[0]]
                res.neurons[name] = (int(math.prod(nd.shape)), nd.op.num_grafted)
                if b is None:
                    res.unstable[name] = torch.zeros(res.lower.shape[0], dtype=torch.long)
                else:
                    res.unstable[name] = nd.op.unstable_mask(*b).reshape(b[0].shape[0], -1).sum(1).cpu()

    # ---------------------------------------------------------------------------------------------
    def _intermediate_bounds(
        self, inp: InputSet, ibp, interm_bounds=None, deadline=None, ref_bounds=None, settled_upto=None
    ):
        """Bounds of every node a nonlinear operator needs: list indexed by node (None = not computed).
        deadline: a :func:`lingraft.clock.now` time; past it the pass stops with DeadlineExceeded.

        Each node also gets a reference interval: IBP of the node from the tightest bounds known for its
        inputs (CROWN bounds where computed), intersected with ``ref_bounds[i]`` where given (bounds known to
        hold on this input set, e.g. those of a box that contains it). Neurons stable under the reference need
        no CROWN pass. settled_upto [B] long: sample b's reference is final for nodes up to that index (no CROWN
        pass for them at all; branch and bound: the layers up to a new split keep the parent's bounds).
        """
        N = len(self.nodes)
        bounds: list = [None] * N
        ref: list = [None] * N
        bounds[0] = ref[0] = (inp.lower, inp.upper)
        for i, nd in enumerate(self.nodes):
            if i == 0:
                continue
            ref[i] = nd.bound_op.ibp(*[ref[j] for j in nd.inputs])
            if ref_bounds is not None and ref_bounds[i] is not None:
                ref[i] = (torch.maximum(ref[i][0], ref_bounds[i][0]), torch.minimum(ref[i][1], ref_bounds[i][1]))
            if getattr(nd.op, "cuts_backward", False):
                bounds[i] = ref[i]
                continue
            if i not in self._needed:
                continue
            rl, ru = ref[i]
            if self.mode == "tight" and interm_bounds and i in interm_bounds:
                # split neurons are stable under their clamp: no CROWN pass for them
                rl, ru = torch.maximum(rl, interm_bounds[i][0]), torch.minimum(ru, interm_bounds[i][1])
            # autolirpa mode keeps auto_LiRPA 0.3's rule (CROWN unless the node is one affine map of the box)
            if self._box_exact[i] <= 1 or (self.mode == "tight" and i in self._ibp_exact):
                lo, up = rl, ru
            else:
                check_deadline(deadline)
                lo, up = self._crown_node(i, inp, bounds, rl, ru, deadline, settled_upto)
            if interm_bounds and i in interm_bounds:
                sl, su = interm_bounds[i]
                lo, up = torch.maximum(lo, sl), torch.minimum(up, su)
            bounds[i] = ref[i] = (lo, up)
        return bounds

    def _crown_node(self, i, inp: InputSet, bounds, ref_l, ref_u, deadline=None, settled_upto=None):
        """CROWN bounds of node i for the needed rows that are unstable under the reference interval.

        tight mode (default): rows stable under the reference keep it (a stable neuron's relaxation does not
        depend on the bound values), CROWN results are intersected with the reference (both are sound).
        autolirpa mode: auto_LiRPA 0.3's rule - CROWN for the reference-unstable rows (union over the batch)
        without intersection, or for all rows when more than 90% are unstable.
        """
        if self.mode == "tight":
            return self.crown_unstable_pairs(i, inp, bounds, ref_l, ref_u, deadline, settled_upto)
        B = inp.batch
        n = int(math.prod(self.nodes[i].shape))
        needed = self.needed_rows(i)
        lo = ref_l.reshape(B, n).clone()
        up = ref_u.reshape(B, n).clone()
        chain = self._chain(i)
        unst = ((lo[:, needed] < 0) & (up[:, needed] > 0)).any(0)
        rows = needed[unst]
        if rows.numel() > 0.9 * n:
            rows = needed
        if rows.numel() == 0:
            return lo.reshape(ref_l.shape), up.reshape(ref_u.shape)
        chunk = self._chunk_size(i, B, rows.numel()) if chain is None else max(1, min(rows.numel(), 4096))
        for s in range(0, rows.numel(), chunk):
            r = rows[s : s + chunk]
            if chain is not None:
                l_r, u_r = backward_patches(self.nodes, i, chain, r, inp, bounds, tail=self._dense_tail(inp, bounds))
            else:
                l_r, u_r = self._backward(i, None, inp, bounds, True, rows=r)
            lo[:, r] = l_r
            up[:, r] = u_r
        return lo.reshape(ref_l.shape), up.reshape(ref_u.shape)

    def crown_unstable_pairs(
        self,
        i: int,
        inp: InputSet,
        bounds: list,
        ref_l: Tensor,
        ref_u: Tensor,
        deadline=None,
        settled_upto: Tensor | None = None,
    ):
        """CROWN bounds of the (sample, needed neuron) pairs of node i that the reference interval ref_l, ref_u
        ([B, *shape]) leaves unstable, intersected with it (both are sound); the other neurons keep the reference
        (a stable neuron's relaxation does not depend on its bound values). bounds: every earlier node's;
        settled_upto [B]: samples with settled_upto >= i keep the reference for every neuron."""
        B = inp.batch
        n = int(math.prod(self.nodes[i].shape))
        needed = self.needed_rows(i)
        lo = ref_l.reshape(B, n).clone()
        up = ref_u.reshape(B, n).clone()
        todo = (lo[:, needed] < 0) & (up[:, needed] > 0)
        if settled_upto is not None:
            todo &= (settled_upto.to(todo.device) < i).unsqueeze(1)
        b_idx, col = torch.nonzero(todo, as_tuple=True)  # pair mode
        if b_idx.numel() == 0:
            return lo.reshape(ref_l.shape), up.reshape(ref_u.shape)
        pair_rows = needed[col]
        P = pair_rows.numel()
        chunk = self._chunk_size(i, 1, P) if self._chain(i) is None else max(1, min(P, 8192))
        for s in range(0, P, chunk):
            check_deadline(deadline)
            r, bi = pair_rows[s : s + chunk], b_idx[s : s + chunk]
            l_r, u_r = self.bound_pairs(i, r, bi, inp, bounds)
            lo[bi, r] = torch.maximum(lo[bi, r], l_r)
            up[bi, r] = torch.minimum(up[bi, r], u_r)
        return lo.reshape(ref_l.shape), up.reshape(ref_u.shape)

    def _chain(self, i: int):
        """The patch-mode chain of node i (see :func:`chain_to_input`), or None for the dense pass (also where
        patches do not pay, see :meth:`_patches_pay`)."""
        chain = self._patch_chains.get(i, False)
        if chain is False:
            chain = chain_to_input(self.nodes, i) if self.use_patches else None
            if chain is not None and not self._patches_pay(i, chain):
                chain = None
            self._patch_chains[i] = chain
        return chain

    def _patches_pay(self, i: int, chain: list[int]) -> bool:
        """Whether the patch pass of node i is cheaper than the dense one: not when the chain ends at once (a
        Reshape below the start: dense coefficients at once are cheaper) nor when a patch outgrows
        PATCH_MAX_FILL of its plane somewhere (deep layers of small images: the patches carry mostly zeros;
        on cifar_biasfield's last conv dense is 2.3x faster)."""
        if chain and self.nodes[chain[0]].bound_op.ends_patches:
            return False
        kh, kw = self.nodes[i].bound_op.patch_size(1, 1)
        for k in [*chain, 0]:  # the patches lie on node k's value at step k
            _, H, W = self.nodes[k].shape
            if kh * kw > PATCH_MAX_FILL * H * W:
                return False
            if k == 0 or self.nodes[k].bound_op.ends_patches:
                break
            kh, kw = self.nodes[k].bound_op.patch_size(kh, kw)
        return True

    def bound_pairs(self, i: int, rows: Tensor, b_idx: Tensor, inp: InputSet, bounds: list, alpha=None):
        """Lower and upper bounds [P] of neuron rows[p] (flat index into node i) for sample b_idx[p].

        alpha: optional per-pair lower slopes of the ReLUs below node i, {ReLU node: {"l": a, "u": a}}; for the
        dense pass a is [P, *relu_shape], for the patch pass [1, P, C, kh, kw] (an empty dict is filled with
        CROWN's slopes on the first call, as leaves that require grad). Differentiable in alpha and in bounds.
        """
        chain = self._chain(i)
        if chain is not None:
            tail = self._dense_tail(inp, bounds, b_idx)
            lo, up = backward_patches(self.nodes, i, chain, rows, inp, bounds, b_idx=b_idx, alpha=alpha, tail=tail)
            return lo[0], up[0]
        return self._backward_pairs(i, rows, b_idx, inp, bounds, alpha)

    def _dense_tail(self, inp: InputSet, bounds, b_idx=None):
        """The dense pass below the Reshape where a patch chain ends: callable(k, lA, uA) with coefficients
        [B' (1 or B), R, *shape_k] on node k's value -> (lower, upper) [B', R]; with ``b_idx`` [R] (pair mode) row r
        belongs to sample b_idx[r] and B' = 1."""

        def tail(k: int, lA: Tensor, uA: Tensor):
            if b_idx is None:
                B = inp.batch
                lA, uA = lA.expand(B, *lA.shape[1:]), uA.expand(B, *uA.shape[1:])
                lo, _ = self._backward(k, lA, inp, bounds, False)
                _, up = self._backward(k, uA, inp, bounds, True)
                return lo, up
            lo_out = torch.empty(1, b_idx.numel(), device=self.device)
            up_out = torch.empty(1, b_idx.numel(), device=self.device)
            for sel, sub, inp_b in self._each_sample(b_idx, bounds, inp):
                lo_out[:, sel] = self._backward(k, lA[:, sel], inp_b, sub, False)[0]
                up_out[:, sel] = self._backward(k, uA[:, sel], inp_b, sub, True)[1]
            return lo_out, up_out

        return tail

    def _backward_pairs(self, i, rows, b_idx, inp: InputSet, bounds, alpha=None):
        """Dense backward pass where pair p bounds neuron rows[p] of node i for sample b_idx[p], one sample at a
        time (slices of the bounds are views, so each pass only touches that sample). Returns ([P], [P])."""
        lo_out = torch.empty(rows.numel(), device=self.device)
        up_out = torch.empty(rows.numel(), device=self.device)
        for sel, sub, inp_b in self._each_sample(b_idx, bounds, inp):
            al = None
            if alpha is not None:
                al = {k: {s: a[sel].unsqueeze(0) for s, a in sides.items()} for k, sides in alpha.items()}
            lo, up = self._backward(i, None, inp_b, sub, True, rows=rows[sel], alphas=al)
            lo_out[sel], up_out[sel] = lo[0], up[0]
        return lo_out, up_out

    @staticmethod
    def _each_sample(b_idx: Tensor, bounds: list, inp: InputSet):
        """Yield (sel, sub, inp_b) per sample b in b_idx [P]: sel its positions in b_idx, sub the bounds of sample
        b alone ([1, *shape] views), inp_b its input set."""
        for b in torch.unique(b_idx).tolist():
            sel = torch.nonzero(b_idx == b, as_tuple=True)[0]
            sub = [None if bb is None else (bb[0][b : b + 1], bb[1][b : b + 1]) for bb in bounds]
            yield sel, sub, inp.select(slice(b, b + 1))

    def _chunk_size(self, i, B, R):
        biggest = max(int(math.prod(nd.shape)) for nd in self.nodes[: i + 1])
        per_row = B * biggest * 4 * 6  # a few live A-sized tensors per row
        return max(1, min(R, int(self.memory_budget // per_row)))

    # ---------------------------------------------------------------------------------------------
    def backward_bound(
        self,
        C_out: Tensor,
        x_L: Tensor,
        x_U: Tensor,
        bounds: list,
        *,
        bound_upper: bool = False,
        alphas: dict | None = None,
        extra_lA: dict | None = None,
        record_lA: dict | None = None,
    ):
        """Public backward pass from the output (for branch and bound): see :meth:`_backward`.

        C_out: [B, S, *out_shape]; bounds: from :meth:`intermediate_bounds`; alphas: {node index: {"l": [B,S,*shape]}}
        lower slopes of unstable ReLUs; extra_lA: {node index: [B, S, *shape]} added to the lower-bound
        coefficients when the pass reaches that node (beta-CROWN split multipliers: -beta*sign at a split
        pre-activation); record_lA: a dict that receives {ReLU node: [B, S, *shape]} the lower-bound coefficients
        reaching each ReLU's output (detached; branch and bound ranks neurons with them). Returns (lower [B,S],
        upper or None).
        """
        inp = InputSet(x_L, x_U)
        last = len(self.nodes) - 1
        return self._backward(
            last, C_out, inp, bounds, bound_upper, alphas=alphas, extra_lA=extra_lA, record_lA=record_lA
        )

    def intermediate_bounds(
        self,
        x_L: Tensor,
        x_U: Tensor,
        interm_bounds: dict | None = None,
        deadline: float | None = None,
        ref_bounds: list | None = None,
        settled_upto: Tensor | None = None,
    ) -> list:
        """CROWN bounds of every pre-activation a nonlinear op needs: list by node index of (lower, upper)
        [B, *shape] or None. interm_bounds {node index: (lower, upper)} tightens given nodes (split neurons);
        deadline: a :func:`lingraft.clock.now` time, past which the pass raises :class:`DeadlineExceeded`;
        ref_bounds: a list like the result, of bounds already known to hold on [x_L, x_U] (a parent box's in
        input splitting): CROWN then runs only on neurons they leave unstable, and the result lies inside them;
        settled_upto [B] long: sample b's ref_bounds are final up to that node index (see _intermediate_bounds)."""
        inp = InputSet(x_L, x_U).to(self.device)
        with torch.no_grad():
            ibp = self.ibp_all(inp.lower, inp.upper)
            return self._intermediate_bounds(inp, ibp, interm_bounds, deadline, ref_bounds, settled_upto)

    def bounded_nodes(self) -> list[int]:
        """Indices of the nodes :meth:`intermediate_bounds` fills: the input, the nodes that cut the backward pass
        and the nodes whose bounds a nonlinear op needs."""
        cut = [i for i, nd in enumerate(self.nodes) if getattr(nd.op, "cuts_backward", False)]
        return sorted({0, *cut, *self._needed})

    def crown_nodes(self) -> list[int]:
        """Indices of the nodes whose bounds CROWN computes (needed by a nonlinear op, not IBP-exact), in order."""
        return [
            i
            for i in range(1, len(self.nodes))
            if i in self._needed
            and not getattr(self.nodes[i].op, "cuts_backward", False)
            and not (self._box_exact[i] <= 1 or (self.mode == "tight" and i in self._ibp_exact))
        ]

    def needed_rows(self, i: int) -> Tensor:
        """Flat indices [R] of node i's neurons whose bounds a nonlinear consumer needs."""
        needed = self._needed.get(i)
        return (
            torch.arange(int(math.prod(self.nodes[i].shape)), device=self.device)
            if needed is None
            else needed.to(self.device)
        )

    def relu_input_nodes(self) -> dict[int, int]:
        """{ReLU node index: index of its pre-activation node} (the nodes of splittable ops)."""
        return {k: nd.inputs[0] for k, nd in enumerate(self.nodes) if nd.op is not None and nd.op.splittable}

    def _backward(
        self,
        start: int,
        A0: Tensor | None,
        inp: InputSet,
        bounds,
        bound_upper: bool,
        rows=None,
        alphas: dict | None = None,
        extra_lA: dict | None = None,
        record_lA: dict | None = None,
    ):
        """Backward linear bound propagation from node ``start``.

        A0: [B, S, *shape(start)] initial coefficients, or None with ``rows`` (flat unit rows of the node).
        record_lA: see :meth:`backward_bound`. Returns (lower [B, S], upper [B, S] or None).
        """
        relus = self.relu_input_nodes() if record_lA is not None else {}
        maps = self.input_maps()
        B = inp.batch
        lbias = torch.zeros((), device=self.device)
        ubias = torch.zeros((), device=self.device)
        A: dict[int, list] = {}
        nd = self.nodes[start]
        if A0 is None:
            first = None
            if nd.op is not None:  # affine ops give their input coefficients directly (base: None)
                first = nd.op.identity_backward(rows, B, nd.shape)
            if first is not None:
                Ain, b0 = first
                lbias = lbias + b0
                ubias = ubias + b0
                A[nd.inputs[0]] = [Ain, Ain if bound_upper else None]
            else:
                n = int(math.prod(nd.shape))
                eye = torch.zeros(len(rows), n, device=self.device)
                eye[torch.arange(len(rows)), rows] = 1.0
                eye = eye.reshape(len(rows), *nd.shape).unsqueeze(0).expand(B, *([-1] * (len(nd.shape) + 1)))
                A[start] = [eye, eye if bound_upper else None]
        else:
            A[start] = [A0, A0 if bound_upper else None]
        for k in range(start, 0, -1):
            if k not in A:
                continue
            lA, uA = A.pop(k)
            if extra_lA is not None and k in extra_lA and lA is not None:
                lA = lA + extra_lA[k]
            if k in relus and lA is not None:
                record_lA[k] = lA.detach()  # type: ignore[index]
            if k in maps:  # node k = W x + b: straight to the input (see input_maps)
                W, b = maps[k]
                la, lb = (None, 0) if lA is None else self._through_input_map(lA, W, b)
                if uA is lA:  # one tensor for both sides (a pass that starts right above the node): one matmul
                    ua, ub = la, lb
                else:
                    ua, ub = (None, 0) if uA is None else self._through_input_map(uA, W, b)
                lbias = lbias + lb
                ubias = ubias + ub
                pl, pu = A.get(0, [None, None])
                A[0] = [_add(pl, la), _add(pu, ua)]
                continue
            node = self.nodes[k]
            kw = {}
            if alphas is not None and k in alphas:
                kw["alpha"] = alphas[k]
            if getattr(node.op, "cuts_backward", False):
                kw["out_bounds"] = bounds[k]
            op = node.bound_op
            in_bounds = [bounds[j] for j in node.inputs] if op.nonlinear else []
            outs, lb, ub = op.backward(lA, uA, in_bounds, **kw)
            lbias = lbias + lb
            ubias = ubias + ub
            for j, (la, ua) in zip(node.inputs, outs):
                if la is None and ua is None:
                    continue
                if j in A:
                    pl, pu = A[j]
                    A[j] = [_add(pl, la), _add(pu, ua)]
                else:
                    A[j] = [la, ua]
        lA, uA = A.get(0, [None, None])
        lower = lbias + (inp.concretize(lA, -1) if lA is not None else 0)
        upper = None
        if bound_upper:
            upper = ubias + (inp.concretize(uA, 1) if uA is not None else 0)
        S = A0.shape[1] if A0 is not None else len(rows)
        lower = _expand(lower, B, S, self.device)
        upper = None if upper is None else _expand(upper, B, S, self.device)
        return lower, upper

    def _through_input_map(self, A: Tensor, W: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """Coefficients A [B, S, *shape_k] on a node with value W x + b (W [N_k, n], b [N_k]) -> (input
        coefficients [B, S, *in_shape], bias [B, S])."""
        flat = A.reshape(*A.shape[:2], -1)
        return (flat @ W).reshape(*A.shape[:2], *self.in_shape), flat @ b


def _add(a, b):
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def _expand(v, B, S, device):
    if not torch.is_tensor(v) or v.dim() == 0:
        return torch.full((B, S), float(v), device=device)
    return v.expand(B, S) if v.shape != (B, S) else v
