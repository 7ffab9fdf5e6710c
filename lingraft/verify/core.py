"""Complete verification of one VNN-LIB property: attack, bounds, then branch and bound.

Per region of the property (an input box with a disjunction of unsafe output conjunctions):

1. CROWN bounds of the specification rows (milliseconds; settles the easy regions before any search);
2. a quick PGD search for a counterexample on the regions left (all of them before any branch and bound, so
   ``sat`` comes early);
3. alpha-CROWN, then branch and bound on what is left: input splitting for networks with at most
   ``INPUT_SPLIT_MAX_DIM`` inputs (:mod:`lingraft.verify.input_bab`), ReLU
   splitting with beta-CROWN bounds otherwise (:mod:`lingraft.verify.relu_bab`). Both also search for
   counterexamples as the domains shrink.

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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from lingraft.bounds import BoundedNetwork
from lingraft.errors import LingraftError, UsageError
from lingraft.spec.vnnlib import VnnlibProperty, parse_vnnlib
from lingraft.verify.bounding import bound_domains
from lingraft.verify.falsify import spec_attack
from lingraft.verify.input_bab import InputBaB
from lingraft.spec.region import RegionSpec, region_spec
from lingraft.verify.relu_bab import ReluBaB
from lingraft.verify.witness import confirm, float32_note

#: networks with at most this many inputs are verified by input splitting
INPUT_SPLIT_MAX_DIM = 10
STATUSES = ("unsat", "sat", "unknown", "timeout", "error")
#: ReLU branch and bound recomputes every domain's intermediate bounds when the root CROWN pass takes less
REFINE_MAX_CROWN_S = 0.05
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
            raise UsageError("in_shape is needed for an in-memory model without .input_shape "
                             "(pass in_shape=(C, H, W))")
        shape = tuple(int(s) for s in shape)
        with torch.no_grad():
            dev = next((p.device for p in model.parameters()), torch.device("cpu"))
            out = model(torch.zeros(1, *shape, device=dev))
        return model, shape, int(out[0].numel()), None
    from lingraft.io.onnx import load_onnx

    path = Path(model_or_path)
    if path.suffix in (".pt", ".pth"):  # a lingraft checkpoint (grafted or not): no ONNX involved
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
    return model, tuple(model.input_shape), int(math.prod(model.output_shape)), str(path)


def _merge_method(a: str, b: str) -> str:
    return a if _METHOD_RANK.get(a, 0) >= _METHOD_RANK.get(b, 0) else b


def verify_property(model_or_path, prop, *, timeout: float = 60.0, in_shape=None, seed: int = 0,
                    device: str | None = None, split: str = "auto", attack_time: float | None = None,
                    root_iterations: int = 30, bab_iterations: int = 8, batch_size: int | None = None,
                    attack: bool = True, verbose: bool = False,
                    log: Callable[[str], None] | None = None) -> VerifyResult:
    """Decide whether the property's unsafe set is reachable.

    model_or_path: an ONNX file (plain or .gz; bounds run on CUDA when available unless ``device`` says
    otherwise) or an nn.Module (then ``in_shape`` or ``model.input_shape`` gives the per-sample input shape; it
    is put in eval mode and used on its own device unless ``device`` is given); prop: a VnnlibProperty or a VNN-LIB file path; timeout: wall-clock
    seconds for the whole call (loading included); split: "auto" (input splitting for <= 10 inputs, ReLU
    splitting otherwise), "input" or "relu"; attack_time: seconds of the first counterexample search per region
    (default min(2 s, 5% of the timeout)); root/bab_iterations: alpha(-beta) optimization steps at the root /
    per branch-and-bound round; batch_size: domains per round (default 64 for ReLU, 512 for input splitting);
    attack=False turns the PGD searches off (branch and bound alone; for testing its soundness).
    """
    t0 = time.perf_counter()
    deadline = t0 + float(timeout)
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
        return VerifyResult(status, cex, time.perf_counter() - t0, stats, note)

    try:
        model, shape, n_out, onnx_path = load_model(model_or_path, in_shape, tmpdir)
        n_in = int(math.prod(shape))
        if not isinstance(prop, VnnlibProperty):
            prop = parse_vnnlib(prop, num_inputs=n_in, num_outputs=n_out)
        elif prop.num_inputs != n_in or prop.num_outputs != n_out:
            raise LingraftError(f"property has {prop.num_inputs} inputs / {prop.num_outputs} outputs but the "
                                f"network has {n_in} / {n_out} (use the matching property file)")
        stats["regions"] = len(prop.regions)
        if not prop.regions:
            return result("unsat")
        if onnx_path is not None:  # our own copy: move it and freeze it
            dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
            model = model.to(dev).eval()
            for p in model.parameters():
                p.requires_grad_(False)
        else:  # the caller's module: leave it where it is unless a device is asked for
            here = next((p.device for p in model.parameters()), torch.device("cpu"))
            dev = torch.device(device) if device else here
            if dev != here:
                model = copy.deepcopy(model).to(dev)
            model.eval()
        net = BoundedNetwork(model, shape, device=dev)
        specs = [region_spec(r, shape, n_out).to(dev).set_output_scale(model) for r in prop.regions]
        mode = split if split != "auto" else ("input" if n_in <= INPUT_SPLIT_MAX_DIM else "relu")
        check = lambda xs, v: confirm(xs, v, prop, model, onnx_path)  # noqa: E731

        # 1. CROWN on every region (cheap; settles the easy regions before any attack time is spent)
        todo = []
        for i, spec in enumerate(specs):
            if time.perf_counter() > deadline:
                return result("timeout")
            stats["method"] = _merge_method(stats["method"], "crown")
            res = bound_domains(net, spec.x_L, spec.x_U, spec.C.unsqueeze(0), iterations=0)
            stats["branches"] += 1
            if bool(spec.refuted(spec.lower_margin(res.lower)).all()):
                log(f"region {i}: unsat by CROWN")
                continue
            todo.append((i, spec))

        # 2. quick counterexample search on the regions left
        budget = attack_time if attack_time is not None else min(2.0, 0.05 * float(timeout))
        for i, spec in todo:
            if not attack or budget <= 0:
                break
            if time.perf_counter() > deadline:
                return result("timeout")
            stats["method"] = _merge_method(stats["method"], "attack")
            xs, v = spec_attack(model, spec, seed=seed + i,
                                deadline=min(deadline, time.perf_counter() + budget / len(todo)))
            cex = check(xs, v - spec.confirm_slack)  # near misses in float32 are worth a re-check
            if cex is not None:
                log(f"region {i}: counterexample found by the attack")
                stats["method"] = "attack"  # the method that decided the instance
                return result("sat", cex)

        # 3. alpha-CROWN, then branch and bound, region by region
        undecided = []
        for i, spec in todo:
            status, cex = _verify_region(net, model, spec, check, deadline, mode, stats, log, seed + 1000 * i,
                                         root_iterations, bab_iterations, batch_size, attack)
            log(f"region {i}: {status}")
            if status == "sat":
                return result("sat", cex)
            if status != "unsat":
                undecided.append(status)
        if not undecided:
            return result("unsat")
        return result("timeout" if "timeout" in undecided else "unknown")
    except LingraftError as e:
        stats["error"] = str(e)
        return result("error")
    except (RuntimeError, MemoryError) as e:  # e.g. out of memory inside the bound computation
        stats["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return result("error")


def _verify_region(net: BoundedNetwork, model, spec: RegionSpec, check, deadline: float, mode: str, stats: dict,
                   log, seed: int, root_iterations: int, bab_iterations: int, batch_size: int | None,
                   attack: bool):
    """-> (status, counterexample or None) for one region."""
    if time.perf_counter() > deadline:
        return "timeout", None
    if mode == "input":
        bab = InputBaB(net, spec, model, check, deadline, batch_size=batch_size or 512, log=log)
        out = bab.run()
        stats["branches"] += out.branches
        stats["max_depth"] = max(stats.get("max_depth", 0), out.max_depth)
        stats["method"] = _merge_method(stats["method"], "crown" if out.branches <= 1 else "bab-input")
        return out.status, out.counterexample

    C = spec.C.unsqueeze(0)
    t_crown = time.perf_counter()
    res = bound_domains(net, spec.x_L, spec.x_U, C, iterations=0)
    t_crown = time.perf_counter() - t_crown
    ref = spec.refuted(spec.lower_margin(res.lower))
    stats["method"] = _merge_method(stats["method"], "alpha-crown")
    rw = (~ref)[:, spec.group].float()
    res = bound_domains(net, spec.x_L, spec.x_U, C, iterations=root_iterations, row_weight=rw, record_lA=True,
                        target=spec.target(), deadline=deadline)
    margin = spec.lower_margin(res.lower)
    log(f"  alpha-crown margins {np.round(margin[0].cpu().numpy(), 4).tolist()}")
    if bool(spec.refuted(margin).all()):
        return "unsat", None
    if time.perf_counter() > deadline:
        return "timeout", None
    stats["method"] = _merge_method(stats["method"], "bab-relu")
    # recomputing intermediate bounds per domain is what makes deep/convolutional networks slow: do it only when
    # one CROWN pass is cheap, else keep the root's bounds with the split neurons clamped
    refine = t_crown < REFINE_MAX_CROWN_S
    stats["refine_intermediate"] = refine
    bab = ReluBaB(net, spec, model, check, deadline, batch_size=batch_size or 64, iterations=bab_iterations,
                  seed=seed, attack_every=2.0 if attack else float("inf"), refine_intermediate=refine, log=log)
    out = bab.run(res)
    stats["branches"] += out.branches
    stats["max_depth"] = max(stats.get("max_depth", 0), out.max_depth)
    return out.status, out.counterexample
