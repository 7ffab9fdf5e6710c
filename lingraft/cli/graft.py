"""``lingraft graft``: score, graft, fine-tune, and show the before/after certification table."""

from __future__ import annotations

import math

import click

from lingraft.cli._shared import check_input_file, command_line, pick_device, table, versions
from lingraft.cli.options import EPS, common_options, data_options, examples, file_option, model_argument
from lingraft.cli.progress import progress_factory
from lingraft.config import config_option


@click.command(
    "graft",
    epilog=examples(
        "lingraft graft models/mnist-cnn-b-fgsm.pt --ratio 0.5 --eps 0.06 --out grafted.pt",
        "lingraft graft model.pt --eps 0.1 --scores-only scores.json",
        "lingraft graft model.pt --mask mask.json --eps 0.1 --out grafted.pt --epochs 0",
    ),
)
@model_argument
@config_option()
@click.option("--ratio", type=click.FloatRange(0, 1), default=0.5, help="Fraction of all ReLU neurons to graft.")
@click.option("--eps", type=EPS, default=None, help="Graft/certification eps (default: the checkpoint's training eps).")
@file_option("--out", "out_path", help="Grafted checkpoint to write.")
@click.option(
    "--rule",
    type=click.Choice(["lg", "random", "magnitude", "instability"]),
    default="lg",
    help="lg: the paper's staged gamma*rank(instability) - rank(significance); others are baselines.",
)
@click.option("--scope", type=click.Choice(["global", "layer"]), default="global")
@click.option("--gammas", default="2,1.5,1,0", help="Stage weights of the lg rule.")
@click.option("--significance", type=click.Choice(["gradient", "magnitude"]), default="gradient")
@click.option("--significance-input", type=click.Choice(["clean", "fgsm"]), default="clean")
@click.option("--score-images", type=click.IntRange(min=1), default=1000)
@click.option("--score-bound", type=click.Choice(["ibp", "crown"]), default="crown")
@click.option(
    "--init",
    type=click.Choice(["paper", "identity", "zero", "fit"]),
    default="paper",
    help="paper: a=0.4, b=0; fit: least-squares line of relu over the score images.",
)
@click.option("--epochs", type=click.IntRange(min=0), default=1, help="Fine-tuning epochs (0: none).")
@click.option(
    "--num-train",
    type=click.IntRange(min=1),
    default=10000,
    help="Fine-tuning images (first N of the training split, validation held out).",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=128)
@click.option("--lr", type=float, default=1e-3, help="Weights' learning rate (SGD).")
@click.option("--lr-graft", type=float, default=0.01, help="Learning rate of grafted a, b.")
@click.option("--train-eps", type=EPS, default=None, help="Fine-tuning eps (default: --eps).")
@file_option("--scores-only", help="Write the scores JSON and stop.")
@file_option("--mask", "mask_path", help="Graft from a saved mask.")
@file_option("--save-mask", help="Also write the chosen mask.")
@click.option(
    "-n",
    "--num-samples",
    type=click.IntRange(min=0),
    default=200,
    help="Test images for the before/after table (0: skip).",
)
@click.option("--methods", default="crown,alpha-crown", help="Bound methods of the table.")
@data_options()
@common_options
def command(model, config_path, common, **opts):
    """Graft linearity into MODEL's least important unstable ReLU neurons and fine-tune (Linearity Grafting)."""
    # cheap checks first: a wrong path or number fails at once, before torch is imported
    check_input_file(model, "model file", "{} is a directory; pass a .pt checkpoint or an .onnx file")
    check_input_file(opts["mask_path"], "mask file")
    settings = _settings(opts, common.seed)
    from lingraft.graft.pipeline import run_graft

    res = run_graft(
        model,
        settings,
        device=pick_device(common.device),
        log=common.log,
        command=command_line(),
        progress=progress_factory(common.bars_off),
    )
    res["versions"] = versions()
    common.emit(res)
    if common.show:
        click.echo(f"wrote scores to {settings.scores_only}" if settings.scores_only else render_graft_table(res))


def _settings(opts: dict, seed: int):
    """The GraftSettings of the command's options (their names are its fields); UsageError for a bad value."""
    from lingraft.errors import UsageError
    from lingraft.graft.settings import GraftSettings

    if opts["scores_only"] is None and opts["out_path"] is None:
        raise UsageError("pass --out FILE for the grafted checkpoint (or --scores-only FILE)")
    gammas = _parse_gammas(opts.pop("gammas"))
    for name, v in (("--lr", opts["lr"]), ("--lr-graft", opts["lr_graft"])):
        if not math.isfinite(v) or v <= 0:
            raise UsageError(f"{name} must be a finite number > 0, got {v}")
    if math.isnan(opts["ratio"]):
        raise UsageError("--ratio must be a number in [0, 1], got nan")
    out_path = opts["out_path"]
    if out_path and str(out_path).lower().endswith(".json"):
        raise UsageError(f"--out {out_path} would clash with the checkpoint's JSON sidecar; use a .pt file name")
    return GraftSettings(gammas=gammas, methods=_parse_methods(opts.pop("methods")), seed=seed, **opts)


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


def _parse_methods(methods: str) -> tuple[str, ...]:
    """'crown,alpha-crown' -> ('crown', 'alpha-crown'); UsageError for an unknown bound method."""
    from lingraft.bounds.methods import METHODS
    from lingraft.errors import UsageError

    meths = [m.strip() for m in methods.split(",") if m.strip()]
    for m in meths:
        if m not in METHODS:
            raise UsageError(f"unknown method {m!r} in --methods; use {', '.join(METHODS)}")
    return tuple(meths)


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
