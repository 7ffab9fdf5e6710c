"""Resumable grid sweeps: models x methods x ratios x eps, one JSON line per finished job.

A sweep file (YAML)::

    models: [fc-8x200, ckpt/cnn_b_lg.pt]     # zoo names or checkpoint paths (relative to this file)
    methods: [ibp, crown]
    ratios: [0.0, 0.5]                        # optional, default [0.0]
    eps: [0.01, 2/255]                        # numbers or "a/b" fractions
    results: results.jsonl                    # optional, relative to this file
    options: {batch-size: 64}                 # optional, passed to every job as job["options"]

Each job is ``{"model", "method", "ratio", "eps", "options"}`` plus a ``job_id``: the hash of those
parameters with the model written as in the file, so moving the folder or changing the working directory
keeps resume working. :func:`run_sweep` appends ``{"job_id", "job", "status", "result", "error",
"elapsed_s", "finished_at"}`` per job and skips jobs already in the results file.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import difflib
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lingraft.clock import Stopwatch
from lingraft.config import config_hash, load_config, normalize_keys, parse_eps, parse_number, validate_keys
from lingraft.errors import LingraftError, UsageError
from lingraft.io.files import ensure_parent, json_default
from lingraft.io.resumable import ResumableLog, latest_by
from lingraft.signals import InterruptGuard, critical, interrupted

__all__ = [
    "SweepSpec",
    "SWEEP_KEYS",
    "load_sweep",
    "expand_jobs",
    "job_id",
    "run_sweep",
    "read_results",
    "latest_records",
]

#: ``runner(todo, job_fn, write)``: runs the unfinished jobs, ``write(record)`` as each finishes (see run_sweep)
JobsRunner = Callable[[list[dict], Callable[[dict], dict], Callable[[dict], None]], None]

SWEEP_KEYS = {"models", "eps", "methods", "ratios", "results", "options"}
# A model entry with one of these suffixes or a path separator is a file, otherwise a zoo name.
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".onnx", ".ckpt", ".bin", ".safetensors", ".tar")


@dataclass
class SweepSpec:
    """A parameter grid. ``base_dir``: folder that relative checkpoint paths resolve against (None: cwd)."""

    models: list[str]
    eps: list[float]
    methods: list[str]
    ratios: list[float] = field(default_factory=lambda: [0.0])
    extra: dict = field(default_factory=dict)
    results: str = "results.jsonl"
    base_dir: str | None = None


# ----------------------------------------------------------------------------------------------- loading


def _as_list(value: Any) -> list:
    return value if isinstance(value, list) else [value]


def _parse_number(value: Any, key: str, where: str) -> float:
    """A finite float from a YAML number or an ``"a/b"`` fraction string (:func:`lingraft.config.parse_number`)."""
    return parse_number(value, f"'{key}' in {where}")


def _each(problems: list[str], items: list, parse: Callable[[Any], Any]) -> list:
    """``parse`` of every item that parses; the message of every one that does not goes to ``problems``."""
    out = []
    for v in items:
        try:
            out.append(parse(v))
        except UsageError as e:
            problems.append(str(e))
    return out


def _ratio(value: Any, where: str) -> float:
    r = _parse_number(value, "ratios", where)
    if not 0.0 <= r <= 1.0:
        raise UsageError(f"'ratios' in {where} has {r}; grafting ratios must be in [0, 1]")
    return r


def _method(m: Any, allowed: set | None, where: str) -> str:
    m = _string_list(m, "methods", where)[0]
    if allowed is not None and m not in allowed:
        close = difflib.get_close_matches(m, sorted(allowed), n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"known: {', '.join(sorted(allowed))}"
        raise UsageError(f"unknown method '{m}' in {where} ({hint})")
    return m


def _options(raw: Any, allowed: Iterable[str] | None, where: str) -> dict:
    if not isinstance(raw, dict):
        raise UsageError(f"'options' in {where} must be a mapping like 'options: {{batch-size: 64}}'")
    if allowed is not None:
        validate_keys(raw, set(allowed), f"{where} options")
    return _check_json_value(normalize_keys(raw, f"{where} options"), "options", where)


def _string_list(value: Any, key: str, where: str) -> list[str]:
    items = _as_list(value)
    for v in items:
        if not isinstance(v, str) or not v.strip():
            raise UsageError(f"'{key}' in {where} has {v!r}; each entry must be a non-empty name in quotes if needed")
    return [v.strip() for v in items]


def _check_nonempty_unique(items: list, key: str, where: str) -> None:
    if not items:
        raise UsageError(f"'{key}' in {where} is empty; list at least one value")
    seen = set()
    for v in items:
        if v in seen:
            raise UsageError(f"'{key}' in {where} lists {v!r} twice; remove the duplicate")
        seen.add(v)


def _check_json_value(value: Any, path: str, where: str) -> Any:
    """Options must survive a JSON round trip (they go into job ids and the results file)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise UsageError(f"option '{path}' in {where} is {value!r}; give a finite number")
        return value + 0.0
    if isinstance(value, list):
        return [_check_json_value(v, f"{path}[{i}]", where) for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise UsageError(f"option key {k!r} under '{path}' in {where} must be a name")
            out[k] = _check_json_value(v, f"{path}.{k}", where)
        return out
    raise UsageError(
        f"option '{path}' in {where} is a {type(value).__name__} ({value!r}); quote it to make it a string"
    )


def load_sweep(
    path: str | os.PathLike,
    *,
    allowed_methods: Iterable[str] | None = None,
    allowed_options: Iterable[str] | None = None,
) -> SweepSpec:
    """Read and validate a sweep YAML file (see module docstring).

    ``allowed_methods`` / ``allowed_options``: when given, unknown entries fail with a did-you-mean.
    Relative checkpoint paths and ``results`` are resolved against the sweep file's folder.
    Raises LingraftError (exit 1) for file problems, UsageError (exit 2) for bad keys/values.
    """
    p = Path(path)
    where = str(p)
    cfg = load_config(p)
    validate_keys(cfg, SWEEP_KEYS, where)
    cfg = normalize_keys(cfg, where)
    problems: list[str] = []  # every invalid entry is reported, in one message
    for key in ("models", "eps", "methods"):
        if key not in cfg or cfg[key] is None:
            problems.append(f"{where} has no '{key}' list; add e.g. '{key}: [...]'")
    allowed = None if allowed_methods is None else set(allowed_methods)
    raw = {k: [] if cfg.get(k) is None else _as_list(cfg[k]) for k in ("models", "methods", "eps", "ratios")}
    models = _each(problems, raw["models"], lambda v: _string_list(v, "models", where)[0])
    methods = _each(problems, raw["methods"], lambda v: _method(v, allowed, where))
    eps = _each(problems, raw["eps"], lambda v: parse_eps(v, f"'eps' in {where}"))
    ratios = _each(problems, raw["ratios"], lambda v: _ratio(v, where)) if cfg.get("ratios") is not None else [0.0]
    for key, items in (("models", models), ("methods", methods), ("eps", eps), ("ratios", ratios)):
        if cfg.get(key) is not None and len(items) == len(raw[key]):  # given, and every entry parsed
            _each(problems, [items], lambda v, key=key: _check_nonempty_unique(v, key, where))
    options = _each(problems, [cfg.get("options") or {}], lambda v: _options(v, allowed_options, where))
    results = cfg.get("results", "results.jsonl")
    if not isinstance(results, str) or not results.strip():
        problems.append(f"'results' in {where} must be a file name like results.jsonl")
    if problems:
        if len(problems) == 1:
            raise UsageError(problems[0])
        listed = "; ".join(f"({i}) {m}" for i, m in enumerate(problems, 1))
        raise UsageError(f"{len(problems)} invalid entries in {where}: {listed}")
    base_dir = p.resolve().parent
    results_path = Path(os.path.expanduser(results))
    if not results_path.is_absolute():
        results_path = base_dir / results_path
    return SweepSpec(
        models=models,
        eps=eps,
        methods=methods,
        ratios=ratios,
        extra=options[0],
        results=str(results_path),
        base_dir=str(base_dir),
    )


# --------------------------------------------------------------------------------------------- expanding


def _looks_like_path(model: str) -> bool:
    return (
        "/" in model or os.sep in model or model.startswith(("~", ".")) or model.lower().endswith(_CHECKPOINT_SUFFIXES)
    )


def _resolve_model(model: str, base_dir: str | None) -> str:
    if not _looks_like_path(model):
        return model  # a zoo name
    expanded = os.path.expanduser(model)
    if base_dir is None or os.path.isabs(expanded):
        return expanded
    return str(Path(base_dir) / expanded)


def job_id(params: dict) -> str:
    """Stable id of a job's parameters (model as written in the sweep file)."""
    return config_hash(params)


def expand_jobs(spec: SweepSpec) -> list[dict]:
    """The grid in a deterministic order: models (outermost) x methods x ratios x eps (innermost).

    Model-major order lets a job function cache the loaded network between consecutive jobs.
    Returns dicts ``{"job_id", "model", "method", "ratio", "eps", "options"}``; ``model`` is resolved
    against ``spec.base_dir`` while ``job_id`` hashes it as written. Duplicate grid points are dropped.
    """
    jobs: list[dict] = []
    seen: set[str] = set()
    for model in spec.models:
        resolved = _resolve_model(model, spec.base_dir)
        for method in spec.methods:
            for ratio in spec.ratios:
                for eps in spec.eps:
                    params = {
                        "model": model,
                        "method": method,
                        "ratio": float(ratio),
                        "eps": float(eps),
                        "options": dict(spec.extra),
                    }
                    jid = job_id(params)
                    if jid in seen:
                        continue
                    seen.add(jid)
                    jobs.append({"job_id": jid, **params, "model": resolved})
    return jobs


# ------------------------------------------------------------------------------------------------ results


def read_results(path: str | os.PathLike) -> list[dict]:
    """All records of a results file in file order, tolerating a torn last line.

    Raises LingraftError naming the line when a line other than a torn last line is not valid JSON.
    """
    p = Path(path)
    if p.is_dir():
        raise LingraftError(f"results path {p} is a directory; give a .jsonl file")
    return [rec for rec in _results_log(p).read() if isinstance(rec, dict)]


def _results_log(path: Path) -> ResumableLog:
    return ResumableLog(path, what="results file")


def latest_records(records: Iterable[dict]) -> dict[str, dict]:
    """``{job_id: record}`` keeping the last record per job (a retried error is superseded)."""
    return latest_by(records, lambda rec: rec.get("job_id") if isinstance(rec.get("job_id"), str) else None)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _short_job(job: dict) -> str:
    return f"model={job['model']} method={job['method']} ratio={job['ratio']:g} eps={job['eps']:g}"


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Refuse to run two sweeps appending to the same results file at once (POSIX advisory lock)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no locking
        yield
        return
    with open(path, "a", encoding="utf-8") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise LingraftError(
                f"another sweep is writing {path}; wait for it to finish or set a different results file"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


# ------------------------------------------------------------------------------------------------ running


def run_sweep(
    spec: SweepSpec,
    job_fn: Callable[[dict], dict],
    *,
    results_path: str | os.PathLike | None = None,
    log: Callable[[str], Any] = print,
    retry_errors: bool = False,
    runner: JobsRunner | None = None,
) -> list[dict]:
    """Run every job of ``spec`` not yet in the results file, appending one JSON line per finished job.

    ``job_fn(job) -> dict`` gets a copy of a job from :func:`expand_jobs` (``job_id`` included) and
    returns a JSON-serializable dict. An exception from ``job_fn`` is recorded with
    ``status: "error"`` and the sweep goes on; reruns skip such jobs unless ``retry_errors``.
    SIGINT/SIGTERM/KeyboardInterrupt stop the sweep (a write in progress completes first) and the
    KeyboardInterrupt is re-raised, so the CLI can exit 130; rerunning resumes where it stopped.
    Returns the latest record of every job of the spec, in job order.
    ``runner(todo, job_fn, write)`` runs the unfinished jobs and calls ``write(record)`` in this process for
    each as it finishes (records built by :func:`job_record`); the default runs them here one after another
    (:func:`lingraft.distributed.jobs_ray.run_sweep_on_ray` passes one that runs them as Ray tasks).
    """
    path = Path(results_path if results_path is not None else spec.results)
    if path.is_dir():
        raise LingraftError(f"results path {path} is a directory; give a .jsonl file")
    ensure_parent(path)
    jobs = expand_jobs(spec)
    results = _results_log(path)

    with _exclusive(path):
        # a torn last line (a kill mid-append) is cut away before appending; that job reruns
        records = results.resume(log=lambda msg: log(f"{msg}; that job will rerun"))
        latest = latest_records(rec for rec in records if isinstance(rec, dict))

        def is_done(jid: str) -> bool:
            rec = latest.get(jid)
            return rec is not None and (rec.get("status") != "error" or not retry_errors)

        todo = [j for j in jobs if not is_done(j["job_id"])]
        if len(todo) < len(jobs):
            log(f"resuming {path}: {len(jobs) - len(todo)} of {len(jobs)} jobs already done")
        n_done = len(jobs) - len(todo)

        def write(record: dict) -> None:
            nonlocal n_done
            with critical():
                results.append(record)
                latest[record["job_id"]] = record
                n_done += 1
            msg = f"[{n_done}/{len(jobs)}] {_short_job(record['job'])}: {record['status']} ({record['elapsed_s']:.2f}s)"
            log(msg if record["error"] is None else f"{msg} {record['error']}")

        try:
            with InterruptGuard():
                (runner or _run_here)(todo, job_fn, write)
        except KeyboardInterrupt as e:
            msg = f"interrupted: {n_done} of {len(jobs)} jobs done, saved in {path}; rerun the same command to resume"
            raise interrupted(msg, log) from e
    return [latest[j["job_id"]] for j in jobs if j["job_id"] in latest]


def _run_here(todo: list[dict], job_fn: Callable[[dict], dict], write: Callable[[dict], None]) -> None:
    """The default runner: every job in this process, one after another."""
    for job in todo:
        write(job_record(job, job_fn))


def job_record(job: dict, job_fn: Callable[[dict], dict]) -> dict:
    """The results record of one job: ``job_fn``'s dict, or the exception it raised in one line."""
    watch = Stopwatch()
    try:
        result = job_fn(dict(job, options=dict(job["options"])))
        if not isinstance(result, dict):
            raise TypeError(f"job function returned {type(result).__name__}, expected a dict")
        json.dumps(result, allow_nan=True, default=json_default)  # fail here, not mid-write
        status, error = "ok", None
    except Exception as e:  # noqa: BLE001 - recorded, the sweep goes on
        status, error, result = "error", f"{type(e).__name__}: {' '.join(str(e).split())}", None
    return error_record(job, error, watch.elapsed(), status=status, result=result)


def error_record(job: dict, error: str | None, elapsed_s: float, *, status: str = "error", result=None) -> dict:
    """A results record; by default that of a job that failed with ``error`` (one line)."""
    return {
        "job_id": job["job_id"],
        "job": {k: v for k, v in job.items() if k != "job_id"},
        "status": status,
        "result": result,
        "error": error,
        "elapsed_s": round(elapsed_s, 4),
        "finished_at": _now(),
    }
