"""``lingraft compare``: train, graft and certify every baseline of a YAML file into one table."""

from __future__ import annotations

from pathlib import Path

import click

from lingraft.cli._shared import pick_device, table, versions
from lingraft.cli.options import common_options, dir_option, examples, ray_options
from lingraft.config import config_option


@click.command(
    "compare",
    epilog=examples(
        "lingraft compare examples/compare-mnist.yaml --out-dir runs/compare-mnist",
        "lingraft compare examples/compare-mnist.yaml --out-dir runs/compare-mnist --only ce,fgsm",
        "lingraft compare my.yaml --json - --threads 2 > result.json",
        intro="Rerunning the same command reuses finished training, grafting and certification "
        "(results.jsonl); Ctrl-C is safe.\n\n",
    ),
)
@click.argument("config", type=click.Path(dir_okay=False))
@config_option(
    help="YAML file with default values for this command's options (out-dir, threads, only, ...); flags given "
    "on the command line win. The comparison itself is CONFIG."
)
@dir_option(
    "--out-dir", help="Folder for checkpoints, results.jsonl and the tables (default: runs/compare-<config name>)."
)
@click.option(
    "--only",
    default=None,
    metavar="NAME,...",
    help="Run only these entries (their teachers are trained too); the table keeps earlier rows.",
)
@click.option(
    "--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads (default: torch's choice)."
)
@click.option("--no-plot", is_flag=True, help="Do not write cert_vs_eps.png.")
@ray_options
@common_options
def command(
    config,
    config_path,
    out_dir,
    only,
    threads,
    no_plot,
    ray,
    common,
):
    """Train each entry of CONFIG, graft it, certify both versions, and write table.md/csv/json and a plot.

    Each (entry, plain|grafted, eps, method) result is one line of OUT/results.jsonl; a changed entry is
    retrained (with its students) and only its results are recomputed.
    """
    import torch

    from lingraft.errors import UsageError
    from lingraft.experiments.compare import run_compare
    from lingraft.experiments.compare_config import load_compare

    if threads is not None:
        torch.set_num_threads(threads)
    spec = load_compare(config)
    names = None
    if only is not None:
        names = [n.strip() for n in only.split(",") if n.strip()]
        if not names:
            raise UsageError("--only needs entry names, e.g. --only ce,fgsm")
    out = Path(out_dir) if out_dir else Path("runs") / f"compare-{Path(config).stem}"
    kw = dict(only=names, seed=common.seed, log=common.log, plot=not no_plot)
    if ray is None:
        res = run_compare(spec, out, device=pick_device(common.device), progress=not common.bars_off, **kw)
    else:  # one entry per Ray task; OUT must be on a file system every worker sees (students read teachers)
        from lingraft.distributed.jobs_ray import run_compare_on_ray

        device = None if common.device == "auto" else common.device
        with ray.session():
            res = run_compare_on_ray(
                spec, out, device=device, worker_cpus=ray.worker_cpus, worker_gpus=ray.worker_gpus, **kw
            )
    res["versions"] = versions()
    common.emit(res)
    if common.show:
        click.echo(render_text(res))


def render_text(res: dict) -> str:
    """The terminal version of table.md."""
    from lingraft.experiments.compare_report import table_columns

    header, body = table_columns(res)
    if not body:
        return "no finished rows yet"
    return table(body, header)
