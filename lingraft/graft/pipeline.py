"""Linearity Grafting (Chen et al., ICML 2022): choose unstable, insignificant ReLU neurons, replace them by
learnable linear functions a*x + b, and fine-tune.

The whole ``lingraft graft`` job is :func:`run_graft`: load -> score (:mod:`lingraft.graft.scores`) -> select
(:mod:`lingraft.graft.selection`) -> graft (:mod:`lingraft.graft.application`, masks in :mod:`lingraft.graft.masks`)
-> fine-tune (:mod:`lingraft.graft.finetune`) -> save -> certify before/after. The stages' public names are
re-exported here.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from lingraft.clock import Stopwatch
from lingraft.errors import UsageError
from lingraft.graft.application import INITS, apply_graft, graft_summary
from lingraft.graft.finetune import FinetuneConfig, finetune
from lingraft.graft.masks import check_masks_fit, load_masks, save_masks
from lingraft.graft.scores import NeuronScores, compute_scores, relu_modules
from lingraft.graft.selection import RULES, select_neurons
from lingraft.graft.settings import GraftSettings
from lingraft.signals import interrupted

__all__ = [
    "RULES",
    "INITS",
    "NeuronScores",
    "relu_modules",
    "compute_scores",
    "select_neurons",
    "apply_graft",
    "graft_summary",
    "FinetuneConfig",
    "finetune",
    "save_masks",
    "load_masks",
    "check_masks_fit",
    "GraftSettings",
    "run_graft",
    "CLEAN_DROP_WARN",
]

#: a clean-accuracy drop (test images of the before/after table) above this gets a warning with the usual fix
CLEAN_DROP_WARN = 0.03


@dataclasses.dataclass
class _GraftData:
    """The training split carved up: validation (last images), the pool before it, and the scoring images."""

    x_val: Tensor
    y_val: Tensor
    x_pool: Tensor
    y_pool: Tensor
    x_score: Tensor  # [score_images, *in_shape]
    y_score: Tensor


def _load_source(model_path, s: GraftSettings):
    """The checkpoint to graft and its dataset; UsageError for ONNX models or an unknown dataset."""
    from lingraft.io.loader import load_model

    lm = load_model(model_path, dataset=s.dataset)
    if lm.source != "checkpoint":
        raise UsageError(
            "graft needs a lingraft checkpoint (.pt) so the grafted model can be fine-tuned and saved; "
            "ONNX models can be certified but not grafted"
        )
    ds = s.dataset or lm.dataset
    if ds is None:
        raise UsageError("the checkpoint does not record its dataset; pass --dataset")
    return lm, ds


def _resolve_eps(lm, s: GraftSettings) -> tuple[float, float]:
    """(graft eps, fine-tuning eps): eps defaults to the checkpoint's training eps, train_eps to eps."""
    from lingraft.certify.pipeline import check_eps

    eps = s.eps
    if eps is None:
        cfg_meta = lm.meta.get("config", {}) if isinstance(lm.meta, dict) else {}
        eps = float(lm.meta.get("eps", cfg_meta.get("eps", 0.1)) or 0.1)
    eps = check_eps(eps)
    return eps, (eps if s.train_eps is None else check_eps(s.train_eps))


