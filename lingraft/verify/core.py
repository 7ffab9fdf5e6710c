"""Complete verification of one VNN-LIB property: attack, bounds, then branch and bound.

Per region of the property (an input box with a disjunction of unsafe output conjunctions):

1. CROWN bounds of the specification rows (milliseconds; settles the easy regions before any search);
2. a quick PGD search for a counterexample on the regions left (all of them before any branch and bound, so
   ``sat`` comes early);
3. on what is left, input splitting for networks with at most ``INPUT_SPLIT_MAX_DIM`` inputs
   (:mod:`lingraft.verify.input_bab`, from step 1's CROWN bounds), otherwise alpha-CROWN (from step 1's
   intermediate bounds, for at most ``ROOT_ALPHA_SHARE`` of the time left), then ReLU splitting with
   beta-CROWN bounds (:mod:`lingraft.verify.relu_bab`). Both also search for counterexamples as the domains
   shrink.

Answers: ``sat`` only with a counterexample re-checked by onnxruntime (or a float64 forward pass for an
in-memory model) against the property; ``unsat`` only when every region's every (sub)domain is refuted with a
margin above the proof margin of :mod:`lingraft.bounds.tolerance` (PROVE_TOL plus a part relative to the
magnitudes involved); ``timeout`` when the wall-clock budget runs out; ``unknown`` when the search gives up;
``error`` for an unusable model or property (the message is in ``stats["error"]``).
"""

from __future__ import annotations

import copy
import gzip
import math
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np
import torch
from torch import nn

from lingraft.bounds import BoundedNetwork
from lingraft.clock import DeadlineExceeded, Stopwatch, now
from lingraft.env import pick_device
from lingraft.errors import LingraftError, UsageError
from lingraft.spec.region import RegionSpec, region_spec
from lingraft.spec.vnnlib import VnnlibProperty, parse_vnnlib
from lingraft.verify.bounding import Bounded, bound_domains
from lingraft.verify.falsify import spec_attack
from lingraft.verify.input_bab import InputBaB
from lingraft.verify.relu_bab import ReluBaB
from lingraft.verify.search import SearchOutcome
from lingraft.verify.witness import confirm, float32_note

#: networks with at most this many inputs are verified by input splitting
INPUT_SPLIT_MAX_DIM = 16
STATUSES = ("unsat", "sat", "unknown", "timeout", "error")
#: ReLU branch and bound recomputes every domain's intermediate bounds when the root CROWN pass takes less
REFINE_MAX_CROWN_S = 0.05
#: the root alpha-CROWN step may use at most this share of the time left (branch and bound gets the rest): its
#: best bound so far is kept when it stops, and on a large network 30 all-layer steps can take the whole budget
ROOT_ALPHA_SHARE = 0.25
# strength order of the methods, for the "method" statistic (the strongest one used)
_METHOD_RANK = {"none": 0, "attack": 1, "crown": 2, "alpha-crown": 3, "bab-input": 4, "bab-relu": 4}


@dataclass
class VerifyResult:
    """status: one of STATUSES; counterexample: (x [n_in], y [n_out]) float64 for ``sat``, else None;
    time_s: wall-clock seconds; stats: {"branches": domains bounded, "method": the method that decided it (for
    ``sat`` the search that found the counterexample, otherwise the strongest bounding method used), ...};
    note: "" or a remark on the answer: "counterexample checked to float32 precision" when x is not in the box
    itself but is the float32 rounding of a point of it (a box thinner than the float32 spacing)."""

    status: str
    counterexample: tuple[np.ndarray, np.ndarray] | None = None
    time_s: float = 0.0
    stats: dict = field(default_factory=dict)
    note: str = ""


