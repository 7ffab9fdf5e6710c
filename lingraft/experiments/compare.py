"""``lingraft compare``: train every baseline of a YAML file, graft it, certify both, and tabulate.

A compare file (YAML)::

    dataset: mnist
    eps: 0.1                          # certification eps (and graft eps)
    eps_grid: [0.02, 0.05, 0.1]       # CROWN certified accuracy vs eps, for the plot
    train: {epochs: 1, num_train: 10000, optimizer: adam}     # TrainConfig defaults shared by all entries
    graft: {ratio: 0.5, epochs: 1, num_train: 5000}            # run_graft options
    certify: {num_samples: 200, methods: [crown, alpha-crown]}
    entries:
      - {name: fgsm, arch: cnn-b, method: fgsm, train_eps: 0.1}
      - {name: kd, arch: cnn-b, loss: kd, teacher: fgsm}       # teacher: another entry (trained first) or a path

Every step is keyed by a hash of everything that determines its result, so a rerun reuses what is done:
  train   OUT/NAME/model.pt    + train.done.json  (hash of the training config and of the teacher's hash)
  graft   OUT/NAME/grafted.pt  + graft.done.json  (hash of the parent's hash, the graft options and eps)
  certify OUT/results.jsonl, one line per finished (entry, plain|grafted, eps, method) unit, appended atomically.
Changing an entry's config retrains that entry (and every student of it) and recertifies only what changed.

This module runs the steps; :mod:`~lingraft.experiments.compare_config` parses the file and keys the steps,
:mod:`~lingraft.experiments.compare_report` writes the tables and the plot.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lingraft.clock import Stopwatch, now
from lingraft.env import pick_device
from lingraft.experiments.compare_config import CompareSpec, Entry, certify_units, check_choice, step_hashes
from lingraft.experiments.compare_report import build_result, short_number, write_outputs
from lingraft.io.files import atomic_write_json
from lingraft.io.resumable import ResumableLog

__all__ = ["ComparePlan", "plan_compare", "run_compare", "run_entry"]


# ----------------------------------------------------------------------------------------------- steps


def _read_done(path: Path, h: str) -> dict | None:
    """The record of a finished step if ``path`` exists and carries hash ``h``."""
    try:
        d = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    return d if isinstance(d, dict) and d.get("hash") == h else None


def _clear_stale(folder: Path, h: str, files: list[str], log: Callable[[str], None], what: str) -> None:
    """Remove a step's outputs left by a run with another config (``started.json`` says which)."""
    mark = folder / f"{what}.started.json"
    try:
        old = json.loads(mark.read_text()).get("hash")
    except (FileNotFoundError, ValueError, AttributeError):
        old = None
    stale = [folder / f for f in files if (folder / f).exists()]
    if stale and old != h:
        log(f"[{folder.name}] config changed since the last {what}: removing {', '.join(p.name for p in stale)}")
        for p in stale:
            p.unlink()
    atomic_write_json(mark, {"hash": h})


def _reuse_step(
    folder: Path, h: str, ckpt: Path, step: str, outputs: list[str], log: Callable[[str], None]
) -> dict | None:
    """The record of ``step`` ("train" or "graft") if it finished with hash ``h`` and its checkpoint ``ckpt`` is
    there (logged as reused); otherwise None, after removing the outputs a run with another config left."""
    done = _read_done(folder / f"{step}.done.json", h)
    if done is not None and ckpt.exists():
        past = "trained" if step == "train" else "grafted"
        log(f"[{folder.name}] reusing {ckpt} ({past} {done[f'{step}_s']:.0f} s)")
        return done
    _clear_stale(folder, h, outputs, log, step)
    return None


def _ensure_trained(
    spec: CompareSpec,
    e: Entry,
    out: Path,
    hashes: dict,
    seed: int,
    device: str,
    log: Callable[[str], None],
    progress: bool,
) -> dict:
    """Train entry ``e`` into OUT/NAME/model.pt unless done with the same hash; returns train.done.json's record."""
    from lingraft.train.loop import TrainConfig, train

    folder = out / e.name
    folder.mkdir(parents=True, exist_ok=True)
    h = hashes[e.name]["train"]
    ckpt = folder / "model.pt"
    done = _reuse_step(folder, h, ckpt, "train", ["model.pt", "model.json", "model.pt.state", "train.done.json"], log)
    if done is not None:
        return done
    teacher = None
    if e.teacher is not None:
        teacher = str(out / e.teacher / "model.pt") if e.teacher_entry else e.teacher
    cfg = TrainConfig(
        arch=e.arch, dataset=spec.dataset, teacher=teacher, data_dir=spec.data_dir, device=device, seed=seed, **e.train
    )
    log(
        f"[{e.name}] training {e.arch} (method {cfg.method}, loss {cfg.loss}"
        + (f", teacher {e.teacher}" if e.teacher else "")
        + f", {cfg.epochs} epoch(s))"
    )
    watch = Stopwatch()
    metrics = train(
        cfg,
        ckpt,
        progress=progress,
        log=lambda s: log(f"[{e.name}] {s}"),
        meta={"command": "lingraft compare", "compare_hash": h},
    )
    rec = {
        "hash": h,
        "checkpoint": str(ckpt),
        "train_s": round(watch.elapsed(), 3),
        "train_loop_s": metrics.get("train_time_s"),
        "best": metrics.get("best"),
        "finished_at": _now(),
    }
    atomic_write_json(folder / "train.done.json", rec)
    return rec


