"""``lingraft certify``: clean accuracy, PGD accuracy and certified accuracy of a model."""

from __future__ import annotations

import math
from pathlib import Path

import click

from lingraft.bounds.methods import METHODS
from lingraft.cli._shared import check_input_file, emit_json, gate_fail, pick_device, progress_bar, table
from lingraft.cli.options import (
    EPS,
    common_options,
    csv_option,
    data_options,
    examples,
    file_option,
    model_argument,
    ray_options,
)
from lingraft.config import config_option
from lingraft.errors import UsageError


@click.command(
    "certify",
    epilog=examples(
        "lingraft certify",
        "lingraft certify grafted.pt --eps 0.1 --method alpha-crown -n 500 --json result.json",
        "lingraft certify model.onnx --dataset mnist --eps 0.02 --min-certified-acc 0.8",
        "lingraft certify big.pt -n 10000 --bab-timeout 30 --state run.state --json result.json",
    ),
)
@model_argument
@config_option()
@click.option(
    "--eps",
    type=EPS,
    default=None,
    help="L-inf (or L2) radius in [0,1] pixel space, a number or a fraction like 2/255. "
    "Default: the checkpoint's certify_eps, else its training eps, else 0.1.",
)
@click.option("--norm", type=click.Choice(["inf", "2"]), default="inf")
@click.option("--method", type=click.Choice(METHODS), default="crown")
@click.option(
    "-n", "--num-samples", type=click.IntRange(min=1), default=1000, help="First N test images (official order)."
)
@click.option("--offset", type=click.IntRange(min=0), default=0)
@click.option("--alpha-iterations", type=click.IntRange(min=0), default=20, help="Optimisation steps of alpha-crown.")
@click.option(
    "--alpha-scope",
    type=click.Choice(["all", "final"]),
    default="all",
    help="alpha-crown optimises a slope per neuron for every intermediate bound too (all) or for the "
    "specification only (final: faster, looser).",
)
@data_options()
@click.option("--batch-size", type=click.IntRange(min=1), default=32)
@click.option("--pgd-steps", type=click.IntRange(min=0), default=20)
@click.option("--pgd-restarts", type=click.IntRange(min=1), default=1)
@click.option("--timeout", type=click.FloatRange(min=0), default=None, help="Wall-clock budget (s) for the run.")
@click.option(
    "--bab-timeout",
    type=click.FloatRange(min=0),
    default=0.0,
    help="Seconds of branch and bound (as in 'lingraft verify') per sample the bounds leave unknown, "
    "to decide it; 0 = off. L-inf only.",
)
@click.option(
    "--min-certified-acc",
    type=click.FloatRange(0, 1),
    default=None,
    help="Gate: exit 3 when certified accuracy is below this.",
)
@click.option(
    "--min-clean-acc", type=click.FloatRange(0, 1), default=None, help="Gate: exit 3 when clean accuracy is below."
)
@file_option("--baseline", help="Gate: a stored certify JSON result to compare against (with --max-drop).")
@click.option(
    "--max-drop", type=click.FloatRange(0, 1), default=0.0, help="Allowed drop in certified accuracy vs --baseline."
)
@file_option(
    "--state",
    help="Resume file: finished batches are appended to it, and a rerun with the same settings skips "
    "them (an interrupted run loses at most one batch).",
)
@csv_option("Per-sample results as CSV.")
@ray_options
@common_options
def command(
    model,
    config_path,
    eps,
    norm,
    method,
    num_samples,
    offset,
    alpha_iterations,
    alpha_scope,
    dataset,
    data_dir,
    batch_size,
    pgd_steps,
    pgd_restarts,
    timeout,
    bab_timeout,
    min_certified_acc,
    min_clean_acc,
    baseline,
    max_drop,
    state,
    csv_out,
    ray,
    common,
):
    """Certify MODEL (.pt checkpoint or .onnx; default: the shipped MNIST CNN-B) on test images.

    Each image is first checked clean, then attacked with PGD (a found adversarial example means the image is
    never counted as certified), then bounded with IBP, CROWN or alpha-CROWN. With --bab-timeout, the images
    still unknown go to branch and bound, which proves them (verified) or finds a counterexample (falsified).
    """
    # cheap checks first: a wrong path or number fails at once, before torch is imported
    check_input_file(model, "model file", "{} is a directory; pass a .pt checkpoint or an .onnx file")
    check_input_file(baseline, "baseline file")
    for flag, v in (("--timeout", timeout), ("--bab-timeout", bab_timeout)):
        if v is not None and not math.isfinite(v):
            raise UsageError(f"{flag} must be a finite number of seconds, got {v}")
    import torch

    from lingraft.certify.pipeline import CertifySettings
    from lingraft.certify.result import certify_config, certify_result, load_certified_acc
    from lingraft.env import versions

    torch.manual_seed(common.seed)
    dev = pick_device(common.device)
    base = load_certified_acc(baseline) if baseline else None
    lm, ds, eps, x, y = _load_inputs(model, dataset, eps, data_dir, num_samples, offset)
    model_ = lm.model.to(dev)
    shared = dict(
        method=method,
        norm=norm,
        batch_size=batch_size,
        pgd_steps=pgd_steps,
        pgd_restarts=pgd_restarts,
        seed=common.seed,
        timeout=timeout,
        bab_timeout=bab_timeout,
        alpha_iterations=alpha_iterations,
        alpha_scope=alpha_scope,
    )
    cfg = certify_config(model=lm.path, dataset=ds, eps=eps, num_samples=num_samples, offset=offset, **shared)
    settings = CertifySettings(**shared)
    kw = dict(
        in_shape=lm.in_shape,
        indices=range(offset, offset + x.shape[0]),
        device=dev,
        bab_progress=_bab_logger(common.verbose and not common.quiet),
    )
    log = None if common.quiet else common.log
    state_hash = _state_hash(lm, cfg, data_dir) if state else None
    with progress_bar(x.shape[0], "certify", common.bars_off) as bar:
        rep = _certify_samples(model_, x, y, eps, settings, kw, state, state_hash, bar, log, ray)
    _emit(rep, certify_result(rep, cfg, versions(), str(dev)), lm.path, ds, common, csv_out)
    _gates(rep, min_certified_acc, min_clean_acc, base, max_drop)