def load_model(model_or_path, in_shape, tmpdir: list):
    """-> (model, in_shape, out_dim, onnx_path or None). A gzipped ONNX file is unpacked into a new temporary
    folder appended to ``tmpdir`` (the caller removes it)."""
    if isinstance(model_or_path, nn.Module):
        model = model_or_path.eval()
        shape = in_shape if in_shape is not None else getattr(model, "input_shape", None)
        if shape is None:
            raise UsageError("in_shape is needed for an in-memory model without .input_shape (pass in_shape=(C, H, W))")
        shape = tuple(int(s) for s in shape)
        with torch.no_grad():
            dev = next((p.device for p in model.parameters()), torch.device("cpu"))
            out = model(torch.zeros(1, *shape, device=dev))
        return model, shape, int(out[0].numel()), None
    from lingraft.io.onnx import load_onnx

    path = Path(model_or_path)
    if path.suffix in (".pt", ".pth", ".json"):  # a lingraft checkpoint (or its sidecar, refused there): no ONNX
        from lingraft.io.loader import load_model as load_checkpoint

        lm = load_checkpoint(path)
        return load_model(lm.model, lm.in_shape, tmpdir)
    if path.suffix == ".gz":  # VNN-COMP ships some networks gzipped
        d = tempfile.mkdtemp(prefix="lingraft-verify-")
        tmpdir.append(d)
        plain = Path(d) / path.stem
        with gzip.open(path, "rb") as src, open(plain, "wb") as dst:
            shutil.copyfileobj(src, dst)
        path = plain
    model = load_onnx(path)
    # plain attributes set by the importer (tuples of ints); nn.Module's __getattr__ would type them as tensors
    in_shape_onnx = cast("tuple[int, ...]", model.input_shape)
    out_shape_onnx = cast("tuple[int, ...]", model.output_shape)
    return model, tuple(in_shape_onnx), int(math.prod(out_shape_onnx)), str(path)


def check_instance(model_path, prop_path) -> tuple[tuple[int, ...], int]:
    """Load the network and parse the property for it (VNN-COMP's prepare step; nothing is kept).
    -> (per-sample input shape, number of outputs); raises LingraftError when either does not load."""
    tmpdir: list = []
    try:
        _, shape, n_out, _ = load_model(model_path, None, tmpdir)
        parse_vnnlib(prop_path, num_inputs=int(math.prod(shape)), num_outputs=n_out)
    finally:
        for d in tmpdir:
            shutil.rmtree(d, ignore_errors=True)
    return shape, n_out


def _merge_method(a: str, b: str) -> str:
    return a if _METHOD_RANK.get(a, 0) >= _METHOD_RANK.get(b, 0) else b


