"""Load a network from a lingraft checkpoint (.pt), an ONNX file, or the shipped default model."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lingraft.config import require_file
from lingraft.errors import LingraftError, UsageError

DEFAULT_MODEL = "mnist-cnn-b-fgsm.pt"


def models_dir() -> Path:
    """The shipped models folder (``$LINGRAFT_MODELS`` overrides)."""
    env = os.environ.get("LINGRAFT_MODELS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "models"  # the repository's models/, beside the package


def default_model_path() -> Path:
    return models_dir() / DEFAULT_MODEL


@dataclass
class LoadedModel:
    model: nn.Module
    in_shape: tuple
    dataset: str | None
    source: str  # "checkpoint" or "onnx"
    path: str
    arch: str | None = None
    meta: dict = field(default_factory=dict)
    non_finite: str | None = None  # "parameter 'fc.weight' holds NaN" when a weight is NaN/inf (allow_non_finite)


def first_non_finite(tensors: Iterable[tuple[str, Any]]) -> tuple[str, str] | None:
    """(name, "NaN" or "inf") of the first floating tensor or array among ``(name, value)`` pairs that holds a
    NaN or infinite value; None when every one is finite."""
    for name, value in tensors:
        a = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        if not np.issubdtype(a.dtype, np.inexact) or bool(np.isfinite(a).all()):
            continue
        return name, ("NaN" if bool(np.isnan(a).any()) else "inf")
    return None


def module_non_finite(model: nn.Module) -> str | None:
    """ "parameter 'NAME' holds NaN" (or buffer, or inf) for the first non-finite tensor of ``model``'s state_dict
    (whose names are a checkpoint's keys), else None."""
    params = {n for n, _ in model.named_parameters()}
    found = first_non_finite(model.state_dict().items())
    if found is None:
        return None
    name, kind = found
    return f"{'parameter' if name in params else 'buffer'} '{name}' holds {kind}"


def non_finite_error(path, what: str) -> LingraftError:
    """The one-line refusal of a model whose weights are not all finite; ``what`` as :func:`module_non_finite`
    writes it (an ONNX file names its initializer)."""
    return LingraftError(
        f"model {path} has non-finite weights: {what}; lingraft refuses to certify, graft, export or verify it "
        "(no bound or certificate means anything for it): retrain the model (lower the learning rate if "
        "training diverged) or re-export it with finite weights"
    )


def load_model(
    path: str | os.PathLike | None, dataset: str | None = None, input_shape=None, *, allow_non_finite: bool = False
) -> LoadedModel:
    """Load ``path`` (None = the shipped default). ``dataset`` overrides/asserts the checkpoint's dataset; for
    ONNX files it names the data the network expects (its input shape must match).

    A model with a NaN or infinite weight is refused (LingraftError naming the first such tensor, see
    :func:`non_finite_error`) unless ``allow_non_finite``, which records it in ``LoadedModel.non_finite``."""
    if path is None:
        path = default_model_path()
        if not path.exists():
            raise LingraftError(f"the shipped default model {path} is missing; reinstall lingraft or pass a MODEL path")
    p = require_file(path, "model file not found: {}", "{} is a directory; pass a .pt checkpoint or an .onnx file")
    try:
        with open(p, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise LingraftError(f"cannot read model file {p}: {e.strerror}; check its permissions") from None
    if len(head) == 0:
        raise LingraftError(f"model file {p} is empty")
    if p.suffix.lower() == ".json":
        _refuse_json(p)
    if p.suffix.lower() == ".onnx" or (p.suffix.lower() not in (".pt", ".pth", ".ckpt") and not head.startswith(b"PK")):
        from lingraft.io.onnx import load_onnx

        gm = load_onnx(p, allow_non_finite=allow_non_finite)
        in_shape = tuple(gm.input_shape)
        if input_shape is not None and tuple(input_shape) != in_shape:
            raise UsageError(f"--input-shape {tuple(input_shape)} does not match the ONNX input {in_shape}")
        if dataset is not None:
            from lingraft.data.datasets import dataset_info

            info = dataset_info(dataset)
            if int(_prod(info.in_shape)) != int(_prod(in_shape)):
                raise UsageError(f"dataset {dataset} has inputs {info.in_shape} but the ONNX model takes {in_shape}")
        return LoadedModel(gm, in_shape, dataset, "onnx", str(p), non_finite=getattr(gm, "non_finite", None))
    from lingraft.io.checkpoint import load_checkpoint

    model, ckpt = load_checkpoint(p)
    bad = module_non_finite(model)
    if bad is not None and not allow_non_finite:
        raise non_finite_error(p, bad)
    in_shape = tuple(ckpt["arch_kwargs"]["in_shape"])
    ds = ckpt.get("dataset")
    if dataset is not None and ds is not None and dataset.lower() != str(ds).lower():
        from lingraft.data.datasets import dataset_info

        info = dataset_info(dataset)
        if tuple(info.in_shape) != in_shape:
            raise UsageError(f"model {p.name} takes {in_shape} inputs ({ds}) but dataset {dataset} has {info.in_shape}")
    return LoadedModel(
        model, in_shape, dataset or ds, "checkpoint", str(p), ckpt.get("arch"), ckpt.get("meta", {}), bad
    )


def _refuse_json(p: Path) -> None:
    """A JSON file passed as the model: point a checkpoint's sidecar to its .pt; any other JSON is no model."""
    import json

    from lingraft.io.checkpoint import FORMAT

    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # not JSON after all: let the ONNX reader say what it is
    if isinstance(d, dict) and d.get("format") == FORMAT:
        name = d.get("checkpoint_file")
        pt = p.with_name(name) if isinstance(name, str) and Path(name).name == name else p.with_suffix(".pt")
        raise LingraftError(
            f"{p} is the JSON sidecar of a lingraft checkpoint (metadata only, no weights); pass the "
            f"checkpoint itself: {pt}"
        )
    raise LingraftError(f"{p} is a JSON file, not a model; pass a .pt checkpoint or an .onnx file")


def check_input_matches_dataset(lm: LoadedModel, dataset: str | None = None) -> None:
    """Raise LingraftError (exit 1) when the model's input shape cannot hold the images of ``dataset`` (default:
    the dataset the checkpoint records), e.g. a checkpoint that records 28x28 inputs but the 8x8 digits data:
    its in_shape or dataset entry is wrong. Unknown dataset names are not checked here."""
    ds = dataset or lm.dataset
    if not ds:
        return
    from lingraft.data.datasets import DATASETS, dataset_info

    if str(ds).lower() not in DATASETS:
        return
    info = dataset_info(ds)
    if _prod(info.in_shape) != _prod(lm.in_shape):
        raise LingraftError(
            f"{lm.source} {lm.path} takes inputs {tuple(lm.in_shape)} but its dataset {ds} has "
            f"{tuple(info.in_shape)} images; its in_shape or dataset entry is wrong: "
            "re-create it with the right ones"
        )


def _prod(t):
    out = 1
    for v in t:
        out *= int(v)
    return out
