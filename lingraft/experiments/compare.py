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
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import difflib
import io
import math
import re
import time
import warnings
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable

from lingraft.config import config_hash, load_config, normalize_keys, validate_keys
from lingraft.errors import UsageError
from lingraft.io.files import append_jsonl, atomic_write_json, atomic_write_text, file_sha256, read_jsonl

__all__ = ["CompareSpec", "Entry", "TOP_KEYS", "GRAFT_KEYS", "CERTIFY_KEYS", "load_compare", "parse_compare",
           "run_compare", "build_rows", "table_columns", "render_markdown", "render_csv", "plot_cert_vs_eps"]

TOP_KEYS = ("dataset", "eps", "eps_grid", "train", "graft", "certify", "entries", "data_dir")
# run_graft keyword arguments a compare file may set (everything else run_graft takes is fixed by compare)
GRAFT_KEYS = ("ratio", "epochs", "num_train", "batch_size", "lr", "lr_graft", "train_eps", "rule", "scope",
              "gammas", "significance", "significance_input", "score_images", "score_bound", "init")
CERTIFY_KEYS = ("num_samples", "methods", "grid_num_samples", "batch_size", "pgd_steps", "pgd_restarts",
                "alpha_iterations")
_METHODS = ("ibp", "crown", "alpha-crown")
# TrainConfig fields the compare file does not control per entry (set from the top level or the CLI)
_TRAIN_FIXED = ("arch", "dataset", "teacher", "data_dir", "device", "seed")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_HASH_VERSION = 1  # bump when the meaning of a stored step changes, so old results are not reused


@dataclass
class Entry:
    """One baseline: ``train`` are its TrainConfig keyword arguments (without arch/dataset/teacher/seed/device).

    ``teacher`` is another entry's name (``teacher_entry`` True) or an absolute checkpoint path.
    """

    name: str
    arch: str
    train: dict
    teacher: str | None = None
    teacher_entry: bool = False


@dataclass
class CompareSpec:
    """A validated compare file. ``entries`` are in training order (every teacher before its students)."""

    dataset: str
    eps: float
    eps_grid: list[float]
    graft: dict
    certify: dict
    entries: list[Entry]
    data_dir: str | None = None
    source: str = "<dict>"

    def entry(self, name: str) -> Entry:
        return next(e for e in self.entries if e.name == name)


# ----------------------------------------------------------------------------------------------- parsing