def verify_property(
    model_or_path,
    prop,
    *,
    timeout: float = 60.0,
    in_shape=None,
    seed: int = 0,
    device: str | None = None,
    split: str = "auto",
    attack_time: float | None = None,
    root_iterations: int = 30,
    bab_iterations: int = 8,
    batch_size: int | None = None,
    attack: bool = True,
    max_rounds: int | None = None,
    verbose: bool = False,
    log: Callable[[str], None] | None = None,
) -> VerifyResult:
    """Decide whether the property's unsafe set is reachable.

    model_or_path: an ONNX file (plain or .gz; bounds run on CUDA when available unless ``device`` says
    otherwise) or an nn.Module (then ``in_shape`` or ``model.input_shape`` gives the per-sample input shape; it
    is put in eval mode and used on its own device unless ``device`` is given); prop: a VnnlibProperty or a
    VNN-LIB file path; timeout: wall-clock seconds for the whole call (loading included); split: "auto" (input
    splitting for <= 16 inputs, ReLU splitting otherwise), "input" or "relu"; attack_time: seconds of the first
    counterexample search per region (default min(2 s, 5% of the timeout)); root/bab_iterations: alpha(-beta)
    optimization steps at the root (stopped early once ``ROOT_ALPHA_SHARE`` of the time left is spent) / per
    branch-and-bound round; batch_size: domains per round (default 64 for ReLU, 512 for input splitting);
    attack=False turns the PGD searches off (branch and bound alone; for testing its soundness); max_rounds: a
    work budget independent of the clock, branch-and-bound rounds per region at most (then ``unknown``).
    """
    watch = Stopwatch()
    deadline = watch.start + float(timeout)
    if split not in ("auto", "input", "relu"):
        raise UsageError(f"unknown split mode {split!r}; use auto, input or relu")
    if log is None:
        log = (lambda s: print(s, file=sys.stderr, flush=True)) if verbose else (lambda s: None)
    stats: dict = {"branches": 0, "method": "none", "regions": 0}
    tmpdir: list = []

    def result(status, cex=None):
        for d in tmpdir:
            shutil.rmtree(d, ignore_errors=True)
        note = float32_note(prop, cex) if cex is not None else ""
        if note:
            stats["note"] = note
        return VerifyResult(status, cex, watch.elapsed(), stats, note)

    try:
        model, shape, n_out, onnx_path = load_model(model_or_path, in_shape, tmpdir)
        n_in = int(math.prod(shape))
        prop = _matching_property(prop, n_in, n_out)
        stats["regions"] = len(prop.regions)
        if not prop.regions:
            return result("unsat")
        model, dev = _place_model(model, onnx_path, device)
        net = BoundedNetwork(model, shape, device=dev)
        specs = [region_spec(r, shape, n_out).to(dev).set_output_scale(model) for r in prop.regions]
        run = _Run(
            net=net,
            model=model,
            check=lambda xs, v: confirm(xs, v, prop, model, onnx_path),
            deadline=deadline,
            stats=stats,
            log=log,
            mode=split if split != "auto" else ("input" if n_in <= INPUT_SPLIT_MAX_DIM else "relu"),
            root_iterations=root_iterations,
            bab_iterations=bab_iterations,
            batch_size=batch_size,
            attack=attack,
            max_rounds=max_rounds,
        )
        attack_budget = attack_time if attack_time is not None else min(2.0, 0.05 * float(timeout))
        return result(*_run_steps(run, specs, attack_budget, seed))
    except DeadlineExceeded:  # a bound computation ran into the deadline
        return result("timeout")
    except LingraftError as e:
        stats["error"] = str(e)
        return result("error")
    except (RuntimeError, MemoryError) as e:  # e.g. out of memory inside the bound computation
        stats["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return result("error")


def _run_steps(run: _Run, specs: list[RegionSpec], attack_budget: float, seed: int):
    """The three steps of the module docstring on the regions' specs. -> (status, counterexample or None)."""
    todo = _settle_by_crown(run, specs)
    if todo is None:
        return "timeout", None
    if run.attack and attack_budget > 0:
        found = _quick_attack(run, todo, attack_budget, seed)
        if found is not None:
            return found
    return _decide_regions(run, todo, seed)


@dataclass
class _Run:
    """What the steps of one :func:`verify_property` call share. check: callable(x [N, *in], violation [N]) ->
    (x, y) or None (the independent re-check of candidates); mode: "input" or "relu" branching; the rest as in
    :func:`verify_property`."""

    net: BoundedNetwork
    model: nn.Module
    check: Callable
    deadline: float
    stats: dict
    log: Callable[[str], None]
    mode: str
    root_iterations: int
    bab_iterations: int
    batch_size: int | None
    attack: bool
    max_rounds: int | None = None

    def use_method(self, method: str) -> None:
        """Record that ``method`` ran (the statistic keeps the strongest)."""
        self.stats["method"] = _merge_method(self.stats["method"], method)

    def out_of_time(self) -> bool:
        return now() > self.deadline


def _matching_property(prop, n_in: int, n_out: int) -> VnnlibProperty:
    """Parse ``prop`` (a path) for a network with n_in inputs and n_out outputs, or check a given property's
    sizes."""
    if not isinstance(prop, VnnlibProperty):
        return parse_vnnlib(prop, num_inputs=n_in, num_outputs=n_out)
    if prop.num_inputs != n_in or prop.num_outputs != n_out:
        raise LingraftError(
            f"property has {prop.num_inputs} inputs / {prop.num_outputs} outputs but the "
            f"network has {n_in} / {n_out} (use the matching property file)"
        )
    return prop


def _place_model(model: nn.Module, onnx_path: str | None, device: str | None) -> tuple[nn.Module, torch.device]:
    """-> (model in eval mode on the device to bound on, that device)."""
    if onnx_path is not None:  # our own copy: move it and freeze it
        dev = pick_device(device)
        model = model.to(dev).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return model, dev
    # the caller's module: leave it where it is unless a device is asked for
    here = next((p.device for p in model.parameters()), torch.device("cpu"))
    dev = pick_device(device) if device else here
    if dev != here:
        model = copy.deepcopy(model).to(dev)
    model.eval()
    return model, dev


def _settle_by_crown(run: _Run, specs: list[RegionSpec]) -> list[tuple[int, RegionSpec, Bounded, float]] | None:
    """Step 1: CROWN on every region (cheap; settles the easy regions before any attack time is spent).
    -> (index, spec, CROWN result, its seconds) of the regions left open (the later steps reuse the result), or
    None when the deadline passed."""
    todo = []
    for i, spec in enumerate(specs):
        if run.out_of_time():
            return None
        run.use_method("crown")
        crown_watch = Stopwatch()
        res = bound_domains(run.net, spec.x_L, spec.x_U, spec.C.unsqueeze(0), iterations=0, deadline=run.deadline)
        run.stats["branches"] += 1
        if bool(spec.refuted(spec.lower_margin(res.lower)).all()):
            run.log(f"region {i}: unsat by CROWN")
            continue
        todo.append((i, spec, res, crown_watch.elapsed()))
    return todo


def _quick_attack(run: _Run, todo: list, budget: float, seed: int):
    """Step 2: a quick counterexample search (``budget`` seconds shared by the regions left).
    -> ("sat", counterexample), ("timeout", None), or None when nothing was found."""
    for i, spec, *_ in todo:
        if run.out_of_time():
            return "timeout", None
        run.use_method("attack")
        xs, v = spec_attack(run.model, spec, seed=seed + i, deadline=min(run.deadline, now() + budget / len(todo)))
        cex = run.check(xs, v - spec.confirm_slack)  # near misses in float32 are worth a re-check
        if cex is not None:
            run.log(f"region {i}: counterexample found by the attack")
            run.stats["method"] = "attack"  # the method that decided the instance
            return "sat", cex
    return None


def _decide_regions(run: _Run, todo: list, seed: int):
    """Step 3: alpha-CROWN, then branch and bound, region by region (todo: from :func:`_settle_by_crown`).
    -> (status, counterexample or None)."""
    undecided = []
    for i, spec, crown, t_crown in todo:
        status, cex = _verify_region(run, spec, seed + 1000 * i, crown, t_crown)
        run.log(f"region {i}: {status}")
        if status == "sat":
            return "sat", cex
        if status != "unsat":
            undecided.append(status)
    if not undecided:
        return "unsat", None
    return ("timeout" if "timeout" in undecided else "unknown"), None


def _verify_region(run: _Run, spec: RegionSpec, seed: int, crown: Bounded, t_crown: float):
    """-> (status, counterexample or None) for one region; crown: its plain CROWN result, which took t_crown s."""
    if run.out_of_time():
        return "timeout", None
    if run.mode == "input":
        return _input_bab(run, spec, crown)
    C = spec.C.unsqueeze(0)
    ref = spec.refuted(spec.lower_margin(crown.lower))
    run.use_method("alpha-crown")
    rw = (~ref)[:, spec.group].float()
    start = now()
    res = bound_domains(
        run.net,
        spec.x_L,
        spec.x_U,
        C,
        base_bounds=crown.bounds,  # step 1's CROWN intermediate bounds: the optimisation starts from them
        iterations=run.root_iterations,
        row_weight=rw,
        record_lA=True,
        target=spec.target(),
        deadline=min(run.deadline, start + ROOT_ALPHA_SHARE * max(run.deadline - start, 0.0)),
        intermediate_alpha=True,
    )
    margin = spec.lower_margin(res.lower)
    run.log(f"  alpha-crown margins {np.round(margin[0].cpu().numpy(), 4).tolist()}")
    if bool(spec.refuted(margin).all()):
        return "unsat", None
    if run.out_of_time():
        return "timeout", None
    return _relu_bab(run, spec, res, seed, refine=t_crown < REFINE_MAX_CROWN_S)


def _input_bab(run: _Run, spec: RegionSpec, root: Bounded):
    """Input-splitting branch and bound of one region from its CROWN result. -> (status, counterexample or None)."""
    out = InputBaB(**_search_args(run, spec)).run(root)
    _book_search(run, out)
    run.use_method("crown" if out.branches <= 1 else "bab-input")
    return out.status, out.counterexample


def _relu_bab(run: _Run, spec: RegionSpec, root: Bounded, seed: int, refine: bool):
    """ReLU-splitting branch and bound of one region from its alpha-CROWN root bounds.
    -> (status, counterexample or None)."""
    run.use_method("bab-relu")
    # recomputing intermediate bounds per domain is what makes deep/convolutional networks slow: do it only when
    # one CROWN pass is cheap, else keep the root's bounds with the split neurons clamped
    run.stats["refine_intermediate"] = refine
    bab = ReluBaB(
        iterations=run.bab_iterations,
        seed=seed,
        attack_every=2.0 if run.attack else float("inf"),
        refine_intermediate=refine,
        **_search_args(run, spec),
    )
    out = bab.run(root)
    _book_search(run, out)
    return out.status, out.counterexample


def _search_args(run: _Run, spec: RegionSpec) -> dict:
    """The :class:`~lingraft.verify.search.BranchAndBound` arguments of a search of region ``spec`` in ``run``
    (batch size None, or 0, leaves each search its own default)."""
    return {
        "net": run.net,
        "spec": spec,
        "model": run.model,
        "confirm": run.check,
        "deadline": run.deadline,
        "batch_size": run.batch_size or None,
        "max_rounds": run.max_rounds,
        "log": run.log,
    }


def _book_search(run: _Run, out: SearchOutcome) -> None:
    """Add a finished search's branches and depth to the run's statistics."""
    run.stats["branches"] += out.branches
    run.stats["max_depth"] = max(run.stats.get("max_depth", 0), out.max_depth)
