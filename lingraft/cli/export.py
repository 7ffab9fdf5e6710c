"""``lingraft export``: write a model (grafted or not) as ONNX, checked against PyTorch in onnxruntime."""

from __future__ import annotations

import click

from .options import common_options, emit_json, json_option


@click.command("export", epilog="Example:\n\n\b\n  lingraft export grafted.pt --out grafted.onnx --opset 13")
@click.argument("model", required=False, type=click.Path())
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="ONNX file to write.")
@click.option("--opset", type=int, default=13, show_default=True)
@click.option("--dynamic-batch", is_flag=True, help="Symbolic batch dimension instead of a batch of 1.")
@click.option("--tol", type=float, default=1e-5, show_default=True, help="Max |onnxruntime - torch| allowed.")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None)
@json_option
@common_options
def command(model, out_path, opset, dynamic_batch, tol, data_dir, json_out, verbose, quiet, seed, no_progress, device):
    """Export MODEL (.pt; default: the shipped model) to ONNX with normalization baked in.

    After writing, the file is run in onnxruntime on random inputs and on 16 real test images; the export fails
    (and the file is removed) if the max absolute difference to PyTorch exceeds --tol.
    """
    import math

    from ..data import load_dataset, subset
    from ..errors import UsageError
    from ..loader import load_model

    if not math.isfinite(tol) or tol < 0:
        raise UsageError(f"--tol must be a finite number >= 0, got {tol}")
    from ..onnx_io import export_onnx

    lm = load_model(model)
    check = None
    if lm.dataset:
        x, y = subset(*load_dataset(lm.dataset, "test", data_dir), 16)
        check = x.reshape(x.shape[0], *lm.in_shape)
    info = export_onnx(lm.model, out_path, lm.in_shape, opset=opset, check_inputs=check, tol=tol,
                       dynamic_batch=dynamic_batch)
    if json_out:
        emit_json(info, json_out)
    if not quiet and json_out != "-":
        click.echo(f"wrote {info['path']} (opset {info['opset']}, {info['num_nodes']} nodes); "
                   f"max |onnxruntime - torch| = {info['max_abs_diff']:.2e}")