def _number(value: Any, what: str) -> float:
    """A finite float from a YAML number or an ``"a/b"`` string."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise UsageError(f"{what} is {value!r}, not a number; give e.g. 0.1 or 2/255")
    try:
        x = float(Fraction(value.replace(" ", ""))) if isinstance(value, str) else float(value)
    except (ValueError, ZeroDivisionError):
        raise UsageError(f"{what} is {value!r}, not a number; give e.g. 0.1 or 2/255") from None
    if not math.isfinite(x):
        raise UsageError(f"{what} is {value!r}; give a finite number")
    return x + 0.0


def _eps(value: Any, what: str) -> float:
    from lingraft.certify.pipeline import check_eps

    x = _number(value, what)
    if not 0 < x <= 1:
        raise UsageError(f"{what} is {x}; eps must be in (0, 1] (pixel space, e.g. 0.1 or 8/255)")
    return check_eps(x)


def _mapping(value: Any, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UsageError(f"'{what}' must be a mapping like {{key: value}}, got {type(value).__name__}")
    return value


def _choice(value: str, options, what: str) -> str:
    if value not in options:
        close = difflib.get_close_matches(str(value), list(options), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UsageError(f"unknown {what} {value!r}{hint}; use one of: {', '.join(options)}")
    return value


def _train_fields() -> list[str]:
    from lingraft.train.loop import TrainConfig

    return [f.name for f in dataclasses.fields(TrainConfig) if f.name not in _TRAIN_FIXED]


def load_compare(path) -> CompareSpec:
    """Read and validate a compare YAML file; relative paths (teachers, data_dir) resolve against its folder."""
    p = Path(path)
    return parse_compare(load_config(p), base_dir=p.resolve().parent, where=str(p))


def parse_compare(cfg: dict, *, base_dir=None, where: str = "compare config") -> CompareSpec:
    """Validate a compare mapping (see module docstring). UsageError (exit 2) names the first problem."""
    from lingraft.data.datasets import dataset_info
    from lingraft.models import list_models
    from lingraft.train.loop import TrainConfig

    base = Path(base_dir) if base_dir is not None else Path.cwd()
    validate_keys(cfg, TOP_KEYS, where)
    cfg = normalize_keys(cfg, where)
    for req in ("dataset", "eps", "entries"):
        if req not in cfg:
            raise UsageError(f"{where} needs '{req}'")
    dataset = dataset_info(str(cfg["dataset"])).name
    eps = _eps(cfg["eps"], f"'eps' in {where}")
    grid_raw = cfg.get("eps_grid", [eps])
    grid_raw = grid_raw if isinstance(grid_raw, list) else [grid_raw]
    grid = sorted({_eps(v, f"'eps_grid' in {where}") for v in grid_raw})
    if not grid:
        raise UsageError(f"'eps_grid' in {where} is empty; list at least one eps or remove the key")

    train_fields = _train_fields()
    shared = _mapping(cfg.get("train"), "train")
    validate_keys(shared, train_fields, f"'train' of {where}")
    shared = normalize_keys(shared, "train")

    graft = _mapping(cfg.get("graft"), "graft")
    validate_keys(graft, GRAFT_KEYS, f"'graft' of {where}")
    graft = normalize_keys(graft, "graft")
    if "gammas" in graft:
        graft["gammas"] = [_number(g, "graft gammas") for g in (graft["gammas"] if isinstance(graft["gammas"], list)
                                                               else [graft["gammas"]])]
    ratio = _number(graft.get("ratio", 0.5), "graft ratio")
    if not 0 <= ratio <= 1:
        raise UsageError(f"graft ratio must be in [0, 1], got {ratio}")
    graft["ratio"] = ratio
    if "train_eps" in graft:
        graft["train_eps"] = _eps(graft["train_eps"], "graft train_eps")

    cert = _mapping(cfg.get("certify"), "certify")
    validate_keys(cert, CERTIFY_KEYS, f"'certify' of {where}")
    cert = normalize_keys(cert, "certify")
    methods = cert.get("methods", ["crown", "alpha-crown"])
    methods = [str(m).strip().lower() for m in (methods if isinstance(methods, list) else str(methods).split(","))]
    if not methods:
        raise UsageError(f"'certify.methods' in {where} is empty; list e.g. [crown, alpha-crown]")
    for m in methods:
        _choice(m, _METHODS, "certify method")
    cert["methods"] = list(dict.fromkeys(methods))
    for key, default, low in (("num_samples", 200, 1), ("batch_size", 32, 1), ("pgd_steps", 20, 0),
                              ("pgd_restarts", 1, 1), ("alpha_iterations", 20, 1)):
        v = cert.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise UsageError(f"certify {key} must be an integer >= {low}, got {v!r}")
        cert[key] = v
    g = cert.get("grid_num_samples", cert["num_samples"])
    if isinstance(g, bool) or not isinstance(g, int) or g < 1:
        raise UsageError(f"certify grid_num_samples must be an integer >= 1, got {g!r}")
    cert["grid_num_samples"] = g

    data_dir = cfg.get("data_dir")
    if data_dir is not None:
        data_dir = str((base / str(data_dir)).resolve())

    raw = cfg["entries"]
    if not isinstance(raw, list) or not raw:
        raise UsageError(f"'entries' in {where} must be a non-empty list of {{name: ..., arch: ...}} mappings")
    entry_keys = ["name", "arch", "teacher", "train_eps"] + [f for f in train_fields if f != "eps"]
    models = list_models()
    entries: list[Entry] = []
    for i, e in enumerate(raw):
        if not isinstance(e, dict):
            raise UsageError(f"entry {i + 1} in {where} must be a mapping like {{name: ce, arch: cnn-b}}")
        label = f"entry {e.get('name', i + 1)!r} of {where}"
        validate_keys(e, entry_keys, label)
        e = normalize_keys(e, label)
        name = e.get("name")
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise UsageError(f"{label} needs a 'name' of letters, digits, '-', '_' or '.' (it names a folder)")
        if any(x.name == name for x in entries):
            raise UsageError(f"entry name {name!r} appears twice in {where}; names must be unique")
        arch = e.get("arch")
        if arch is None:
            raise UsageError(f"{label} needs 'arch' (one of: {', '.join(models)})")
        _choice(str(arch), models, f"arch in {label}:")
        kw = dict(shared)
        kw.update({k: v for k, v in e.items() if k not in ("name", "arch", "teacher", "train_eps")})
        if "train_eps" in e:
            kw["eps"] = _eps(e["train_eps"], f"train_eps of {label}")
        elif "eps" not in kw:
            kw["eps"] = eps
        TrainConfig(arch=str(arch), dataset=dataset, **kw)  # value checks (method, optimizer, ...)
        entries.append(Entry(name, str(arch), kw, e.get("teacher")))

    names = [x.name for x in entries]
    for x in entries:
        _check_loss(x, names, base, where)
    return CompareSpec(dataset=dataset, eps=eps, eps_grid=grid, graft=graft, certify=cert,
                       entries=_training_order(entries), data_dir=data_dir, source=where)


def _check_loss(x: Entry, names: list[str], base: Path, where: str) -> None:
    """Validate the loss name and resolve the teacher (entry name or checkpoint path)."""
    from lingraft.train import losses

    loss = str(x.train.get("loss", "ce"))
    _choice(loss, list(losses.LOSSES), f"loss in entry {x.name!r}:")
    needs = losses.needs_teacher(loss)
    t = x.teacher
    if t is None:
        if needs:
            raise UsageError(f"entry {x.name!r}: loss {loss!r} needs a teacher; add 'teacher: ENTRY_NAME' "
                             "or a checkpoint path")
        return
    if not needs:
        raise UsageError(f"entry {x.name!r} sets a teacher but loss {loss!r} does not use one; "
                         "remove 'teacher' or use loss kd or nkd")
    if not isinstance(t, str) or not t.strip():
        raise UsageError(f"entry {x.name!r}: teacher must be an entry name or a checkpoint path, got {t!r}")
    if t in names:
        x.teacher, x.teacher_entry = t, True
        return
    looks_like_path = "/" in t or "\\" in t or Path(t).suffix.lower() in (".pt", ".pth", ".ckpt")
    if looks_like_path:
        p = (base / t).resolve()
        if not p.is_file():
            raise UsageError(f"entry {x.name!r}: teacher checkpoint {p} not found; fix the path or name an entry")
        x.teacher, x.teacher_entry = str(p), False
        return
    close = difflib.get_close_matches(t, names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise UsageError(f"entry {x.name!r}: unknown teacher {t!r}{hint}; name another entry "
                     f"({', '.join(names)}) or give a checkpoint path")


def _training_order(entries: list[Entry]) -> list[Entry]:
    """Depth-first topological order over teacher links (file order otherwise); UsageError on a cycle."""
    by = {e.name: e for e in entries}
    order: list[Entry] = []
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(e: Entry, stack: list[str]) -> None:
        if state.get(e.name) == 2:
            return
        if state.get(e.name) == 1:
            cyc = stack[stack.index(e.name):] + [e.name]
            raise UsageError(f"teacher cycle {' -> '.join(cyc)}; an entry cannot (indirectly) teach itself")
        state[e.name] = 1
        if e.teacher_entry:
            visit(by[e.teacher], stack + [e.name])
        state[e.name] = 2
        order.append(e)

    for e in entries:
        visit(e, [])
    return order


# ----------------------------------------------------------------------------------------------- hashing

def step_hashes(spec: CompareSpec, seed: int) -> dict[str, dict[str, str]]:
    """{entry: {"train": hash, "graft": hash}}; a student's train hash includes its teacher's."""
    out: dict[str, dict[str, str]] = {}
    for e in spec.entries:  # training order: teachers first
        if e.teacher is None:
            teacher = None
        elif e.teacher_entry:
            teacher = out[e.teacher]["train"]
        else:
            teacher = file_sha256(e.teacher)[:16]
        th = config_hash({"v": _HASH_VERSION, "arch": e.arch, "dataset": spec.dataset, "train": e.train,
                          "teacher": teacher, "seed": seed})
        gh = config_hash({"v": _HASH_VERSION, "parent": th, "graft": spec.graft, "eps": spec.eps, "seed": seed})
        out[e.name] = {"train": th, "graft": gh}
    return out


def unit_key(model_hash: str, eps: float, method: str, num_samples: int, spec: CompareSpec, seed: int) -> str:
    """Identity of one certification unit: the model's step hash plus everything certify() depends on."""
    keys = ("batch_size", "pgd_steps", "pgd_restarts") + (("alpha_iterations",) if method == "alpha-crown" else ())
    opts = {k: spec.certify[k] for k in keys}
    return config_hash({"v": _HASH_VERSION, "model": model_hash, "eps": eps, "method": method, "n": num_samples,
                        "dataset": spec.dataset, "opts": opts, "seed": seed})