def _split_training_data(lm, ds: str, s: GraftSettings) -> _GraftData:
    """Validation = the last min(1000, N/5) training images; score images drawn from the rest with s.seed."""
    from lingraft.data.datasets import load_dataset

    x_tr, y_tr = load_dataset(ds, "train", s.data_dir)
    g = torch.Generator().manual_seed(s.seed)
    val_size = min(1000, x_tr.shape[0] // 5)
    x_pool, y_pool = x_tr[:-val_size], y_tr[:-val_size]
    pick = torch.randperm(x_pool.shape[0], generator=g)[: s.score_images]
    return _GraftData(
        x_tr[-val_size:], y_tr[-val_size:], x_pool, y_pool, x_pool[pick].reshape(-1, *lm.in_shape), y_pool[pick]
    )


@contextlib.contextmanager
def _phase(make_bar, total: int, desc: str, unit: str = "images") -> Iterator[Callable[[int], None] | None]:
    """A progress bar/reporter for one phase (``make_bar(total, desc, unit)``), yielding its update; None: none."""
    if make_bar is None:
        yield None
        return
    bar = make_bar(total, desc, unit)
    try:
        yield bar.update
    finally:
        bar.close()


def _score_and_select(model: nn.Module, lm, data: _GraftData, eps: float, s: GraftSettings, dev, log, bars=None):
    """(masks, scores) from a saved mask (scores None) or from scoring and the selection rule.
    With s.scores_only, writes the scores JSON and returns (None, scores)."""
    from lingraft.io.files import atomic_write_json

    if s.mask_path:
        masks = load_masks(s.mask_path)
        check_masks_fit(model, masks, lm.in_shape)
        log(f"loaded mask {s.mask_path}")
        return masks, None
    log(
        f"scoring {sum(1 for _ in relu_modules(model))} ReLU layers on {data.x_score.shape[0]} training images "
        f"({s.score_bound} bounds at eps {eps})"
    )
    with _phase(bars, data.x_score.shape[0], "scoring") as progress:
        scores = compute_scores(
            model,
            data.x_score,
            data.y_score,
            eps,
            in_shape=lm.in_shape,
            bound_method=s.score_bound,
            significance_input=s.significance_input,
            device=dev,
            progress=progress,
        )
    if s.scores_only:
        atomic_write_json(
            s.scores_only, {"format": "lingraft-graft-scores", "model": lm.path, "eps": eps, "scores": scores.to_dict()}
        )
        return None, scores
    masks = select_neurons(
        scores, s.ratio, rule=s.rule, scope=s.scope, gammas=s.gammas, significance=s.significance, seed=s.seed
    )
    return masks, scores


def _finetune_grafted(grafted: nn.Module, lm, data: _GraftData, train_eps: float, s: GraftSettings, log, bars=None):
    """(fine-tuned model, finetune info) on the first s.num_train pool images; unchanged when s.epochs is 0."""
    if s.epochs <= 0:
        return grafted, {"time_s": 0.0, "history": [], "best": None}
    xt, yt = data.x_pool[: s.num_train].reshape(-1, *lm.in_shape), data.y_pool[: s.num_train]
    fcfg = FinetuneConfig(
        epochs=s.epochs, batch_size=s.batch_size, lr=s.lr, lr_graft=s.lr_graft, eps=train_eps, seed=s.seed
    )
    desc = f"fine-tuning ({s.epochs} epoch(s) x {xt.shape[0]} images)"
    with _phase(bars, s.epochs * xt.shape[0], desc) as progress:
        return finetune(
            grafted, xt, yt, data.x_val.reshape(-1, *lm.in_shape), data.y_val, fcfg, log=log, progress=progress
        )


def _certify_before_after(
    model: nn.Module, grafted: nn.Module, lm, ds: str, eps: float, s: GraftSettings, dev, log, bars=None
) -> dict:
    """{"before": {method: report}, "after": {...}} on s.num_samples test images (empty when 0)."""
    from lingraft.certify.pipeline import certify
    from lingraft.data.datasets import load_dataset, subset

    evaluation = {"before": {}, "after": {}}
    if s.num_samples <= 0:
        return evaluation
    x_te, y_te = subset(*load_dataset(ds, "test", s.data_dir), s.num_samples)
    x_te = x_te.reshape(-1, *lm.in_shape)
    for tag, m in (("before", model), ("after", grafted)):
        for meth in s.methods:
            with _phase(bars, x_te.shape[0], f"certifying {tag} with {meth}") as progress:
                rep = certify(
                    m, x_te, y_te, eps, in_shape=lm.in_shape, method=meth, seed=s.seed, device=dev, progress=progress
                )
            d = rep.to_dict()
            d.pop("samples")
            evaluation[tag][meth] = d
            log(
                f"{tag:6s} {meth:11s} clean {rep.clean_acc:.3f} pgd {rep.pgd_acc:.3f} "
                f"certified {rep.certified_acc:.3f} ({rep.time_per_sample_s * 1000:.1f} ms/img)"
            )
    return evaluation


def _save_grafted(grafted: nn.Module, lm, ds: str, s: GraftSettings, meta: dict, log) -> None:
    from lingraft.io.checkpoint import save_checkpoint

    if s.out_path:
        save_checkpoint(s.out_path, grafted, arch=lm.arch, arch_kwargs=_arch_kwargs(lm), dataset=ds, meta=meta)
        log(f"wrote {s.out_path}")


def run_graft(
    model_path,
    settings: GraftSettings | None = None,
    *,
    device=None,
    log=print,
    command="",
    progress=None,
    **options,
) -> dict:
    """The whole ``lingraft graft`` job: load, score, select, graft, fine-tune, save, evaluate before/after.

    Pass a :class:`GraftSettings`, or its fields as keywords (``run_graft(path, ratio=0.5, eps=0.1,
    out_path="g.pt")``); keywords override fields of ``settings``. ``progress``: ``make_bar(total, desc, unit)``
    returning an object with update/close, one per phase (scoring, fine-tuning, each before/after certification).
    Returns the JSON-able result dict. An interrupt raises :class:`lingraft.signals.Interrupted` (graft keeps
    no resume state; its outputs are written atomically, so nothing half-written is left).
    """
    s = GraftSettings(**options) if settings is None else dataclasses.replace(settings, **options)
    try:
        return _run(model_path, s, device=device, log=log, command=command, bars=progress)
    except KeyboardInterrupt as e:
        msg = "interrupted: graft keeps no resume state; rerun the same command to start it again"
        raise interrupted(msg, log) from e


def _run(model_path, s: GraftSettings, *, device, log, command: str, bars) -> dict:
    """:func:`run_graft` with its settings resolved."""
    from lingraft.io.loader import check_input_matches_dataset

    torch.manual_seed(s.seed)
    lm, ds = _load_source(model_path, s)
    eps, train_eps = _resolve_eps(lm, s)
    dev = device or torch.device("cpu")
    check_input_matches_dataset(lm, ds)
    model = lm.model.to(dev).eval()
    data = _split_training_data(lm, ds, s)
    watch = Stopwatch()
    masks, scores = _score_and_select(model, lm, data, eps, s, dev, log, bars)
    if masks is None:
        return {"schema_version": 1, "command": "graft", "scores_only": s.scores_only, "model": lm.path}
    score_time = watch.elapsed()
    if s.save_mask:
        save_masks(s.save_mask, masks, {"model": lm.path, "ratio": s.ratio, "rule": s.rule, "eps": eps})
    grafted = apply_graft(model, masks, init=s.init, scores=scores)
    grafted, ft = _finetune_grafted(grafted, lm, data, train_eps, s, log, bars)
    summary = graft_summary(grafted)
    meta = {
        "graft": {
            "source": lm.path,
            "ratio": s.ratio,
            "rule": s.rule,
            "scope": s.scope,
            "gammas": list(s.gammas),
            "significance": s.significance,
            "init": s.init,
            "eps": eps,
            "train_eps": train_eps,
            "epochs": s.epochs,
            "num_train": s.num_train,
            "finetune": ft,
            "score_time_s": score_time,
        },
        "eps": eps,
        "command": command,
        "parent_meta": lm.meta,
    }
    _save_grafted(grafted, lm, ds, s, meta, log)
    evaluation = _certify_before_after(model, grafted, lm, ds, eps, s, dev, log, bars)
    warnings = _clean_drop_warning(evaluation)
    for w in warnings:
        log(f"warning: {w}")
    return {
        "schema_version": 1,
        "command": "graft",
        "model": lm.path,
        "out": s.out_path,
        "ratio": s.ratio,
        "rule": s.rule,
        "scope": s.scope,
        "eps": eps,
        "relu_neurons": sum(v["neurons"] for v in summary.values()),
        "grafted_neurons": sum(v["grafted"] for v in summary.values()),
        "layers": summary,
        "finetune": {"time_s": ft["time_s"], "best": ft["best"]},
        "evaluation": evaluation,
        "warnings": warnings,
    }


def _clean_drop_warning(evaluation: dict) -> list[str]:
    """One warning when grafting cost more than CLEAN_DROP_WARN clean accuracy (narrow MLPs under-fine-tuned:
    fc-8x200 at ratio 0.5 lost 7 points after 1 epoch on 10k images and 0.2 after 3 epochs on all 59k)."""
    before, after = evaluation.get("before") or {}, evaluation.get("after") or {}
    common = [m for m in before if m in after]
    if not common:
        return []
    cb, ca = before[common[0]]["clean_acc"], after[common[0]]["clean_acc"]
    if ca >= cb - CLEAN_DROP_WARN:
        return []
    return [
        f"clean accuracy fell from {100 * cb:.1f}% to {100 * ca:.1f}% after grafting; fine-tune longer "
        "(e.g. --epochs 3 --num-train 59000) or graft a smaller --ratio"
    ]


def _arch_kwargs(lm) -> dict:
    from lingraft.io.checkpoint import load_checkpoint

    _, ck = load_checkpoint(lm.path)
    return ck["arch_kwargs"]