def _decided_by(s: dict) -> str:
    """Which step settled a sample: the clean check, PGD, the bounds, or branch and bound (and its outcome)."""
    if s.get("bab"):
        return f"branch and bound ({s['bab']})"
    return {"misclassified": "clean check", "falsified": "PGD", "verified": "bounds", "unknown": "-"}.get(
        s["status"], "-"
    )


def _state_hash(lm, cfg, data_dir) -> str:
    """What a --state file is tied to: the settings, the model file's contents and the data folder."""
    from lingraft.certify.result import resume_settings
    from lingraft.config import config_hash
    from lingraft.io.files import file_sha256

    model_sha = file_sha256(lm.path) if Path(lm.path).is_file() else None
    return config_hash(resume_settings(cfg, model_sha, data_dir))


def _emit(rep, result, model_path, ds, common, csv_out) -> None:
    """The table on stdout (unless -q or --json -), the JSON result and the CSV."""
    if common.show:
        click.echo(render_report(rep, model_path, ds, common.verbose))
    emit_json(result, common.json_out)
    if csv_out:
        _write_csv(csv_out, rep.samples)


def _certify_samples(model_, x, y, eps, settings, kw, state, state_hash, bar, log, ray):
    """Certify locally, resumably (--state) or on Ray (ray: a RayArgs)."""
    if ray is not None:
        from lingraft.distributed.certify_ray import certify_on_ray

        with ray.session():
            return certify_on_ray(
                model_,
                x,
                y,
                eps,
                settings,
                state_path=state,
                settings_hash=state_hash,
                worker_cpus=ray.worker_cpus,
                worker_gpus=ray.worker_gpus,
                progress=bar.update,
                log=log,
                **kw,
            )
    if state:
        from lingraft.certify.state import certify_resumable

        return certify_resumable(
            model_,
            x,
            y,
            eps,
            state_path=state,
            settings_hash=state_hash,
            progress=bar.update,
            log=log,
            **vars(settings),
            **kw,
        )
    from lingraft.certify.pipeline import certify

    return certify(model_, x, y, eps, settings, progress=bar.update, **kw)