def _units(spec: CompareSpec, hashes: dict, entry: str, seed: int) -> list[dict]:
    """Every certification unit of one entry: main (eps x methods) and grid (eps_grid x crown), deduplicated."""
    out: dict[str, dict] = {}
    c = spec.certify
    for variant in ("plain", "grafted"):
        mh = hashes[entry]["train" if variant == "plain" else "graft"]
        todo = [(spec.eps, m, c["num_samples"]) for m in c["methods"]]
        todo += [(e, "crown", c["grid_num_samples"]) for e in spec.eps_grid]
        for eps, method, n in todo:
            k = unit_key(mh, eps, method, n, spec, seed)
            out.setdefault(k, {"unit": k, "entry": entry, "variant": variant, "eps": eps, "method": method,
                               "num_samples": n})
    return list(out.values())


# ----------------------------------------------------------------------------------------------- running

def _read_done(path: Path, h: str) -> dict | None:
    """The record of a finished step if ``path`` exists and carries hash ``h``."""
    import json

    try:
        d = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    return d if isinstance(d, dict) and d.get("hash") == h else None


def _clear_stale(folder: Path, h: str, files: list[str], log: Callable[[str], None], what: str) -> None:
    """Remove a step's outputs left by a run with another config (``started.json`` says which)."""
    import json

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


