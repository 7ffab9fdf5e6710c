"""``lingraft export``: write a model (grafted or not) as ONNX, checked against PyTorch in onnxruntime."""

from __future__ import annotations

import click

from lingraft.cli._shared import check_input_file
from lingraft.cli.options import EPS, common_options, data_dir_option, examples, file_option, model_argument
from lingraft.config import config_option


@click.command(
    "export",
    epilog=examples(
        "lingraft export grafted.pt --out grafted.onnx --opset 13",
        "lingraft export grafted.pt --out bench/net.onnx --vnnlib-samples 50 --vnnlib-eps 0.06",
    ),
)
@model_argument
@config_option()
@file_option("--out", "out_path", required=True, help="ONNX file to write.")
@click.option("--opset", type=int, default=13)
@click.option("--dynamic-batch", is_flag=True, help="Symbolic batch dimension instead of a batch of 1.")
@click.option("--tol", type=float, default=1e-5, help="Max |onnxruntime - torch| allowed.")
@data_dir_option
@click.option(
    "--vnnlib-samples",
    type=click.IntRange(min=0),
    default=0,
    help="Also write VNN-LIB robustness properties for the correctly classified ones of the first N test "
    "images, and instances.csv, next to the ONNX file (a VNN-COMP-style benchmark for "
    "'lingraft verify --instances' or any VNN-COMP verifier).",
)
@click.option(
    "--vnnlib-eps",
    type=EPS,
    default=None,
    help="L-inf radius of those properties, a number or a fraction like 2/255 (default: the checkpoint's certify eps).",
)
@click.option(
    "--vnnlib-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=60.0,
    help="Timeout column of instances.csv (seconds).",
)
@common_options
def command(
    model,
    config_path,
    out_path,
    opset,
    dynamic_batch,
    tol,
    data_dir,
    vnnlib_samples,
    vnnlib_eps,
    vnnlib_timeout,
    common,
):
    """Export MODEL (.pt; default: the shipped model) to ONNX with normalization baked in.

    After writing, the file is run in onnxruntime on random inputs and on 16 real test images; the export fails
    (and the file is removed) if the max absolute difference to PyTorch exceeds --tol.
    """
    import math

    from lingraft.errors import UsageError

    # cheap checks first: a wrong path or number fails at once, before torch is imported
    check_input_file(model, "model file", "{} is a directory; pass a .pt checkpoint or an .onnx file")
    if not math.isfinite(tol) or tol < 0:
        raise UsageError(f"--tol must be a finite number >= 0, got {tol}")
    if vnnlib_samples and not math.isfinite(vnnlib_timeout):
        raise UsageError(f"--vnnlib-timeout must be a finite number of seconds, got {vnnlib_timeout}")
    from lingraft.data.datasets import load_dataset, subset
    from lingraft.io.loader import check_input_matches_dataset, load_model
    from lingraft.io.onnx import export_onnx

    lm = load_model(model)
    if lm.dataset:
        check_input_matches_dataset(lm)
    test = load_dataset(lm.dataset, "test", data_dir) if lm.dataset else None
    check = None
    if test is not None:
        x, _ = subset(*test, 16)
        check = x.reshape(x.shape[0], *lm.in_shape)
    eps = None
    if vnnlib_samples:  # validate before anything is written
        from lingraft.certify.pipeline import check_eps, default_eps

        if test is None:
            raise UsageError("--vnnlib-samples needs the model's dataset (a lingraft checkpoint records it)")
        eps = check_eps(default_eps(lm.meta) if vnnlib_eps is None else vnnlib_eps)
    info = export_onnx(
        lm.model, out_path, lm.in_shape, opset=opset, check_inputs=check, tol=tol, dynamic_batch=dynamic_batch
    )
    if vnnlib_samples:
        from lingraft.spec.benchmark import write_benchmark

        x, y = subset(*test, vnnlib_samples)
        info["vnnlib"] = write_benchmark(
            lm.model, x.reshape(x.shape[0], *lm.in_shape), y, eps, out_path, vnnlib_timeout
        )
    common.emit(info)
    if common.show:
        click.echo(
            f"wrote {info['path']} (opset {info['opset']}, {info['num_nodes']} nodes); "
            f"max |onnxruntime - torch| = {info['max_abs_diff']:.2e}"
        )
        if "vnnlib" in info:
            v = info["vnnlib"]
            click.echo(
                f"wrote {len(v['properties'])} VNN-LIB properties (eps {v['eps']:g}; "
                f"{v['skipped_misclassified']} misclassified images skipped) and {v['instances']}"
            )