def _load_inputs(model, dataset, eps, data_dir, num_samples, offset):
    """The model, its dataset name, the eps to certify at and the test images (reshaped to the model's input)."""
    import torch

    from lingraft.certify.pipeline import check_eps, default_eps
    from lingraft.data.datasets import dataset_info, load_dataset, subset
    from lingraft.io.loader import load_model

    lm = load_model(model, dataset=dataset)
    ds = dataset or lm.dataset
    if ds is None:
        raise UsageError("the model does not record its dataset; pass --dataset (mnist, cifar10, digits)")
    dataset_info(ds)  # an unknown dataset name is reported before a bad eps
    eps = check_eps(default_eps(lm.meta) if eps is None else eps)
    x, y = load_dataset(ds, "test", data_dir)
    if offset >= x.shape[0]:
        raise UsageError(f"--offset {offset} is past the end of the {ds} test set ({x.shape[0]} images)")
    x, y = subset(x, y, num_samples, offset)
    if int(torch.tensor(lm.in_shape).prod()) != int(torch.tensor(x.shape[1:]).prod()):
        raise UsageError(f"model input {lm.in_shape} does not match dataset {ds} images {tuple(x.shape[1:])}")
    return lm, ds, eps, x.reshape(x.shape[0], *lm.in_shape), y


def render_report(rep, model_path, ds, verbose=0) -> str:
    lines = [
        f"model {model_path}  dataset {ds}  eps {rep.eps:g} (L{rep.norm})  method {rep.method}  "
        f"samples {rep.num_samples}"
    ]
    rows = [
        ["clean accuracy", f"{100 * rep.clean_acc:.1f}%"],
        ["PGD accuracy", f"{100 * rep.pgd_acc:.1f}%"],
        ["certified accuracy", f"{100 * rep.certified_acc:.1f}%"],
        ["time per bounded sample", f"{rep.time_per_sample_s * 1000:.1f} ms"],
        ["total time", f"{rep.total_time_s:.1f} s"],
    ]
    lines.append(table(rows, ["metric", "value"]))
    lines.append("")
    urows = [
        [k, v["neurons"], v["grafted"], round(rep.unstable_per_layer.get(k, 0.0), 1)]
        for k, v in rep.neurons_per_layer.items()
    ]
    if urows:
        lines.append(table(urows, ["relu layer", "neurons", "grafted", "unstable/img"]))
        lines.append("")
    lines.append("status counts: " + ", ".join(f"{k} {v}" for k, v in rep.counts.items()))
    if rep.bab is not None:
        b = rep.bab
        lines.append(
            f"branch and bound ({b['timeout_per_sample_s']:g} s per sample) on {b['attempted']} unknown: "
            f"verified {b['verified']}, falsified {b['falsified']}, undecided {b['undecided']} "
            f"({b['time_s']:.1f} s)"
        )
    if verbose:
        lines.append(
            table(
                [
                    [
                        s["index"],
                        s["label"],
                        s["prediction"],
                        s["status"],
                        "" if s["margin_lower"] is None else f"{s['margin_lower']:.4f}",
                        _decided_by(s),
                        f"{s['time_s']:.3f}",
                    ]
                    for s in rep.samples
                ],
                ["index", "label", "pred", "status", "margin lb", "decided by", "time s"],
            )
        )
    return "\n".join(lines)


def _bab_logger(on: bool):
    if not on:
        return None

    def log(index, out):
        click.echo(
            f"bab sample {index}: {out['bab']} -> {out['status']} ({out['time_s']:.1f} s, {out['branches']} domains)",
            err=True,
        )

    return log


def _gates(rep, min_cert, min_clean, base, max_drop):
    """Every failed gate, one line each, then exit 3 (nothing when all pass)."""
    failed = []
    if min_clean is not None and rep.clean_acc < min_clean:
        failed.append(f"clean accuracy {rep.clean_acc:.4f} < --min-clean-acc {min_clean}")
    if min_cert is not None and rep.certified_acc < min_cert:
        failed.append(f"certified accuracy {rep.certified_acc:.4f} < --min-certified-acc {min_cert}")
    if base is not None and rep.certified_acc < base - max_drop - 1e-12:
        failed.append(
            f"certified accuracy {rep.certified_acc:.4f} dropped more than {max_drop} below the baseline {base:.4f}"
        )
    gate_fail(*failed)


def _write_csv(path, samples):
    import csv
    import io

    from lingraft.io.files import atomic_write_text

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["index", "label", "prediction", "status", "margin_lower", "time_s", "bab"])
    w.writeheader()
    for s in samples:
        w.writerow(s)
    atomic_write_text(path, buf.getvalue())