def _ensure_trained(spec: CompareSpec, e: Entry, out: Path, hashes: dict, seed: int, device: str,
                    log: Callable[[str], None], progress: bool) -> dict:
    from lingraft.train.loop import TrainConfig, train

    folder = out / e.name
    folder.mkdir(parents=True, exist_ok=True)
    h = hashes[e.name]["train"]
    ckpt = folder / "model.pt"
    done = _read_done(folder / "train.done.json", h)
    if done is not None and ckpt.exists():
        log(f"[{e.name}] reusing {ckpt} (trained {done['train_s']:.0f} s)")
        return done
    _clear_stale(folder, h, ["model.pt", "model.json", "model.pt.state", "train.done.json"], log, "train")
    teacher = None
    if e.teacher is not None:
        teacher = str(out / e.teacher / "model.pt") if e.teacher_entry else e.teacher
    cfg = TrainConfig(arch=e.arch, dataset=spec.dataset, teacher=teacher, data_dir=spec.data_dir, device=device,
                      seed=seed, **e.train)
    log(f"[{e.name}] training {e.arch} (method {cfg.method}, loss {cfg.loss}"
        + (f", teacher {e.teacher}" if e.teacher else "") + f", {cfg.epochs} epoch(s))")
    t0 = time.perf_counter()
    metrics = train(cfg, ckpt, progress=progress, log=lambda s: log(f"[{e.name}] {s}"),
                    meta={"command": "lingraft compare", "compare_hash": h})
    rec = {"hash": h, "checkpoint": str(ckpt), "train_s": round(time.perf_counter() - t0, 3),
           "train_loop_s": metrics.get("train_time_s"), "best": metrics.get("best"),
           "finished_at": _now()}
    atomic_write_json(folder / "train.done.json", rec)
    return rec


