"""``lingraft verify``: complete verification of a VNN-LIB property (attack, bounds, branch and bound).

Also the VNN-COMP entry point: vnncomp/prepare_instance.sh runs ``--prepare``, vnncomp/run_instance.sh runs one
instance with ``--started-at`` (the timeout counts from the script's start) and ``--result``.
"""

from __future__ import annotations

import click

from lingraft.cli._shared import check_input_file, table
from lingraft.cli.options import common_options, dir_option, examples, file_option, model_argument, ray_options
from lingraft.config import config_option

# with --started-at: seconds kept back for writing the result and exiting after the search stops
EXIT_MARGIN_S = 1.0


@click.command(
    "verify",
    epilog=examples(
        "lingraft verify bench/net.onnx bench/vnnlib/prop_0_eps0.06.vnnlib --timeout 60 --result out.txt",
        "lingraft verify grafted.pt bench/vnnlib/prop_0_eps0.06.vnnlib --timeout 30",
        "lingraft verify --instances bench/instances.csv --out results.jsonl",
        "lingraft verify bench/net.onnx bench/vnnlib/prop_0_eps0.06.vnnlib --prepare",
    ),
)
@model_argument
@click.argument("prop", required=False, type=click.Path())
@config_option()
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=60.0,
    help="Wall-clock seconds for the instance (with --instances: when given, replaces the CSV's "
    "per-instance timeouts).",
)
@file_option(
    "--result",
    "result_path",
    help="Write the VNN-COMP result file (sat + counterexample, unsat, unknown, timeout, error).",
)
@click.option(
    "--started-at",
    type=float,
    default=None,
    metavar="EPOCH",
    help="Seconds since the epoch the --timeout counts from (start-up included); 1 s is kept back for "
    "writing the result (VNN-COMP's run_instance.sh).",
)
@click.option(
    "--split",
    type=click.Choice(["auto", "input", "relu"]),
    default="auto",
    help="Branching: input splitting (<= 16 inputs in auto), ReLU splitting otherwise.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=None,
    help="Branch and bound: domains bounded per round (default 64 for ReLU splitting, 512 boxes for input "
    "splitting); on a GPU thousands pay.",
)
@click.option(
    "--prepare",
    is_flag=True,
    help="Only check that MODEL loads and PROP parses for it (VNN-COMP's prepare_instance.sh).",
)
@file_option("--instances", help="Run a whole benchmark: instances.csv (onnx,vnnlib,timeout; paths relative to it).")
@file_option(
    "--out", "out_path", help="With --instances: JSONL results file (resumes: finished instances are skipped)."
)
@click.option(
    "--no-resume", is_flag=True, help="With --instances: start over instead of skipping the instances already in --out."
)
@dir_option("--results-dir", help="With --instances: also write one VNN-COMP result file per instance here.")
@click.option(
    "--threads",
    type=int,
    default=None,
    envvar="LINGRAFT_THREADS",
    help="Torch intra-op threads (default: $LINGRAFT_THREADS, else torch's choice; 0 = torch's choice): "
    "branch and bound's many small tensor operations run fastest with 1.",
)
@ray_options
@common_options
def command(
    model,
    prop,
    config_path,
    timeout,
    result_path,
    started_at,
    split,
    batch_size,
    prepare,
    instances,
    out_path,
    no_resume,
    results_dir,
    threads,
    ray,
    common,
):
    """Decide MODEL (.onnx, or a lingraft .pt checkpoint) against PROP.vnnlib: unsat (property holds), sat
    (counterexample, re-checked by a forward pass: onnxruntime for ONNX, PyTorch for a checkpoint), unknown or
    timeout. Grafted neurons are never branched on. 'lingraft export MODEL --out DIR/net.onnx --vnnlib-samples N'
    writes a network and robustness properties to verify (DIR/vnnlib/prop_<i>_eps<eps>.vnnlib)."""
    import math

    from lingraft.errors import UsageError

    if not math.isfinite(timeout):
        raise UsageError(f"--timeout must be a finite number of seconds, got {timeout}")
    if instances:
        fix = "; give the benchmark's instances.csv"
        check_input_file(instances, "instances file", "{} is a directory" + fix, fix)
    else:
        _check_arguments(model, prop, result_path)
    if threads is not None and threads > 0:
        import torch

        torch.set_num_threads(threads)
    dev = None if common.device == "auto" else common.device
    if ray is not None and not instances:
        raise UsageError("--ray runs a benchmark's instances in parallel: use it with --instances CSV")
    if instances:
        if model or prop:
            raise UsageError("give either MODEL PROP or --instances CSV, not both")
        timeout_given = (
            click.get_current_context().get_parameter_source("timeout") != click.core.ParameterSource.DEFAULT
        )
        _verify_benchmark(
            instances,
            out_path,
            results_dir,
            not no_resume,
            timeout if timeout_given else None,
            split,
            dev,
            common,
            ray,
            batch_size,
        )
        return
    if prepare:
        _prepare(model, prop, common)
        return
    _verify_one(model, prop, timeout, started_at, result_path, split, dev, common, batch_size)


