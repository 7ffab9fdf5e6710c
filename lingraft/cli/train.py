"""``lingraft train``: train a registry model (CE, FGSM+GradAlign or PGD; baseline losses)."""

from __future__ import annotations

import shlex
import sys

import click

from lingraft.cli.options import EPS, check_input_file, common_options, emit_json, json_option, versions
from lingraft.cli.progress import progress_factory
from lingraft.config import config_option


@click.command(
    "train",
    epilog="Examples:\n\n\b\n  lingraft train --arch cnn-b --dataset mnist --method fgsm --eps 0.1 "
    "--optimizer adam --lr 1e-3 --epochs 3 --out my.pt\n"
    "  lingraft train --arch cnn-b --loss nkd --teacher teacher.pt --out nkd.pt",
)
@config_option()
@click.option("--arch", required=True, help="Registry model name (see 'lingraft inspect --list-models').")
@click.option("--dataset", default="mnist", show_default=True)
@click.option("--data-dir", type=click.Path(file_okay=False), default=None)
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="Checkpoint to write (.pt).")
@click.option("--epochs", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--optimizer", type=click.Choice(["sgd", "adam"]), default="sgd", show_default=True)
@click.option("--lr", type=float, default=None, help="Default 0.1 (sgd) / 1e-3 (adam).")
@click.option("--weight-decay", type=float, default=5e-4, show_default=True)
@click.option("--schedule", type=click.Choice(["cosine", "step", "none"]), default="cosine", show_default=True)
@click.option(
    "--method",
    type=click.Choice(["ce", "fgsm", "pgd"]),
    default="ce",
    show_default=True,
    help="ce: clean; fgsm: FGSM + GradAlign (LG recipe); pgd: PGD adversarial training.",
)
@click.option("--eps", type=EPS, default=0.1, show_default=True, help="Training radius (pixel space).")
@click.option("--grad-align", type=click.FloatRange(min=0), default=0.2, show_default=True)
@click.option("--fgsm-step", type=click.FloatRange(min=0), default=1.25, show_default=True, help="FGSM step / eps.")
@click.option("--pgd-steps", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--loss", default="ce", show_default=True, help="ce, ls, kd, nkd, uskd, zipf.")
@click.option("--teacher", type=click.Path(dir_okay=False), default=None, help="Teacher checkpoint (kd, nkd).")
@click.option("--num-train", type=click.IntRange(min=1), default=None, help="Use only the first N training images.")
@click.option("--val-size", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--no-resume", is_flag=True, help="Start over even if a resume state exists.")
@json_option
@common_options
def command(
    config_path,
    arch,
    dataset,
    data_dir,
    out_path,
    epochs,
    batch_size,
    optimizer,
    lr,
    weight_decay,
    schedule,
    method,
    eps,
    grad_align,
    fgsm_step,
    pgd_steps,
    loss,
    teacher,
    num_train,
    val_size,
    no_resume,
    json_out,
    verbose,
    quiet,
    seed,
    no_progress,
    device,
):
    """Train a registry model and write a checkpoint (+ JSON sidecar) atomically; an interrupted run resumes.

    The resume state OUT.state is kept after a finished run: a rerun with more --epochs continues from it, a rerun
    of the same command does nothing. OUT does not need it; delete it when done."""
    check_input_file(teacher, "teacher checkpoint")  # before torch is imported: a wrong path fails at once
    from lingraft.train.loop import TrainConfig, train

    cfg = TrainConfig(
        arch=arch,
        dataset=dataset,
        epochs=epochs,
        batch_size=batch_size,
        optimizer=optimizer,
        lr=lr,
        weight_decay=weight_decay,
        schedule=schedule,
        method=method,
        eps=eps,
        grad_align=grad_align,
        fgsm_step=fgsm_step,
        pgd_steps=pgd_steps,
        loss=loss,
        teacher=teacher,
        seed=seed,
        num_train=num_train,
        val_size=val_size,
        data_dir=data_dir,
        device=device,
    )
    log = (lambda s: None) if quiet else (lambda s: click.echo(s, err=True))
    metrics = train(
        cfg,
        out_path,
        progress=progress_factory(no_progress or quiet),
        log=log,
        resume=not no_resume,
        meta={"command": "lingraft " + " ".join(shlex.quote(a) for a in sys.argv[1:])},
    )
    result = {"schema_version": 1, "command": "train", "out": out_path, "metrics": metrics, "versions": versions()}
    if json_out:
        emit_json(result, json_out)
    if not quiet and json_out != "-":
        click.echo(
            f"wrote {out_path}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        )