def _ensure_grafted(spec: CompareSpec, e: Entry, out: Path, hashes: dict, seed: int, device,
                    log: Callable[[str], None]) -> dict:
    from lingraft.graft.pipeline import run_graft

    folder = out / e.name
    h = hashes[e.name]["graft"]
    ckpt = folder / "grafted.pt"
    done = _read_done(folder / "graft.done.json", h)
    if done is not None and ckpt.exists():
        log(f"[{e.name}] reusing {ckpt} (grafted {done['graft_s']:.0f} s)")
        return done
    _clear_stale(folder, h, ["grafted.pt", "grafted.json", "graft.done.json"], log, "graft")
    kw = dict(spec.graft)
    if "gammas" in kw:
        kw["gammas"] = tuple(kw["gammas"])
    log(f"[{e.name}] grafting ratio {kw['ratio']} at eps {spec.eps}")
    t0 = time.perf_counter()
    res = run_graft(folder / "model.pt", out_path=str(ckpt), eps=spec.eps, num_samples=0, dataset=spec.dataset,
                    data_dir=spec.data_dir, seed=seed, device=device, log=lambda s: log(f"[{e.name}] {s}"),
                    command="lingraft compare", **kw)
    rec = {"hash": h, "checkpoint": str(ckpt), "graft_s": round(time.perf_counter() - t0, 3),
           "finetune_s": round(float(res["finetune"]["time_s"]), 3), "relu_neurons": res["relu_neurons"],
           "grafted_neurons": res["grafted_neurons"], "finished_at": _now()}
    atomic_write_json(folder / "graft.done.json", rec)
    return rec


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def run_compare(spec: CompareSpec, out_dir, *, only: list[str] | None = None, seed: int = 0, device=None,
                log: Callable[[str], None] = print, progress: bool = False, plot: bool = True) -> dict:
    """Train, graft and certify the (``only``-selected) entries, reusing finished steps, then write
    results.jsonl, table.md, table.csv, table.json and cert_vs_eps.png into ``out_dir``. Returns table.json's dict.

    ``only``: entry names to run (their teachers are trained too, but not certified); the table lists every entry
    of the spec whose units are all in results.jsonl, so partial runs add up.
    """
    import torch

    from lingraft.io.checkpoint import load_checkpoint
    from lingraft.data.datasets import load_dataset, subset

    names = [e.name for e in spec.entries]
    selected = names if not only else [_choice(n, names, "entry in --only:") for n in only]
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hashes = step_hashes(spec, seed)

    # entries to train: the selected ones and, transitively, their teachers (spec order = teachers first)
    need = set(selected)
    for e in reversed(spec.entries):
        if e.name in need and e.teacher_entry:
            need.add(e.teacher)
    t_all = time.perf_counter()
    results_path = out / "results.jsonl"
    have = {r.get("unit") for r in read_jsonl(results_path, repair=True)}  # a torn tail (kill) is cut
    n_max = max(spec.certify["num_samples"], spec.certify["grid_num_samples"])
    x_all, y_all = load_dataset(spec.dataset, "test", spec.data_dir)
    x_all, y_all = subset(x_all, y_all, min(n_max, len(x_all)))
    c = spec.certify
    # one entry at a time (teachers come first), refreshing the tables after each, so a long run shows progress
    for e in spec.entries:
        if e.name not in need:
            continue
        _ensure_trained(spec, e, out, hashes, seed, str(dev), log, progress)
        if e.name not in selected:
            continue  # a teacher that was not asked for: trained only
        _ensure_grafted(spec, e, out, hashes, seed, dev, log)
        units = [u for u in _units(spec, hashes, e.name, seed) if u["unit"] not in have]
        if not units:
            log(f"[{e.name}] all certification units already in {results_path.name}")
            continue
        models: dict[str, Any] = {}
        for u in units:
            if u["variant"] not in models:
                path = out / e.name / ("model.pt" if u["variant"] == "plain" else "grafted.pt")
                models[u["variant"]] = load_checkpoint(path, map_location=dev)[0]
            rep = _certify_unit(models[u["variant"]], x_all[:u["num_samples"]], y_all[:u["num_samples"]], u, c,
                                seed, dev)
            append_jsonl(results_path, {**u, **rep, "finished_at": _now()})
            have.add(u["unit"])
            log(f"[{e.name}] {u['variant']:7s} {u['method']:11s} eps {u['eps']:g}: clean {rep['clean_acc']:.3f} "
                f"pgd {rep['pgd_acc']:.3f} certified {rep['certified_acc']:.3f} "
                f"({_num(rep['time_per_sample_s'], 1000)} ms/img, unstable {_num(rep['unstable'])})")
        write_outputs(build_result(spec, out, hashes, seed), out, log=lambda s: None, plot=False)
    result = build_result(spec, out, hashes, seed)
    result["wall_s"] = round(time.perf_counter() - t_all, 1)
    write_outputs(result, out, log=log, plot=plot)
    return result