def _ensure_grafted(
    spec: CompareSpec, e: Entry, out: Path, hashes: dict, seed: int, device, log: Callable[[str], None]
) -> dict:
    """Graft OUT/NAME/model.pt into grafted.pt unless done with the same hash; returns graft.done.json's record."""
    from lingraft.graft.pipeline import run_graft

    folder = out / e.name
    h = hashes[e.name]["graft"]
    ckpt = folder / "grafted.pt"
    done = _reuse_step(folder, h, ckpt, "graft", ["grafted.pt", "grafted.json", "graft.done.json"], log)
    if done is not None:
        return done
    kw = dict(spec.graft)
    if "gammas" in kw:
        kw["gammas"] = tuple(kw["gammas"])
    log(f"[{e.name}] grafting ratio {kw['ratio']} at eps {spec.eps}")
    watch = Stopwatch()
    res = run_graft(
        folder / "model.pt",
        out_path=str(ckpt),
        eps=spec.eps,
        num_samples=0,
        dataset=spec.dataset,
        data_dir=spec.data_dir,
        seed=seed,
        device=device,
        log=lambda s: log(f"[{e.name}] {s}"),
        command="lingraft compare",
        **kw,
    )
    rec = {
        "hash": h,
        "checkpoint": str(ckpt),
        "graft_s": round(watch.elapsed(), 3),
        "finetune_s": round(float(res["finetune"]["time_s"]), 3),
        "relu_neurons": res["relu_neurons"],
        "grafted_neurons": res["grafted_neurons"],
        "finished_at": _now(),
    }
    atomic_write_json(folder / "graft.done.json", rec)
    return rec


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class ComparePlan:
    """What a compare run does: the entries to train (``need``, teachers included), those to certify
    (``selected``), the step hashes, the results file with the units it holds, and the test images."""

    spec: CompareSpec
    out: Path
    seed: int
    selected: list[str]
    need: set[str]
    hashes: dict
    results: ResumableLog
    have: set
    x_all: Any
    y_all: Any
    t0: float

    def units(self, name: str) -> list[dict]:
        """The certification units of entry ``name`` not yet in the results file ([] for an unselected one)."""
        if name not in self.selected:
            return []
        return [u for u in certify_units(self.spec, self.hashes, name, self.seed) if u["unit"] not in self.have]

    def finish(self, log: Callable[[str], None], plot: bool) -> dict:
        """Write the tables (and the plot); returns table.json's dict."""
        result = build_result(self.spec, self.out, self.hashes, self.seed)
        result["wall_s"] = round(now() - self.t0, 1)
        write_outputs(result, self.out, log=log, plot=plot)
        return result


def plan_compare(spec: CompareSpec, out_dir, *, only: list[str] | None = None, seed: int = 0) -> ComparePlan:
    """The plan of :func:`run_compare` (the output folder is created and the results file made safe to append)."""
    from lingraft.data.datasets import load_dataset, subset

    names = [e.name for e in spec.entries]
    selected = names if not only else [check_choice(n, names, "entry in --only:") for n in only]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # entries to train: the selected ones and, transitively, their teachers (spec order = teachers first)
    need = set(selected)
    for e in reversed(spec.entries):
        if e.name in need and e.teacher_entry and e.teacher is not None:
            need.add(e.teacher)
    t0 = now()
    results = ResumableLog(out / "results.jsonl")
    have = {r.get("unit") for r in results.resume()}  # a torn tail (kill) is cut
    n_max = max(spec.certify["num_samples"], spec.certify["grid_num_samples"])
    x_all, y_all = load_dataset(spec.dataset, "test", spec.data_dir)
    x_all, y_all = subset(x_all, y_all, min(n_max, len(x_all)))
    return ComparePlan(spec, out, seed, selected, need, step_hashes(spec, seed), results, have, x_all, y_all, t0)


