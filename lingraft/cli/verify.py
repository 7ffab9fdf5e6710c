"""``lingraft verify``: complete verification of a VNN-LIB property (attack, bounds, branch and bound)."""

from __future__ import annotations

import click

from lingraft.cli.options import common_options, emit_json, json_option, table


@click.command("verify", epilog="Examples:\n\n\b\n  lingraft verify net.onnx prop.vnnlib --timeout 60 --result out.txt\n"
               "  lingraft verify grafted.pt prop.vnnlib --timeout 30\n"
               "  lingraft verify --instances ../shared/vnncomp/mnist_fc/instances.csv --out results.jsonl")
@click.argument("model", required=False, type=click.Path())
@click.argument("prop", required=False, type=click.Path())
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True,
              help="Wall-clock seconds for the instance (per instance with --instances unless the CSV gives one).")
@click.option("--result", "result_path", type=click.Path(dir_okay=False), default=None,
              help="Write the VNN-COMP result file (sat + counterexample, unsat, unknown, timeout, error).")
@click.option("--split", type=click.Choice(["auto", "input", "relu"]), default="auto", show_default=True,
              help="Branching: input splitting (<= 10 inputs in auto), ReLU splitting otherwise.")
@click.option("--instances", type=click.Path(dir_okay=False), default=None,
              help="Run a whole benchmark: instances.csv (onnx,vnnlib,timeout; paths relative to it).")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default=None,
              help="With --instances: JSONL results file (resumes: finished instances are skipped).")
@click.option("--results-dir", type=click.Path(file_okay=False), default=None,
              help="With --instances: also write one VNN-COMP result file per instance here.")
@json_option
@common_options
def command(model, prop, timeout, result_path, split, instances, out_path, results_dir, json_out, verbose, quiet, seed,
            no_progress, device):
    """Decide MODEL (.onnx, or a lingraft .pt checkpoint) against PROP.vnnlib: unsat (property holds), sat
    (counterexample, re-checked by a forward pass: onnxruntime for ONNX, PyTorch for a checkpoint), unknown or
    timeout. Grafted neurons are never branched on."""
    import math

    from lingraft.errors import UsageError
    from lingraft.verify import verify_instances, verify_property, write_result

    if not math.isfinite(timeout):
        raise UsageError(f"--timeout must be a finite number of seconds, got {timeout}")

    if instances:
        if model or prop:
            raise UsageError("give either MODEL PROP or --instances CSV, not both")
        # with --json - stdout carries only the JSON document: progress lines go to stderr
        echo = (lambda s: None) if quiet else (lambda s: click.echo(s, err=json_out == "-"))
        recs = verify_instances(instances, out=out_path, results_dir=results_dir, echo=echo, seed=seed, split=split)
        counts = {}
        for r in recs:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        wrong = sum(1 for r in recs if r.get("wrong"))
        if json_out:
            emit_json({"schema_version": 1, "command": "verify", "instances": recs, "counts": counts,
                       "wrong": wrong}, json_out)
        if not quiet and json_out != "-":
            click.echo(table([[k, v] for k, v in sorted(counts.items())] + [["wrong", wrong]], ["status", "count"]))
        return
    if not model or not prop:
        raise UsageError("missing MODEL and PROP (e.g. lingraft verify net.onnx prop.vnnlib), or use --instances")
    dev = None if device == "auto" else device
    res = verify_property(model, prop, timeout=timeout, seed=seed, split=split, device=dev, verbose=verbose > 0)
    if result_path:
        write_result(result_path, res)
    out = {"schema_version": 1, "command": "verify", "model": model, "property": prop, "status": res.status,
           "time_s": res.time_s, "stats": res.stats,
           "counterexample": None if res.counterexample is None else
           {"x": [float(v) for v in res.counterexample[0]], "y": [float(v) for v in res.counterexample[1]]}}
    if json_out:
        emit_json(out, json_out)
    if not quiet and json_out != "-":
        click.echo(f"{res.status}  ({res.time_s:.2f} s, {res.stats.get('branches', 0)} branches, "
                   f"{res.stats.get('method', '')})")
    if res.status == "error":
        from lingraft.errors import LingraftError

        raise LingraftError(res.stats.get("error") or "verification failed")
