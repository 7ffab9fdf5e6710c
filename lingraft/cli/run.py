"""``lingraft run SWEEP.yaml``: run a grid of certify / graft+certify jobs, resumably, and print a summary."""

from __future__ import annotations

from pathlib import Path

import click

from lingraft.cli._shared import pick_device, progress_bar, table, versions
from lingraft.cli.options import common_options, csv_option, examples, file_option, ray_options
from lingraft.config import config_hash, config_option
from lingraft.errors import LingraftError


@click.command(
    "run",
    epilog=examples(
        "lingraft run sweep.yaml",
        "lingraft run sweep.yaml --dry-run",
        "lingraft run sweep.yaml --results other.jsonl --retry-errors --json summary.json",
    ),
)
@click.argument("sweep", type=click.Path())
@config_option()
@file_option(
    "--results",
    "results",
    help="Results file (JSON lines). Default: the sweep's 'results', else results.jsonl next to it.",
)
@click.option("--retry-errors", is_flag=True, help="Rerun jobs whose stored result is an error.")
@click.option("--dry-run", is_flag=True, help="List the jobs and whether each is done; run nothing.")
@csv_option("Write the summary table as CSV.")
@ray_options
@common_options
def command(sweep, config_path, results, retry_errors, dry_run, csv_out, ray, common):
    """Run every job of SWEEP (models x methods x ratios x eps) not yet in the results file.

    \b
    A sweep file:
      models: [ckpt/mlp.pt, net.onnx]   # paths relative to the sweep file, or 'default'
      methods: [ibp, crown, alpha-crown]
      ratios: [0, 0.5]                  # 0: certify; > 0: graft (cached in RESULTS.work/), then certify
      eps: [0.01, 2/255]
      results: results.jsonl            # optional
      options: {num-samples: 100, epochs: 1, dataset: mnist}

    Each finished job appends one JSON line (config, config hash, versions, accuracies, per-sample status,
    margin and time). Ctrl-C or SIGTERM stops after the current job's line is complete; rerunning resumes. Exits 1 when
    any job failed (its error is in the results file).
    """
    from lingraft.experiments.jobs import METHODS, RUN_OPTIONS, resolve_options
    from lingraft.experiments.sweep import latest_records, load_sweep, read_results

    p = Path(sweep)
    if not p.exists():
        raise LingraftError(f"sweep file {p} not found; check the path")
    spec = load_sweep(p, allowed_methods=METHODS, allowed_options=RUN_OPTIONS)
    ctx = click.get_current_context()
    seed = common.seed
    if ctx.get_parameter_source("seed") not in (click.core.ParameterSource.DEFAULT, None) and seed != spec.extra.get(
        "seed", RUN_OPTIONS["seed"]
    ):
        spec.extra = {**spec.extra, "seed": seed}  # part of every job id: results of another seed are not reused
    where = str(p)
    opts = resolve_options(spec.extra, where, spec.base_dir)
    results = Path(results) if results else Path(spec.results)  # flag/--config beat the sweep
    if results.is_dir():
        raise LingraftError(f"results path {results} is a directory; give a .jsonl file")
    jobs = _resolved_jobs(spec, where)
    latest = latest_records(read_results(results))
    done = {
        j["job_id"]
        for j in jobs
        if j["job_id"] in latest and (latest[j["job_id"]].get("status") != "error" or not retry_errors)
    }

    if dry_run:
        _dry_run(jobs, latest, done, results, common)
        return
    records = _run_jobs(spec, jobs, done, opts, results, where, common=common, retry_errors=retry_errors, ray=ray)
    _report(records, spec, opts, p, results, len(jobs), common=common, csv_out=csv_out)


def _resolved_jobs(spec, where: str) -> list[dict]:
    """The sweep's jobs (:func:`expand_jobs` order) with shipped-model names resolved to their files."""
    from lingraft.experiments.jobs import resolve_model_entry
    from lingraft.experiments.sweep import expand_jobs

    jobs = expand_jobs(spec)
    for j in jobs:
        j["model"] = resolve_model_entry(j["model"], where)
    return jobs