def _check_arguments(model, prop, result_path):
    """MODEL and PROP are given and exist, checked before torch is imported; with --result a failed check
    still writes the VNN-COMP result file ``error``."""
    from lingraft.errors import LingraftError, UsageError

    if not model:
        raise UsageError("missing MODEL and PROP (e.g. lingraft verify net.onnx prop.vnnlib), or use --instances")
    if not prop:
        raise UsageError(
            f"missing PROP: give a VNN-LIB property file after {model} (e.g. lingraft verify {model} prop.vnnlib; "
            "'lingraft export --vnnlib-samples N' writes some)"
        )
    try:
        check_input_file(model, "model file", "{} is a directory; pass an .onnx file or a .pt checkpoint")
        check_input_file(prop, "property file", "{} is a directory; pass a .vnnlib file")
    except LingraftError:
        if result_path:
            from lingraft.io.files import atomic_write_text

            atomic_write_text(result_path, "error\n")
        raise


def _verify_benchmark(
    instances, out_path, results_dir, resume, timeout, split, device, common, ray=None, batch_size=None
):
    """--instances: every instance of a benchmark's instances.csv; a status count table (or JSON).
    ray: None, or a RayArgs to run one instance per Ray task; batch_size: branch-and-bound domains per round."""
    # with --json - stdout carries only the JSON document: progress lines go to stderr
    echo = (lambda s: None) if common.quiet else (lambda s: click.echo(s, err=common.json_out == "-"))
    kw = dict(
        out=out_path,
        resume=resume,
        results_dir=results_dir,
        timeout=timeout,
        verbose=common.verbose > 0,
        echo=echo,
        seed=common.seed,
        split=split,
        device=device,
        batch_size=batch_size,
    )
    if ray is None:
        from lingraft.verify import verify_instances

        recs = verify_instances(instances, **kw)
    else:
        from lingraft.distributed.jobs_ray import verify_instances_on_ray

        with ray.session():
            recs = verify_instances_on_ray(instances, worker_cpus=ray.worker_cpus, worker_gpus=ray.worker_gpus, **kw)
    counts: dict[str, int] = {}
    for r in recs:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    wrong = sum(1 for r in recs if r.get("wrong"))
    common.emit({"schema_version": 1, "command": "verify", "instances": recs, "counts": counts, "wrong": wrong})
    if common.show:
        click.echo(table([[k, v] for k, v in sorted(counts.items())] + [["wrong", wrong]], ["status", "count"]))


def _prepare(model, prop, common):
    """--prepare: load MODEL and parse PROP for it (nothing is cached between calls)."""
    from lingraft.verify.core import check_instance

    shape, n_out = check_instance(model, prop)
    common.emit(
        {
            "schema_version": 1,
            "command": "verify",
            "model": model,
            "property": prop,
            "prepared": True,
            "input_shape": list(shape),
            "outputs": n_out,
        }
    )
    if common.show:
        click.echo(f"ok: {model} input {tuple(shape)} -> {n_out} outputs; {prop} parsed")


def _verify_one(model, prop, timeout, started_at, result_path, split, device, common, batch_size=None):
    """MODEL PROP: decide one instance; one status line (or JSON); exit 1 when the answer is ``error``."""
    from lingraft.errors import LingraftError
    from lingraft.verify import VerifyResult, verify_property, write_result

    budget = timeout if started_at is None else _budget_since(started_at, timeout)
    if budget <= 0:
        res = VerifyResult("timeout", None, 0.0, {"branches": 0, "method": "none"})
    else:
        res = verify_property(
            model,
            prop,
            timeout=budget,
            seed=common.seed,
            split=split,
            device=device,
            batch_size=batch_size,
            verbose=common.verbose > 0,
        )
    if result_path:
        write_result(result_path, res)
    out = {
        "schema_version": 1,
        "command": "verify",
        "model": model,
        "property": prop,
        "status": res.status,
        "time_s": res.time_s,
        "stats": res.stats,
        "counterexample": None
        if res.counterexample is None
        else {"x": [float(v) for v in res.counterexample[0]], "y": [float(v) for v in res.counterexample[1]]},
    }
    common.emit(out)
    if common.show:
        click.echo(
            f"{res.status}  ({res.time_s:.2f} s, {res.stats.get('branches', 0)} branches, "
            f"{res.stats.get('method', '')})"
        )
    if res.status == "error":
        raise LingraftError(res.stats.get("error") or "verification failed")


def _budget_since(started_at: float, timeout: float) -> float:
    """Seconds left of ``timeout`` counted from ``started_at`` (epoch seconds), less the exit margin."""
    import time

    return max(0.0, timeout - max(0.0, time.time() - started_at) - EXIT_MARGIN_S)
