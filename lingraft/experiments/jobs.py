"""Job functions of ``lingraft run``: one sweep grid point (model, method, ratio, eps) -> one JSON-able result.

ratio 0 certifies the model itself. ratio > 0 grafts it first (:func:`lingraft.graft.pipeline.run_graft`, no
before/after table) into a checkpoint in a work folder next to the results file, then certifies the grafted model. The
grafted checkpoint is named by a hash of everything that determines it (model file contents, ratio, eps, graft
options), so a rerun, another bound method, or a resumed sweep reuses it instead of grafting again; it is written
atomically, so an interrupted graft leaves nothing that could be reused by mistake.

Per-job settings come from the sweep file's ``options:`` mapping (see :data:`RUN_OPTIONS` for names and defaults).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lingraft.bounds.methods import METHODS
from lingraft.config import config_hash, parse_eps
from lingraft.env import versions
from lingraft.errors import LingraftError, UsageError
from lingraft.io.files import file_sha256

__all__ = [
    "SCHEMA_VERSION",
    "METHODS",
    "RUN_OPTIONS",
    "resolve_options",
    "work_dir_for",
    "resolve_model_entry",
    "JobRunner",
]

SCHEMA_VERSION = 1

#: Options a sweep file may set under ``options:`` (dashes or underscores), with their defaults.
RUN_OPTIONS: dict[str, Any] = {
    # certification
    "dataset": None,  # default: the model's dataset
    "data_dir": None,  # relative paths resolve against the sweep file's folder
    "num_samples": 100,
    "offset": 0,
    "batch_size": 32,
    "norm": "inf",
    "pgd_steps": 20,
    "pgd_restarts": 1,
    "alpha_iterations": 20,
    "timeout": None,  # seconds per job (samples not reached are 'timeout')
    "bab_timeout": 0.0,  # seconds of branch and bound per sample the bounds leave unknown (0 = off)
    "seed": 0,
    "keep_samples": True,  # store per-sample status/margin/time in each result line
    # grafting (jobs with ratio > 0)
    "epochs": 1,
    "num_train": 10000,
    "score_images": 1000,
    "score_bound": "crown",
    "rule": "lg",
    "scope": "global",
    "gammas": [2.0, 1.5, 1.0, 0.0],
    "significance": "gradient",
    "significance_input": "clean",
    "init": "paper",
    "lr": 1e-3,
    "lr_graft": 0.01,
    "train_eps": None,
    "graft_batch_size": 128,
}

_CHOICES = {
    "norm": ("inf", "2"),
    "score_bound": ("ibp", "crown"),
    "rule": ("lg", "random", "magnitude", "instability"),
    "scope": ("global", "layer"),
    "significance": ("gradient", "magnitude"),
    "significance_input": ("clean", "fgsm"),
    "init": ("paper", "identity", "zero", "fit"),
}
# The settings of a job's two steps, filled in from the options: {settings field: option name}. The grafting
# options are exactly those that change the grafted checkpoint (all others only change certification).
_GRAFT_SETTINGS = {
    **{
        k: k
        for k in (
            "dataset",
            "data_dir",
            "epochs",
            "num_train",
            "score_images",
            "score_bound",
            "rule",
            "scope",
            "gammas",
            "significance",
            "significance_input",
            "init",
            "lr",
            "lr_graft",
            "train_eps",
            "seed",
        )
    },
    "batch_size": "graft_batch_size",  # the option batch_size is certification's
}
_CERTIFY_SETTINGS = {
    k: k
    for k in ("norm", "batch_size", "pgd_steps", "pgd_restarts", "seed", "timeout", "alpha_iterations", "bab_timeout")
}
_INT_MIN = {
    "num_samples": 1,
    "offset": 0,
    "batch_size": 1,
    "pgd_steps": 0,
    "pgd_restarts": 1,
    "alpha_iterations": 0,
    "epochs": 0,
    "num_train": 1,
    "score_images": 1,
    "graft_batch_size": 1,
}


def _settings_from(options: dict, fields: dict[str, str]) -> dict:
    """Keyword arguments {settings field: option value} for ``fields`` ({settings field: option name}); lists
    become tuples, as the settings' sequence fields (gammas) are."""
    return {f: tuple(v) if isinstance(v := options[k], list) else v for f, k in fields.items()}