def _certify_unit(model, x, y, u: dict, c: dict, seed: int, dev) -> dict:
    from lingraft.certify.pipeline import certify

    rep = certify(model, x, y, u["eps"], method=u["method"], batch_size=c["batch_size"], pgd_steps=c["pgd_steps"],
                  pgd_restarts=c["pgd_restarts"], alpha_iterations=c["alpha_iterations"], seed=seed, device=dev)
    bounded = rep.counts["verified"] + rep.counts["unknown"]
    return {"clean_acc": rep.clean_acc, "pgd_acc": rep.pgd_acc, "certified_acc": rep.certified_acc,
            # None when no image reached bound propagation (all misclassified or falsified): nothing to count
            "counts": rep.counts, "bounded": bounded,
            "unstable": float(sum(rep.unstable_per_layer.values())) if bounded else None,
            "unstable_per_layer": rep.unstable_per_layer, "neurons_per_layer": rep.neurons_per_layer,
            "time_per_sample_s": rep.time_per_sample_s if bounded else None, "total_time_s": rep.total_time_s}


# ----------------------------------------------------------------------------------------------- tables

def build_rows(spec: CompareSpec, out: Path, hashes: dict, seed: int) -> list[dict]:
    """One row per entry x {plain, grafted} whose main units (eps x methods) are all in results.jsonl."""
    import json

    recs = {r.get("unit"): r for r in read_jsonl(out / "results.jsonl")}
    c = spec.certify
    rows = []
    for e in spec.entries:
        def done(kind):
            try:
                return json.loads((out / e.name / f"{kind}.done.json").read_text())
            except (FileNotFoundError, ValueError):
                return {}
        tr, gr = done("train"), done("graft")
        for variant in ("plain", "grafted"):
            mh = hashes[e.name]["train" if variant == "plain" else "graft"]
            main = [recs.get(unit_key(mh, spec.eps, m, c["num_samples"], spec, seed)) for m in c["methods"]]
            if any(r is None for r in main):
                continue
            first = main[0]
            grid = {}
            for eps in spec.eps_grid:
                r = recs.get(unit_key(mh, eps, "crown", c["grid_num_samples"], spec, seed))
                grid[f"{eps:g}"] = None if r is None else r["certified_acc"]
            rows.append({
                "entry": e.name, "variant": variant, "arch": e.arch, "method": e.train.get("method", "ce"),
                "loss": e.train.get("loss", "ce"), "teacher": e.teacher if e.teacher_entry else
                (Path(e.teacher).name if e.teacher else None),
                "clean_acc": first["clean_acc"], "pgd_acc": first["pgd_acc"],
                "certified": {m: r["certified_acc"] for m, r in zip(c["methods"], main)},
                "ms_per_img": {m: None if r["time_per_sample_s"] is None else 1000 * r["time_per_sample_s"]
                               for m, r in zip(c["methods"], main)},
                "unstable": first["unstable"],
                "train_s": tr.get("train_s") if tr.get("hash") == hashes[e.name]["train"] else None,
                "graft_s": (gr.get("graft_s") if gr.get("hash") == hashes[e.name]["graft"] else None)
                if variant == "grafted" else None,
                "grafted_neurons": gr.get("grafted_neurons", 0) if variant == "grafted" else 0,
                "relu_neurons": gr.get("relu_neurons"),
                "cert_vs_eps": grid,
            })
    return rows