def _dry_run(jobs: list[dict], latest: dict, done: set, results: Path, common) -> None:
    """List the jobs and whether each is done (``--dry-run``)."""
    from lingraft.experiments.sweep_summary import model_label

    rows = [
        [
            model_label(j["model"]),
            j["method"],
            j["ratio"],
            j["eps"],
            latest[j["job_id"]].get("status", "?") if j["job_id"] in done else "todo",
        ]
        for j in jobs
    ]
    common.emit(
        {
            "schema_version": 1,
            "command": "run",
            "dry_run": True,
            "results": str(results),
            "jobs": [dict(j, status=r[-1]) for j, r in zip(jobs, rows)],
        }
    )
    if common.show:
        click.echo(table(rows, ["model", "method", "ratio", "eps", "status"]))
        click.echo(f"{len(jobs) - len(done)} of {len(jobs)} jobs to run; results: {results}")


def _run_jobs(
    spec,
    jobs: list[dict],
    done: set,
    opts: dict,
    results: Path,
    where: str,
    *,
    common,
    retry_errors: bool,
    ray=None,
) -> list[dict]:
    """Run the unfinished jobs with a progress bar; returns the latest record of every job.
    ray: None, or a RayArgs to run one job per Ray task (the driver writes results)."""
    from lingraft.experiments.jobs import JobRunner, work_dir_for
    from lingraft.experiments.sweep import run_sweep

    device = common.device
    dev = pick_device(device)
    runner = JobRunner(opts, work_dir=work_dir_for(results), device=dev, where=where)
    runner.preflight([j for j in jobs if j["job_id"] not in done])  # finished jobs need no model any more
    by_id = {j["job_id"]: j for j in jobs}

    with progress_bar(len(jobs), "run", common.bars_off, unit="jobs") as bar:
        bar.skip(len(done))

        def say(msg: str) -> None:
            if not common.quiet:
                bar.write(msg)  # above the bar on a TTY

        runner.log = say if common.verbose else (lambda s: None)
        if ray is not None:
            from lingraft.distributed.jobs_ray import SweepJobFn, run_sweep_on_ray

            fn = SweepJobFn(
                opts,
                work_dir=str(work_dir_for(results)),
                where=where,
                device=device,
                models={j["job_id"]: j["model"] for j in jobs},
            )
            with ray.session():
                return run_sweep_on_ray(
                    spec,
                    fn,
                    results_path=results,
                    log=say,
                    retry_errors=retry_errors,
                    worker_cpus=ray.worker_cpus,
                    worker_gpus=ray.worker_gpus,
                    on_record=lambda r: bar.update(1),
                )

        def job_fn(job: dict) -> dict:
            # run_sweep expands the grid itself; use our copy of the job, whose shipped-model names are resolved
            try:
                return runner(dict(job, model=by_id[job["job_id"]]["model"]))
            finally:
                bar.update(1)

        return run_sweep(spec, job_fn, results_path=results, log=say, retry_errors=retry_errors)


def _report(records: list[dict], spec, opts: dict, sweep: Path, results: Path, n_jobs: int, *, common, csv_out) -> None:
    """Print / write the summary of the finished run; LingraftError (exit 1) when any job failed."""
    from lingraft.experiments.sweep_summary import model_label, summary_columns, summary_csv, summary_rows
    from lingraft.io.files import atomic_write_text

    rows = summary_rows(records)
    failed = [r for r in records if r.get("status") == "error"]
    summary = {
        "schema_version": 1,
        "command": "run",
        "sweep": str(sweep),
        "results": str(results),
        "config": {
            "sweep": str(sweep),
            "options": opts,
            "models": spec.models,
            "methods": spec.methods,
            "ratios": spec.ratios,
            "eps": spec.eps,
        },
        "versions": versions(),
        "jobs": n_jobs,
        "failed": len(failed),
        "rows": rows,
    }
    summary["config_hash"] = config_hash(summary["config"])
    common.emit(summary)
    if common.show:
        header, body = summary_columns(rows)
        click.echo(table(body, header))
        click.echo(f"{len(records)} jobs, {len(failed)} failed; results in {results}")
    if csv_out:
        atomic_write_text(csv_out, summary_csv(rows))
    if failed:
        first = failed[0]
        raise LingraftError(
            f"{len(failed)} of {len(records)} jobs failed (first: {model_label(first['job']['model'])} "
            f"{first['job']['method']}: {first.get('error')}); fix it and rerun with --retry-errors"
        )