def _bad(name: str, value: Any, want: str, where: str) -> UsageError:
    return UsageError(f"option '{name.replace('_', '-')}' in {where} is {value!r}; {want}")


def _finite(name: str, v: Any, where: str, *, lo: float, hi: float | None = None, open_lo: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _bad(name, v, "give a finite number", where)
    v = float(v)
    if v < lo or (open_lo and v == lo) or (hi is not None and v > hi):
        rng = f"{'>' if open_lo else '>='} {lo:g}" + (f" and <= {hi:g}" if hi is not None else "")
        raise _bad(name, v, f"it must be {rng}", where)
    return v


def resolve_options(raw: dict | None, where: str = "the sweep file", base_dir: str | None = None) -> dict:
    """Defaults filled in and every value type/range checked (UsageError naming the option otherwise).

    ``raw``: the sweep's normalized ``options`` mapping (unknown keys were rejected when it was loaded).
    Returns a new dict with every key of :data:`RUN_OPTIONS`; ``data_dir`` resolved against ``base_dir``.
    """
    opts = dict(RUN_OPTIONS)
    opts["gammas"] = list(RUN_OPTIONS["gammas"])
    for k, v in (raw or {}).items():
        if k not in RUN_OPTIONS:
            raise UsageError(f"unknown option '{k}' in {where}; allowed: {', '.join(sorted(RUN_OPTIONS))}")
        opts[k] = v
    for k, lo in _INT_MIN.items():
        v = opts[k]
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise _bad(k, v, f"give a whole number >= {lo}", where)
    if isinstance(opts["seed"], bool) or not isinstance(opts["seed"], int):
        raise _bad("seed", opts["seed"], "give a whole number", where)
    if opts["norm"] in (2, "l2", "L2"):
        opts["norm"] = "2"
    if opts["norm"] in ("linf", "Linf", "LINF"):
        opts["norm"] = "inf"
    for k, choices in _CHOICES.items():
        if opts[k] not in choices:
            raise _bad(k, opts[k], f"use one of: {', '.join(choices)}", where)
    for k in ("lr", "lr_graft"):
        opts[k] = _finite(k, opts[k], where, lo=0.0, open_lo=True)
    if opts["timeout"] is not None:
        opts["timeout"] = _finite("timeout", opts["timeout"], where, lo=0.0, open_lo=True)
    opts["bab_timeout"] = _finite("bab_timeout", opts["bab_timeout"], where, lo=0.0)
    if opts["bab_timeout"] > 0 and opts["norm"] != "inf":
        raise _bad("bab_timeout", opts["bab_timeout"], "branch and bound works with norm inf only", where)
    if opts["train_eps"] is not None:
        opts["train_eps"] = parse_eps(opts["train_eps"], f"option 'train-eps' in {where}")
    g = opts["gammas"]
    if not isinstance(g, list) or not g:
        raise _bad("gammas", g, "give a non-empty list of numbers like [2, 1.5, 1, 0]", where)
    opts["gammas"] = [_finite("gammas", v, where, lo=-math.inf) for v in g]
    if not isinstance(opts["keep_samples"], bool):
        raise _bad("keep_samples", opts["keep_samples"], "give true or false", where)
    if opts["dataset"] is not None:
        from lingraft.data.datasets import dataset_info

        if not isinstance(opts["dataset"], str):
            raise _bad("dataset", opts["dataset"], "give mnist, cifar10 or digits", where)
        dataset_info(opts["dataset"])  # did-you-mean on a typo
        opts["dataset"] = opts["dataset"].lower()
    if opts["data_dir"] is not None:
        if not isinstance(opts["data_dir"], str) or not opts["data_dir"].strip():
            raise _bad("data_dir", opts["data_dir"], "give a folder path", where)
        d = Path(os.path.expanduser(opts["data_dir"]))
        if not d.is_absolute() and base_dir is not None:
            d = Path(base_dir) / d
        opts["data_dir"] = str(d)
    return opts


def work_dir_for(results_path: str | os.PathLike) -> Path:
    """The folder for grafted checkpoints of a results file: ``results.jsonl`` -> ``results.work/``."""
    p = Path(results_path)
    return p.with_name(p.stem + ".work")


def resolve_model_entry(model: str, where: str = "the sweep file") -> str:
    """A sweep ``models`` entry -> a model file path.

    Paths are returned unchanged (they were resolved against the sweep file's folder). A bare name is looked up
    among the shipped models (``models/NAME``, ``NAME.pt``, ``NAME.onnx``; ``default`` is the shipped default);
    a zoo architecture name has no weights, so it is refused with a hint.
    """
    from lingraft.experiments.sweep import _looks_like_path
    from lingraft.io.loader import default_model_path, models_dir

    if _looks_like_path(model):
        return model
    if model == "default":
        return str(default_model_path())
    for cand in (models_dir() / model, models_dir() / f"{model}.pt", models_dir() / f"{model}.onnx"):
        if cand.is_file():
            return str(cand)
    from lingraft.models import list_models

    what = "an architecture name without weights" if model in list_models() else "not a file or shipped model"
    raise UsageError(
        f"model '{model}' in {where} is {what}; give a checkpoint path like ckpt/model.pt "
        "(train one with 'lingraft train'), an .onnx file, or 'default'"
    )


@dataclass
class _ModelFacts:
    path: str
    source: str  # "checkpoint" or "onnx"
    dataset: str
    in_shape: tuple
    sha256: str


class JobRunner:
    """Callable job function for :func:`lingraft.experiments.sweep.run_sweep`: ``runner(job) -> result dict``.

    ``options``: output of :func:`resolve_options`. ``work_dir``: folder for grafted checkpoints. ``device``: a
    torch device. The last loaded network is cached (jobs come model-major), as is each model's file hash.
    """

    def __init__(
        self,
        options: dict,
        *,
        work_dir: str | os.PathLike,
        device: Any = None,
        where: str = "the sweep file",
        log: Callable[[str], Any] = lambda s: None,
    ):
        self.options = options
        self.work_dir = Path(work_dir)
        self.device = device
        self.where = where
        self.log = log
        self._facts: dict[str, _ModelFacts] = {}
        self._cache: tuple[str, Any] | None = None

    # ------------------------------------------------------------------------------------------ preflight
    def preflight(self, jobs: list[dict]) -> None:
        """Check every model, dataset, eps and ratio before any job runs, so bad input fails fast with one line
        (LingraftError/UsageError prefixed with the sweep file) instead of a results file full of errors."""
        from lingraft.data.datasets import dataset_info, load_dataset

        o = self.options
        checked_data: set = set()
        for job in jobs:
            try:
                parse_eps(job["eps"])
            except UsageError as e:
                raise UsageError(f"{self.where}: {e}") from None
            facts = self.facts(job["model"])
            if job["ratio"] > 0 and facts.source != "checkpoint":
                raise UsageError(
                    f"{self.where}: model {facts.path} is ONNX and cannot be grafted (ratio "
                    f"{job['ratio']:g}); use a lingraft .pt checkpoint or only ratio 0"
                )
            key = (facts.dataset, o["data_dir"])
            if key in checked_data:
                continue
            checked_data.add(key)
            try:
                x, _ = load_dataset(facts.dataset, "test", o["data_dir"])
            except LingraftError as e:
                raise type(e)(f"{self.where}: {e}", e.exit_code) from None
            if o["offset"] + o["num_samples"] > x.shape[0]:
                raise UsageError(
                    f"{self.where}: options ask for {o['num_samples']} test images from offset "
                    f"{o['offset']} but {facts.dataset} has {x.shape[0]}; lower num-samples"
                )
            info = dataset_info(facts.dataset)
            if math.prod(info.in_shape) != math.prod(facts.in_shape):
                raise UsageError(
                    f"{self.where}: model {facts.path} takes {facts.in_shape} inputs but dataset "
                    f"{facts.dataset} has {info.in_shape}; fix 'dataset' in options"
                )

    def facts(self, model: str) -> _ModelFacts:
        """Load ``model`` once (errors prefixed with the sweep file) and remember what jobs need to know."""
        if model in self._facts:
            return self._facts[model]
        lm = self._load(model)
        ds = self.options["dataset"] or lm.dataset
        if ds is None:
            raise UsageError(
                f"{self.where}: model {model} does not record its dataset; add "
                "'dataset: mnist' (or cifar10, digits) under options"
            )
        f = _ModelFacts(lm.path, lm.source, str(ds).lower(), tuple(lm.in_shape), file_sha256(lm.path))
        self._facts[model] = f
        return f

    def _load(self, path: str):
        from lingraft.io.loader import load_model

        if self._cache is not None and self._cache[0] == path:
            return self._cache[1]
        try:
            lm = load_model(path, dataset=self.options["dataset"])
        except LingraftError as e:
            raise type(e)(f"{self.where}: {e}", e.exit_code) from None
        self._cache = (path, lm)
        return lm

    # ------------------------------------------------------------------------------------------------ jobs
    def graft_path(self, job: dict) -> Path:
        """Where the grafted checkpoint of ``job`` lives (same for every bound method)."""
        f = self.facts(job["model"])
        key = {
            "model_sha256": f.sha256,
            "ratio": float(job["ratio"]),
            "eps": float(job["eps"]),
            **{k: self.options[k] for k in _GRAFT_SETTINGS.values()},
        }
        return self.work_dir / f"{Path(f.path).stem}-r{job['ratio']:g}-e{job['eps']:.6g}-{config_hash(key)[:10]}.pt"

    def graft_settings(self, job: dict, out: Path):
        """The :class:`~lingraft.graft.settings.GraftSettings` of ``job``: its ratio and eps, the sweep's graft
        options, no before/after table."""
        from lingraft.graft.settings import GraftSettings

        return GraftSettings(
            ratio=job["ratio"],
            eps=job["eps"],
            out_path=str(out),
            num_samples=0,
            **_settings_from(self.options, _GRAFT_SETTINGS),
        )

    def _graft(self, job: dict) -> tuple[str, dict]:
        from lingraft.graft.pipeline import run_graft

        out = self.graft_path(job)
        info = {"checkpoint": str(out), "graft_time_s": 0.0}
        if not out.is_file():
            self.log(f"grafting {Path(job['model']).name} at ratio {job['ratio']:g}, eps {job['eps']:g} -> {out}")
            self.work_dir.mkdir(parents=True, exist_ok=True)
            res = run_graft(
                job["model"], self.graft_settings(job, out), device=self.device, log=self.log, command="lingraft run"
            )
            info["graft_time_s"] = res["finetune"]["time_s"]
        return str(out), info

    def config_of(self, job: dict) -> dict:
        """The resolved configuration of one job (what its result depends on)."""
        f = self.facts(job["model"])
        return {
            "model": f.path,
            "model_sha256": f.sha256,
            "dataset": f.dataset,
            "method": job["method"],
            "eps": float(job["eps"]),
            "ratio": float(job["ratio"]),
            "options": dict(self.options),
        }

    def __call__(self, job: dict) -> dict:
        import torch

        from lingraft.certify.pipeline import certify
        from lingraft.data.datasets import load_dataset, subset
        from lingraft.graft.pipeline import graft_summary

        o = self.options
        facts = self.facts(job["model"])
        graft = None
        target = job["model"]
        if job["ratio"] > 0:
            target, graft = self._graft(job)
        lm = self._load(target)
        x, y = load_dataset(facts.dataset, "test", o["data_dir"])
        x, y = subset(x, y, o["num_samples"], o["offset"])
        x = x.reshape(x.shape[0], *lm.in_shape)
        dev = self.device if self.device is not None else torch.device("cpu")
        torch.manual_seed(o["seed"])
        rep = certify(
            lm.model.to(dev),
            x,
            y,
            job["eps"],
            in_shape=lm.in_shape,
            method=job["method"],
            indices=range(o["offset"], o["offset"] + x.shape[0]),
            device=dev,
            **_settings_from(o, _CERTIFY_SETTINGS),
        )
        d = rep.to_dict()
        if not o["keep_samples"]:
            d.pop("samples")
        if graft is not None:
            summary = graft_summary(lm.model)
            graft["relu_neurons"] = sum(v["neurons"] or 0 for v in summary.values())
            graft["grafted_neurons"] = sum(v["grafted"] for v in summary.values())
        cfg = self.config_of(job)
        return {
            "schema_version": SCHEMA_VERSION,
            "command": "run",
            "config": cfg,
            "config_hash": config_hash(cfg),
            "seed": o["seed"],
            "versions": versions(),
            "device": str(dev),
            "model": facts.path,
            "certified_model": lm.path,
            "dataset": facts.dataset,
            "ratio": float(job["ratio"]),
            **d,
            "graft": graft,
        }
