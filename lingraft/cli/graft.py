"""``lingraft graft``: score, graft, fine-tune, and show the before/after certification table."""

from __future__ import annotations

import math
import shlex
import sys

import click

from lingraft.cli.options import (
    EPS,
    check_input_file,
    common_options,
    emit_json,
    json_option,
    pick_device,
    table,
    versions,
)
from lingraft.cli.progress import progress_factory
from lingraft.config import config_option


@click.command(
    "graft",
    epilog="Examples:\n\n\b\n"
    "  lingraft graft models/mnist-cnn-b-fgsm.pt --ratio 0.5 --eps 0.06 --out grafted.pt\n"
    "  lingraft graft model.pt --eps 0.1 --scores-only scores.json\n"
    "  lingraft graft model.pt --mask mask.json --eps 0.1 --out grafted.pt --epochs 0",
)
@click.argument("model", required=False, type=click.Path())
@config_option()
@click.option(
    "--ratio",
    type=click.FloatRange(0, 1),
    default=0.5,
    show_default=True,
    help="Fraction of all ReLU neurons to graft.",
)
@click.option(
    "--eps",
    type=EPS,
    default=None,
    help="Graft/certification eps (default: the checkpoint's training eps).",
)
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default=None, help="Grafted checkpoint to write.")
@click.option(
    "--rule",
    type=click.Choice(["lg", "random", "magnitude", "instability"]),
    default="lg",
    show_default=True,
    help="lg: the paper's staged gamma*rank(instability) - rank(significance); others are baselines.",
)
@click.option("--scope", type=click.Choice(["global", "layer"]), default="global", show_default=True)
@click.option("--gammas", default="2,1.5,1,0", show_default=True, help="Stage weights of the lg rule.")
@click.option("--significance", type=click.Choice(["gradient", "magnitude"]), default="gradient", show_default=True)
@click.option("--significance-input", type=click.Choice(["clean", "fgsm"]), default="clean", show_default=True)
@click.option("--score-images", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--score-bound", type=click.Choice(["ibp", "crown"]), default="crown", show_default=True)
@click.option(
    "--init",
    type=click.Choice(["paper", "identity", "zero", "fit"]),
    default="paper",
    show_default=True,
    help="paper: a=0.4, b=0; fit: least-squares line of relu over the score images.",
)
@click.option(
    "--epochs", type=click.IntRange(min=0), default=1, show_default=True, help="Fine-tuning epochs (0: none)."
)
@click.option(
    "--num-train",
    type=click.IntRange(min=1),
    default=10000,
    show_default=True,
    help="Fine-tuning images (first N of the training split, validation held out).",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Weights' learning rate (SGD).")
@click.option("--lr-graft", type=float, default=0.01, show_default=True, help="Learning rate of grafted a, b.")
@click.option("--train-eps", type=EPS, default=None, help="Fine-tuning eps (default: --eps).")
@click.option("--scores-only", type=click.Path(dir_okay=False), default=None, help="Write the scores JSON and stop.")
@click.option("--mask", "mask_path", type=click.Path(dir_okay=False), default=None, help="Graft from a saved mask.")
@click.option("--save-mask", type=click.Path(dir_okay=False), default=None, help="Also write the chosen mask.")
@click.option(
    "-n",
    "--num-samples",
    type=click.IntRange(min=0),
    default=200,
    show_default=True,
    help="Test images for the before/after table (0: skip).",
)
@click.option("--methods", default="crown,alpha-crown", show_default=True, help="Bound methods of the table.")
@click.option("--dataset", default=None)
@click.option("--data-dir", type=click.Path(file_okay=False), default=None)
@json_option
@common_options
def command(
    model,
    config_path,
    ratio,
    eps,
    out_path,
    rule,
    scope,
    gammas,
    significance,
    significance_input,
    score_images,
    score_bound,
    init,
    epochs,
    num_train,
    batch_size,
    lr,
    lr_graft,
    train_eps,
    scores_only,
    mask_path,
    save_mask,
    num_samples,
    methods,
    dataset,
    data_dir,
    json_out,
    verbose,
    quiet,
    seed,
    no_progress,
    device,
):
    """Graft linearity into MODEL's least important unstable ReLU neurons and fine-tune (Linearity Grafting)."""
    from lingraft.errors import UsageError

    # cheap checks first: a wrong path fails at once, before torch is imported
    check_input_file(model, "model file", "{} is a directory; pass a .pt checkpoint or an .onnx file")
    check_input_file(mask_path, "mask file")
    from lingraft.graft.pipeline import GraftSettings, run_graft

    if scores_only is None and out_path is None:
        raise UsageError("pass --out FILE for the grafted checkpoint (or --scores-only FILE)")
    gam = _parse_gammas(gammas)
    for name, v in (("--lr", lr), ("--lr-graft", lr_graft)):
        if not math.isfinite(v) or v <= 0:
            raise UsageError(f"{name} must be a finite number > 0, got {v}")
    if math.isnan(ratio):
        raise UsageError("--ratio must be a number in [0, 1], got nan")
    if out_path and str(out_path).lower().endswith(".json"):
        raise UsageError(f"--out {out_path} would clash with the checkpoint's JSON sidecar; use a .pt file name")
    settings = GraftSettings(
        ratio=ratio,
        eps=eps,
        out_path=out_path,
        rule=rule,
        scope=scope,
        gammas=gam,
        significance=significance,
        significance_input=significance_input,
        score_images=score_images,
        score_bound=score_bound,
        init=init,
        epochs=epochs,
        num_train=num_train,
        batch_size=batch_size,
        lr=lr,
        lr_graft=lr_graft,
        train_eps=train_eps,
        scores_only=scores_only,
        mask_path=mask_path,
        save_mask=save_mask,
        num_samples=num_samples,
        methods=_parse_methods(methods),
        dataset=dataset,
        data_dir=data_dir,
        seed=seed,
    )
    log = (lambda s: None) if quiet else (lambda s: click.echo(s, err=True))
    res = run_graft(
        model,
        settings,
        device=pick_device(device),
        log=log,
        command="lingraft " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        progress=progress_factory(no_progress or quiet),
    )
    res["versions"] = versions()
    if json_out:
        emit_json(res, json_out)
    if quiet or json_out == "-":
        return
    if scores_only:
        click.echo(f"wrote scores to {scores_only}")
        return
    click.echo(render_graft_table(res))


def _parse_gammas(gammas: str) -> tuple[float, ...]:
    """'2,1.5,1,0' -> (2.0, 1.5, 1.0, 0.0); UsageError unless finite numbers."""
    from lingraft.errors import UsageError

    try:
        gam = tuple(float(g) for g in gammas.split(","))
    except ValueError:
        raise UsageError(f"--gammas must be comma-separated numbers, got {gammas!r}") from None
    if not gam or not all(math.isfinite(g) for g in gam):
        raise UsageError(f"--gammas must be finite numbers, got {gammas!r}")
    return gam


def _parse_methods(methods: str) -> list[str]:
    """'crown,alpha-crown' -> ['crown', 'alpha-crown']; UsageError for an unknown bound method."""
    from lingraft.bounds.methods import METHODS
    from lingraft.errors import UsageError

    meths = [m.strip() for m in methods.split(",") if m.strip()]
    for m in meths:
        if m not in METHODS:
            raise UsageError(f"unknown method {m!r} in --methods; use {', '.join(METHODS)}")
    return meths


def render_graft_table(res: dict) -> str:
    rows = []
    for tag in ("before", "after"):
        ev = res["evaluation"].get(tag)
        if not ev:
            continue
        for meth, rep in ev.items():
            unst = sum(rep["unstable_per_layer"].values())
            rows.append(
                [
                    tag,
                    meth,
                    f"{100 * rep['clean_acc']:.1f}%",
                    f"{100 * rep['pgd_acc']:.1f}%",
                    f"{100 * rep['certified_acc']:.1f}%",
                    f"{unst:.1f}",
                    f"{1000 * rep['time_per_sample_s']:.1f}",
                ]
            )
    lines = [
        f"grafted {res['grafted_neurons']}/{res['relu_neurons']} ReLU neurons "
        f"(ratio {res['ratio']}, rule {res['rule']}, eps {res['eps']}); wrote {res['out']}"
    ]
    if rows:
        lines.append(table(rows, ["model", "method", "clean", "PGD", "certified", "unstable/img", "ms/img"]))
        lay = []
        b = res["evaluation"]["before"]
        a = res["evaluation"]["after"]
        m0 = next(iter(b))
        for k in b[m0]["unstable_per_layer"]:
            lay.append(
                [
                    k,
                    a[m0]["neurons_per_layer"].get(k, {}).get("grafted", 0),
                    round(b[m0]["unstable_per_layer"][k], 1),
                    round(a[m0]["unstable_per_layer"].get(k, 0.0), 1),
                ]
            )
        lines.append("")
        lines.append(table(lay, ["relu layer", "grafted", "unstable before", "unstable after"]))
    return "\n".join(lines)