def build_result(spec: CompareSpec, out: Path, hashes: dict, seed: int) -> dict:
    cfg = {"source": spec.source, "dataset": spec.dataset, "eps": spec.eps, "eps_grid": spec.eps_grid,
           "graft": spec.graft, "certify": spec.certify, "seed": seed,
           "entries": [{"name": e.name, "arch": e.arch, "teacher": e.teacher, **e.train} for e in spec.entries]}
    return {"schema_version": 1, "command": "compare", "config": cfg, "out_dir": str(out),
            "rows": build_rows(spec, out, hashes, seed)}


def _pct(v) -> str:
    return "" if v is None else f"{100 * v:.1f}"


def _num(v, scale: float = 1.0) -> str:
    """Blank for None; one decimal below 10, none above (seconds, ms, neuron counts)."""
    if v is None:
        return ""
    v = v * scale
    return f"{v:.1f}" if abs(v) < 10 else f"{v:.0f}"


def table_columns(result: dict) -> tuple[list[str], list[list[str]]]:
    methods = result["config"]["certify"]["methods"]
    header = (["entry", "model", "arch", "train", "clean %", "PGD %"] + [f"{m} cert %" for m in methods]
              + ["unstable/img"] + [f"{m} ms/img" for m in methods] + ["train s", "graft s"])
    body = []
    for r in result["rows"]:
        how = r["method"] if r["loss"] == "ce" else f"{r['method']}+{r['loss']}"
        if r["teacher"]:
            how += f" (teacher {r['teacher']})"
        body.append([r["entry"], r["variant"], r["arch"], how, _pct(r["clean_acc"]), _pct(r["pgd_acc"])]
                    + [_pct(r["certified"][m]) for m in methods] + [_num(r["unstable"])]
                    + [_num(r["ms_per_img"][m]) for m in methods] + [_num(r["train_s"]), _num(r["graft_s"])])
    return header, body


