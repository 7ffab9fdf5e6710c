"""``lingraft run SWEEP.yaml``: run a grid of certify / graft+certify jobs, resumably, and print a summary."""

from __future__ import annotations

from pathlib import Path

import click

from lingraft.config import config_hash, config_option
from lingraft.errors import LingraftError
from lingraft.cli.options import common_options, emit_json, json_option, pick_device, progress_bar, table, versions

_SUMMARY_HEADER = ["model", "method", "ratio", "eps", "status", "clean", "PGD", "certified", "grafted", "ms/img", "s"]


@click.command("run", epilog="Examples:\n\n\b\n  lingraft run sweep.yaml\n"
               "  lingraft run sweep.yaml --dry-run\n"
               "  lingraft run sweep.yaml --results other.jsonl --retry-errors --json summary.json")
@click.argument("sweep", type=click.Path())
@config_option()
@click.option("--results", "results", type=click.Path(dir_okay=False), default=None,
              help="Results file (JSON lines). Default: the sweep's 'results', else results.jsonl next to it.")
@click.option("--retry-errors", is_flag=True, help="Rerun jobs whose stored result is an error.")
@click.option("--dry-run", is_flag=True, help="List the jobs and whether each is done; run nothing.")
@click.option("--csv", "csv_out", type=click.Path(dir_okay=False), default=None, help="Write the summary table as CSV.")
@json_option
@common_options
def command(sweep, config_path, results, retry_errors, dry_run, csv_out, json_out, verbose, quiet, seed,
            no_progress, device):
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
    margin and time). Ctrl-C stops after the current job's line is complete; rerunning resumes. Exits 1 when
    any job failed (its error is in the results file).
    """
    from lingraft.experiments.jobs import METHODS, RUN_OPTIONS, JobRunner, resolve_options, resolve_model_entry, work_dir_for
    from lingraft.experiments.sweep import expand_jobs, latest_records, load_sweep, read_results, run_sweep

    p = Path(sweep)
    if not p.exists():
        raise LingraftError(f"sweep file {p} not found; check the path")
    spec = load_sweep(p, allowed_methods=METHODS, allowed_options=RUN_OPTIONS)
    ctx = click.get_current_context()
    if (ctx.get_parameter_source("seed") not in (click.core.ParameterSource.DEFAULT, None)
            and seed != spec.extra.get("seed", RUN_OPTIONS["seed"])):
        spec.extra = {**spec.extra, "seed": seed}  # part of every job id: results of another seed are not reused
    where = str(p)
    opts = resolve_options(spec.extra, where, spec.base_dir)
    results = Path(results) if results else Path(spec.results)  # flag/--config beat the sweep
    if results.is_dir():
        raise LingraftError(f"results path {results} is a directory; give a .jsonl file")
    jobs = expand_jobs(spec)
    for j in jobs:
        j["model"] = resolve_model_entry(j["model"], where)
    by_id = {j["job_id"]: j for j in jobs}
    latest = latest_records(read_results(results))
    done = {jid for jid in by_id if jid in latest and (latest[jid].get("status") != "error" or not retry_errors)}

    if dry_run:
        rows = [[_short(j["model"]), j["method"], j["ratio"], j["eps"],
                 latest[j["job_id"]].get("status", "?") if j["job_id"] in done else "todo"] for j in jobs]
        if json_out:
            emit_json({"schema_version": 1, "command": "run", "dry_run": True, "results": str(results),
                       "jobs": [dict(j, status=r[-1]) for j, r in zip(jobs, rows)]}, json_out)
        if json_out != "-" and not quiet:
            click.echo(table(rows, ["model", "method", "ratio", "eps", "status"]))
            click.echo(f"{len(jobs) - len(done)} of {len(jobs)} jobs to run; results: {results}")
        return

    dev = pick_device(device)
    runner = JobRunner(opts, work_dir=work_dir_for(results), device=dev, where=where)
    runner.preflight([j for j in jobs if j["job_id"] not in done])  # finished jobs need no model any more

    with progress_bar(len(jobs), "run", no_progress or quiet) as bar:
        bar.update(len(done))
        bar_on = not bar.disable

        def say(msg: str) -> None:
            if quiet:
                return
            if bar_on:
                bar.write(msg)
            else:
                click.echo(msg, err=True)

        runner.log = say if verbose else (lambda s: None)
        def job_fn(job: dict) -> dict:
            # run_sweep expands the grid itself; use our copy of the job, whose shipped-model names are resolved
            try:
                return runner(dict(job, model=by_id[job["job_id"]]["model"]))
            finally:
                bar.update(1)

        records = run_sweep(spec, job_fn, results_path=results, log=say, retry_errors=retry_errors)

    rows = summary_rows(records)
    failed = [r for r in records if r.get("status") == "error"]
    summary = {"schema_version": 1, "command": "run", "sweep": str(p), "results": str(results),
               "config": {"sweep": str(p), "options": opts, "models": spec.models, "methods": spec.methods,
                          "ratios": spec.ratios, "eps": spec.eps},
               "versions": versions(), "jobs": len(jobs), "failed": len(failed), "rows": rows}
    summary["config_hash"] = config_hash(summary["config"])
    if json_out:
        emit_json(summary, json_out)
    if json_out != "-" and not quiet:
        click.echo(table([_fmt_row(r) for r in rows], _SUMMARY_HEADER))
        click.echo(f"{len(records)} jobs, {len(failed)} failed; results in {results}")
    if csv_out:
        _write_csv(csv_out, rows)
    if failed:
        first = failed[0]
        raise LingraftError(f"{len(failed)} of {len(records)} jobs failed (first: {_short(first['job']['model'])} "
                            f"{first['job']['method']}: {first.get('error')}); fix it and rerun with --retry-errors")


_SUMMARY_KEYS = ["model", "method", "ratio", "eps", "status", "clean_acc", "pgd_acc", "certified_acc",
                 "grafted_neurons", "relu_neurons", "time_per_sample_s", "elapsed_s", "error"]


def _short(model: str) -> str:
    return Path(model).name


def summary_rows(records: list[dict]) -> list[dict]:
    """One plain dict per job record (keys :data:`_SUMMARY_KEYS`; numbers stay numbers, missing ones None)."""
    rows = []
    for rec in records:
        job = rec.get("job") or {}
        res = rec.get("result") or {}
        g = res.get("graft") or {}
        rows.append({"model": job.get("model"), "method": job.get("method"), "ratio": job.get("ratio"),
                     "eps": job.get("eps"), "status": rec.get("status"), "clean_acc": res.get("clean_acc"),
                     "pgd_acc": res.get("pgd_acc"), "certified_acc": res.get("certified_acc"),
                     "grafted_neurons": g.get("grafted_neurons"), "relu_neurons": g.get("relu_neurons"),
                     "time_per_sample_s": res.get("time_per_sample_s"), "elapsed_s": rec.get("elapsed_s"),
                     "error": rec.get("error")})
    return rows


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _fmt_row(r: dict) -> list:
    grafted = "-" if r["grafted_neurons"] is None else f"{r['grafted_neurons']}/{r['relu_neurons']}"
    ms = r["time_per_sample_s"]
    return [_short(str(r["model"])), r["method"], r["ratio"], r["eps"], r["status"], _pct(r["clean_acc"]),
            _pct(r["pgd_acc"]), _pct(r["certified_acc"]), grafted, "-" if ms is None else f"{1000 * ms:.2f}",
            f"{r['elapsed_s'] or 0.0:.1f}"]


def _write_csv(path, rows: list[dict]) -> None:
    import csv
    import io

    from lingraft.io.files import atomic_write_text

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=_SUMMARY_KEYS)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())
