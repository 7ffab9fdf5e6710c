"""``lingraft train``: train a registry model (CE, FGSM+GradAlign or PGD; baseline losses)."""

from __future__ import annotations

import click

from lingraft.cli._shared import check_input_file, command_line, versions
from lingraft.cli.options import EPS, common_options, data_options, examples, file_option
from lingraft.cli.progress import progress_factory
from lingraft.config import config_option


@click.command(
    "train",
    epilog=examples(
        "lingraft train --arch cnn-b --dataset mnist --method fgsm --eps 0.1 --optimizer adam --lr 1e-3 --epochs 3 "
        "--out my.pt",
        "lingraft train --arch cnn-b --loss nkd --teacher teacher.pt --out nkd.pt",
    ),
)
@config_option()
@click.option("--arch", required=True, help="Registry model name (see 'lingraft inspect --list-models').")
@data_options(dataset_default="mnist")
@file_option("--out", "out_path", required=True, help="Checkpoint to write (.pt).")
@click.option("--epochs", type=click.IntRange(min=1), default=5)
@click.option("--batch-size", type=click.IntRange(min=1), default=128)
@click.option("--optimizer", type=click.Choice(["sgd", "adam"]), default="sgd")
@click.option("--lr", type=float, default=None, help="Default 0.1 (sgd) / 1e-3 (adam).")
@click.option("--weight-decay", type=float, default=5e-4)
@click.option("--schedule", type=click.Choice(["cosine", "step", "none"]), default="cosine")
@click.option(
    "--method",
    type=click.Choice(["ce", "fgsm", "pgd"]),
    default="ce",
    help="ce: clean; fgsm: FGSM + GradAlign (LG recipe); pgd: PGD adversarial training.",
)
@click.option("--eps", type=EPS, default=0.1, help="Training radius (pixel space).")
@click.option("--grad-align", type=click.FloatRange(min=0), default=0.2)
@click.option("--fgsm-step", type=click.FloatRange(min=0), default=1.25, help="FGSM step / eps.")
@click.option("--pgd-steps", type=click.IntRange(min=1), default=10)
@click.option("--loss", default="ce", help="ce, ls, kd, nkd, uskd, zipf.")
@file_option("--teacher", help="Teacher checkpoint (kd, nkd).")
@click.option("--num-train", type=click.IntRange(min=1), default=None, help="Use only the first N training images.")
@click.option("--val-size", type=click.IntRange(min=1), default=1000)
@click.option("--no-resume", is_flag=True, help="Start over even if a resume state exists.")
@common_options
def command(config_path, out_path, no_resume, common, **opts):
    """Train a registry model and write a checkpoint (+ JSON sidecar) atomically; an interrupted run resumes.

    The resume state OUT.state is kept after a finished run: a rerun with more --epochs continues from it, a rerun
    of the same command does nothing. OUT does not need it; delete it when done."""
    check_input_file(opts["teacher"], "teacher checkpoint")  # before torch is imported: a wrong path fails at once
    from lingraft.train.loop import TrainConfig, train

    cfg = TrainConfig(seed=common.seed, device=common.device, **opts)  # the other options are its fields
    metrics = train(
        cfg,
        out_path,
        progress=progress_factory(common.bars_off),
        log=common.log,
        resume=not no_resume,
        meta={"command": command_line()},
    )
    common.emit({"schema_version": 1, "command": "train", "out": out_path, "metrics": metrics, "versions": versions()})
    if common.show:
        click.echo(
            f"wrote {out_path}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        )
