"""Load a network from a lingraft checkpoint (.pt), an ONNX file, or the shipped default model."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

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


def load_model(path: str | os.PathLike | None, dataset: str | None = None, input_shape=None) -> LoadedModel:
    """Load ``path`` (None = the shipped default). ``dataset`` overrides/asserts the checkpoint's dataset; for
    ONNX files it names the data the network expects (its input shape must match)."""
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
    if p.suffix.lower() == ".onnx" or (p.suffix.lower() not in (".pt", ".pth", ".ckpt") and not head.startswith(b"PK")):
        from lingraft.io.onnx import load_onnx

        gm = load_onnx(p)
        in_shape = tuple(gm.input_shape)
        if input_shape is not None and tuple(input_shape) != in_shape:
            raise UsageError(f"--input-shape {tuple(input_shape)} does not match the ONNX input {in_shape}")
        if dataset is not None:
            from lingraft.data.datasets import dataset_info

            info = dataset_info(dataset)
            if int(_prod(info.in_shape)) != int(_prod(in_shape)):
                raise UsageError(f"dataset {dataset} has inputs {info.in_shape} but the ONNX model takes {in_shape}")
        return LoadedModel(gm, in_shape, dataset, "onnx", str(p))
    from lingraft.io.checkpoint import load_checkpoint

    model, ckpt = load_checkpoint(p)
    in_shape = tuple(ckpt["arch_kwargs"]["in_shape"])
    ds = ckpt.get("dataset")
    if dataset is not None and ds is not None and dataset.lower() != str(ds).lower():
        from lingraft.data.datasets import dataset_info

        info = dataset_info(dataset)
        if tuple(info.in_shape) != in_shape:
            raise UsageError(f"model {p.name} takes {in_shape} inputs ({ds}) but dataset {dataset} has {info.in_shape}")
    return LoadedModel(model, in_shape, dataset or ds, "checkpoint", str(p), ckpt.get("arch"), ckpt.get("meta", {}))


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