def run_entry(
    spec: CompareSpec,
    name: str,
    out: Path,
    hashes: dict,
    units: list[dict] | None,
    x_all,
    y_all,
    *,
    seed: int,
    device,
    write: Callable[[dict], None],
    log: Callable[[str], None],
    progress: bool = False,
) -> None:
    """One entry's steps: train it (unless done), then, when ``units`` is not None (a selected entry), graft it
    and certify the ``units``, calling ``write(record)`` as each finishes."""
    e = next(x for x in spec.entries if x.name == name)
    dev = pick_device(device)
    _ensure_trained(spec, e, out, hashes, seed, str(dev), log, progress)
    if units is None:
        return  # a teacher that was not asked for: trained only
    _ensure_grafted(spec, e, out, hashes, seed, dev, log)
    if not units:
        log(f"[{e.name}] all certification units already in results.jsonl")
        return
    _certify_units(units, out / e.name, x_all, y_all, spec.certify, seed, dev, write, log)


def run_compare(
    spec: CompareSpec,
    out_dir,
    *,
    only: list[str] | None = None,
    seed: int = 0,
    device=None,
    log: Callable[[str], None] = print,
    progress: bool = False,
    plot: bool = True,
) -> dict:
    """Train, graft and certify the (``only``-selected) entries, reusing finished steps, then write
    results.jsonl, table.md, table.csv, table.json and cert_vs_eps.png into ``out_dir``. Returns table.json's dict.

    ``only``: entry names to run (their teachers are trained too, but not certified); the table lists every entry
    of the spec whose units are all in results.jsonl, so partial runs add up.
    """
    p = plan_compare(spec, out_dir, only=only, seed=seed)
    dev = pick_device(device)
    # one entry at a time (teachers come first), refreshing the tables after each, so a long run shows progress
    for e in spec.entries:
        if e.name not in p.need:
            continue
        units = p.units(e.name) if e.name in p.selected else None
        run_entry(
            spec, e.name, p.out, p.hashes, units, p.x_all, p.y_all, seed=seed, device=dev,
            write=p.results.append, log=log, progress=progress,
        )  # fmt: skip
        if units:
            p.have.update(u["unit"] for u in units)
            write_outputs(build_result(spec, p.out, p.hashes, seed), p.out, log=lambda s: None, plot=False)
    return p.finish(log, plot)


def _certify_units(
    units: list[dict],
    folder: Path,
    x_all,
    y_all,
    c: dict,
    seed: int,
    dev,
    write: Callable[[dict], None],
    log: Callable[[str], None],
) -> None:
    """Certify the units of one entry (its checkpoints in ``folder``) on the first ``num_samples`` of x_all
    [N, *in_shape], y_all [N], calling ``write(record)`` (a results line) per unit as it finishes."""
    from lingraft.io.checkpoint import load_checkpoint

    models: dict[str, Any] = {}
    for u in units:
        if u["variant"] not in models:
            path = folder / ("model.pt" if u["variant"] == "plain" else "grafted.pt")
            models[u["variant"]] = load_checkpoint(path, map_location=dev)[0]
        n = u["num_samples"]
        rep = _certify_unit(models[u["variant"]], x_all[:n], y_all[:n], u, c, seed, dev)
        write({**u, **rep, "finished_at": _now()})
        log(
            f"[{folder.name}] {u['variant']:7s} {u['method']:11s} eps {u['eps']:g}: clean {rep['clean_acc']:.3f} "
            f"pgd {rep['pgd_acc']:.3f} certified {rep['certified_acc']:.3f} "
            f"({short_number(rep['time_per_sample_s'], 1000)} ms/img, unstable {short_number(rep['unstable'])})"
        )


def _certify_unit(model, x, y, u: dict, c: dict, seed: int, dev) -> dict:
    """certify() of one unit: x [n, *in_shape], y [n]; the summary numbers results.jsonl records."""
    from lingraft.certify.pipeline import certify

    rep = certify(
        model,
        x,
        y,
        u["eps"],
        method=u["method"],
        batch_size=c["batch_size"],
        pgd_steps=c["pgd_steps"],
        pgd_restarts=c["pgd_restarts"],
        alpha_iterations=c["alpha_iterations"],
        seed=seed,
        device=dev,
    )
    bounded = rep.counts["verified"] + rep.counts["unknown"]
    return {
        "clean_acc": rep.clean_acc,
        "pgd_acc": rep.pgd_acc,
        "certified_acc": rep.certified_acc,
        # None when no image reached bound propagation (all misclassified or falsified): nothing to count
        "counts": rep.counts,
        "bounded": bounded,
        "unstable": float(sum(rep.unstable_per_layer.values())) if bounded else None,
        "unstable_per_layer": rep.unstable_per_layer,
        "neurons_per_layer": rep.neurons_per_layer,
        "time_per_sample_s": rep.time_per_sample_s if bounded else None,
        "total_time_s": rep.total_time_s,
    }