def render_markdown(result: dict) -> str:
    """A GitHub markdown table of the rows plus one line describing the setting."""
    cfg = result["config"]
    header, body = table_columns(result)
    c = cfg["certify"]
    lines = [f"dataset {cfg['dataset']}, eps {cfg['eps']:g} (L-inf), first {c['num_samples']} test images, "
             f"graft ratio {cfg['graft'].get('ratio', 0.5)}, seed {cfg['seed']}", "",
             "| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i < 4 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    grid = cfg["eps_grid"]
    if result["rows"]:
        lines += ["", f"CROWN certified accuracy (%) vs eps (first {c['grid_num_samples']} test images):", "",
                  "| entry | model | " + " | ".join(f"eps {e:g}" for e in grid) + " |",
                  "|---|---|" + "---:|" * len(grid)]
        for r in result["rows"]:
            lines.append(f"| {r['entry']} | {r['variant']} | "
                         + " | ".join(_pct(r["cert_vs_eps"].get(f"{e:g}")) for e in grid) + " |")
    return "\n".join(lines) + "\n"


def render_csv(result: dict) -> str:
    """Flat CSV: fractions (not percent), one row per entry x variant, grid columns cert_crown_eps_<eps>."""
    methods = result["config"]["certify"]["methods"]
    grid = result["config"]["eps_grid"]
    fields = (["entry", "variant", "arch", "method", "loss", "teacher", "clean_acc", "pgd_acc"]
              + [f"cert_{m}" for m in methods] + ["unstable"] + [f"ms_per_img_{m}" for m in methods]
              + ["train_s", "graft_s", "grafted_neurons", "relu_neurons"] + [f"cert_crown_eps_{e:g}" for e in grid])
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(fields)
    for r in result["rows"]:
        w.writerow([r["entry"], r["variant"], r["arch"], r["method"], r["loss"], r["teacher"] or "",
                    r["clean_acc"], r["pgd_acc"]] + [r["certified"][m] for m in methods] + [r["unstable"]]
                   + [None if r["ms_per_img"][m] is None else round(r["ms_per_img"][m], 3) for m in methods]
                   + [r["train_s"], r["graft_s"], r["grafted_neurons"], r["relu_neurons"]]
                   + [r["cert_vs_eps"].get(f"{e:g}") for e in grid])
    return buf.getvalue()


def plot_cert_vs_eps(result: dict, path) -> bool:
    """CROWN certified accuracy vs eps, one colour per entry, solid plain / dashed grafted. Returns False (and
    warns) when matplotlib is not installed (``pip install lingraft[plot]``)."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # headless; never opens a window
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed: skipping cert_vs_eps.png (pip install 'lingraft[plot]')",
                      stacklevel=2)
        return False
    grid = result["config"]["eps_grid"]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    entries = list(dict.fromkeys(r["entry"] for r in result["rows"]))
    for r in result["rows"]:
        ys = [r["cert_vs_eps"].get(f"{e:g}") for e in grid]
        pts = [(e, 100 * v) for e, v in zip(grid, ys) if v is not None]
        if not pts:
            continue
        i = entries.index(r["entry"])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3,
                linestyle="-" if r["variant"] == "plain" else (0, (4, 2)), color=colors[i % len(colors)],
                label=f"{r['entry']}" + (" (grafted)" if r["variant"] == "grafted" else ""))
    ax.set_xlabel("eps (L-inf, pixel space)")
    ax.set_ylabel("CROWN certified accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(f"{result['config']['dataset']}: certified accuracy vs eps (solid plain, dashed grafted)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, handlelength=3.5)  # outside: lines stay visible
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    from lingraft.io.files import atomic_write

    atomic_write(path, lambda f: f.write(buf.getvalue()))
    return True


def write_outputs(result: dict, out: Path, *, log: Callable[[str], None] = print, plot: bool = True) -> None:
    atomic_write_text(out / "table.md", render_markdown(result))
    atomic_write_text(out / "table.csv", render_csv(result))
    atomic_write_json(out / "table.json", result)
    wrote = ["table.md", "table.csv", "table.json"]
    if plot and result["rows"]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ok = plot_cert_vs_eps(result, out / "cert_vs_eps.png")
        for w in caught:
            log(f"warning: {w.message}")
        if ok:
            wrote.append("cert_vs_eps.png")
    log(f"wrote {', '.join(str(out / w) for w in wrote)}")
