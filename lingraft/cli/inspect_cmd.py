"""``lingraft inspect``: layers, neuron and grafted counts, normalization, and whether lingraft can bound it."""

from __future__ import annotations

import click

from lingraft.cli._shared import table
from lingraft.cli.options import common_options, examples, model_argument
from lingraft.config import config_option


@click.command(
    "inspect",
    epilog=examples(
        "lingraft inspect models/mnist-cnn-b-fgsm.pt",
        "lingraft inspect net.onnx --json -",
        "lingraft inspect --list-models",
    ),
)
@model_argument
@config_option()
@click.option("--list-models", is_flag=True, help="List the registry's architectures and exit.")
@common_options
def command(model, config_path, list_models, common):
    """Show MODEL's layers (.pt or .onnx; default: the shipped model). Exits 1 listing every unsupported op.

    A model with NaN or infinite weights is shown (which tensor, first) but the other commands refuse it."""
    from lingraft.bounds import BoundedNetwork
    from lingraft.errors import UnsupportedModelError
    from lingraft.io.loader import load_model
    from lingraft.models import describe_model
    from lingraft.models import list_models as names

    if list_models:
        rows = [[n, describe_model(n)] for n in names()]
        common.emit({"models": [{"name": r[0], "description": r[1]} for r in rows]})
        if common.json_out != "-":
            click.echo(table(rows, ["model", "description"]))
        return
    if model is not None and str(model).lower().endswith(".onnx"):
        from lingraft.io.onnx import list_unsupported_ops

        bad = list_unsupported_ops(model)
        if bad:
            raise UnsupportedModelError("unsupported ONNX ops: " + ", ".join(f"{op} (node '{n}')" for op, n in bad))
    lm = load_model(model, allow_non_finite=True)
    net = BoundedNetwork(lm.model, lm.in_shape)
    layers = net.describe()
    norm = _normalization(lm)
    relus = [l for l in layers if l["op"].startswith("ReLU")]
    info = {
        "path": lm.path,
        "source": lm.source,
        "arch": lm.arch,
        "dataset": lm.dataset,
        "input_shape": list(lm.in_shape),
        "normalization": norm,
        "non_finite": lm.non_finite,
        "supported": True,
        "layers": layers,
        "relu_neurons": sum(l["neurons"] for l in relus),
        "grafted_neurons": sum(l["grafted"] for l in relus),
        "parameters": int(sum(p.numel() for p in lm.model.parameters())),
        "meta": lm.meta if common.verbose else None,
    }
    common.emit(info)
    if not common.show:
        return
    click.echo(
        f"{lm.path}  ({lm.source}{', ' + lm.arch if lm.arch else ''}; dataset {lm.dataset or '?'}; "
        f"input {tuple(lm.in_shape)}; {info['parameters']} parameters)"
    )
    click.echo(f"normalization: {_norm_text(norm, lm.source)}")
    if lm.non_finite:
        click.echo(
            f"weights: NOT FINITE ({lm.non_finite}); certify, graft, export and verify refuse this model: "
            "retrain or re-export it"
        )
    click.echo(
        table(
            [[l["name"], l["op"], "x".join(map(str, l["shape"])), l["neurons"], l["grafted"]] for l in layers],
            ["layer", "op", "shape", "neurons", "grafted"],
        )
    )
    click.echo(
        f"ReLU neurons: {info['relu_neurons']}, grafted: {info['grafted_neurons']}; supported by the bound engine: yes"
    )


def _rounded(values) -> list[float]:
    """float32 values without their float64 noise (0.1307000070810318 -> 0.1307): 7 significant digits."""
    return [float(f"{float(v):.7g}") for v in values]


def _normalization(lm) -> dict | None:
    """{"mean", "std"} of the model's Normalize layer, or of the Sub/Div an ONNX file starts with; else None."""
    from lingraft.models.layers import Normalize

    for m in lm.model.modules():
        if isinstance(m, Normalize):
            return {"mean": _rounded(m.mean.tolist()), "std": _rounded(m.std.tolist())}
    found = getattr(lm.model, "normalization", None) if lm.source == "onnx" else None
    if found:
        return {"mean": _rounded(found["mean"]), "std": _rounded(found["std"])}
    return None


def _norm_text(norm: dict | None, source: str) -> str:
    if not norm:
        return "none inside the model"
    text = f"mean {_list6(norm['mean'])}, std {_list6(norm['std'])}"
    return text + (" (the ONNX graph's first Sub/Div)" if source == "onnx" else "")


def _list6(values) -> str:
    return "[" + ", ".join(f"{v:.6g}" for v in values) + "]"
