"""Checkpoints: round trips (plain and grafted), sidecar, and every way a file can be wrong."""

from __future__ import annotations

import hashlib
import json
import os
import pickle

import pytest
import torch
from torch import nn

from lingraft.errors import LingraftError, UsageError
from lingraft.io.checkpoint import load_checkpoint, replace_module, save_checkpoint, sidecar_path
from lingraft.models import create_model
from lingraft.models.layers import GraftedReLU

MNIST_KW = {"in_shape": [1, 28, 28], "num_classes": 10, "mean": [0.1307], "std": [0.3081]}


def _model(arch="mlp", seed=0, **kw):
    torch.manual_seed(seed)
    return create_model(arch, **(kw or MNIST_KW))


def _graft(model: nn.Module, name: str, x: torch.Tensor, seed: int = 1) -> GraftedReLU:
    """Replace ReLU ``name`` by a GraftedReLU with a random mask and random a, b."""
    shapes = {}
    h = dict(model.named_modules())[name].register_forward_hook(lambda m, i, o: shapes.__setitem__("s", o.shape[1:]))
    model(x)
    h.remove()
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(shapes["s"], generator=g) < 0.3).float()
    layer = GraftedReLU(shapes["s"], mask)
    with torch.no_grad():
        layer.a.copy_(torch.rand(shapes["s"], generator=g))
        layer.b.copy_(torch.randn(shapes["s"], generator=g) * 0.1)
    replace_module(model, name, layer)
    return layer


def test_roundtrip_plain_with_sidecar(tmp_path):
    model = _model("mlp")
    x = torch.rand(5, 1, 28, 28)
    path = tmp_path / "m.pt"
    save_checkpoint(
        path,
        model,
        arch="mlp",
        arch_kwargs=MNIST_KW,
        dataset="mnist",
        meta={"command": "lingraft train --arch mlp", "acc": 0.9, "shape": (1, 2)},
    )
    loaded, info = load_checkpoint(path)
    assert not loaded.training
    assert torch.equal(loaded(x), model(x))
    assert "state_dict" not in info and info["arch"] == "mlp" and info["grafted"] == {}
    assert info["meta"]["command"] == "lingraft train --arch mlp" and info["meta"]["shape"] == [1, 2]
    side = json.loads(sidecar_path(path).read_text())
    assert side["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert "state_dict" not in side and side["arch_kwargs"] == MNIST_KW and side["lingraft_version"]
    # the file is a plain weights-only torch file
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "lingraft-checkpoint" and raw["format_version"] == 1


@pytest.mark.parametrize("arch,name", [("cnn-b", "3"), ("resnet-4b", "block1.relu1"), ("mlp", "3")])
def test_roundtrip_grafted(tmp_path, arch, name):
    model = _model(arch).eval()
    x = torch.rand(4, 1, 28, 28)
    plain = model(x).detach()
    layer = _graft(model, name, x)
    assert layer.num_grafted > 0
    out = model(x).detach()
    assert not torch.allclose(out, plain)  # grafting changed the function, so the test can tell them apart
    path = tmp_path / "g.pt"
    save_checkpoint(path, model, arch=arch, arch_kwargs=MNIST_KW, dataset="mnist", meta={})
    loaded, info = load_checkpoint(path)
    assert info["grafted"] == {name: list(layer.shape)}
    got = dict(loaded.named_modules())[name]
    assert isinstance(got, GraftedReLU) and torch.equal(got.mask, layer.mask)
    assert torch.equal(loaded(x), out)


def test_malicious_pickle_never_runs(tmp_path):
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    raw = tmp_path / "evil.pkl"
    raw.write_bytes(pickle.dumps({"format": "lingraft-checkpoint", "x": Evil()}))
    zipped = tmp_path / "evil.pt"
    torch.save({"format": "lingraft-checkpoint", "x": Evil()}, zipped)  # torch.save pickles it, nothing runs
    for p in (raw, zipped):
        with pytest.raises(LingraftError, match="never runs code") as e:
            load_checkpoint(p)
        assert "\n" not in str(e.value)
    assert not marker.exists()


def test_bare_state_dict_is_explained(tmp_path):
    p = tmp_path / "bare.pt"
    torch.save(_model().state_dict(), p)
    with pytest.raises(LingraftError, match="bare state_dict .*save_checkpoint"):
        load_checkpoint(p)


def test_file_errors(tmp_path):
    with pytest.raises(LingraftError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(LingraftError, match="empty"):
        load_checkpoint(tmp_path / "empty.pt")
    good = tmp_path / "good.pt"
    save_checkpoint(good, _model(), arch="mlp", arch_kwargs=MNIST_KW, dataset="mnist", meta={})
    data = good.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(LingraftError, match="truncated or corrupted"):
        load_checkpoint(tmp_path / "trunc.pt")
    (tmp_path / "text.pt").write_text("name,acc\nmlp,0.9\n")
    with pytest.raises(LingraftError, match="not a PyTorch file"):
        load_checkpoint(tmp_path / "text.pt")
    torch.save({"epoch": 3, "model": {}}, tmp_path / "other.pt")
    with pytest.raises(LingraftError, match="not a lingraft checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(UsageError, match="sidecar"):
        save_checkpoint(tmp_path / "x.json", _model(), arch="mlp", arch_kwargs=MNIST_KW, dataset="mnist", meta={})


def _edit(src, dst, fn):
    ck = torch.load(src, weights_only=True)
    fn(ck)
    torch.save(ck, dst)


def test_unknown_arch_and_state_dict_mismatch(tmp_path):
    good = tmp_path / "good.pt"
    save_checkpoint(good, _model(), arch="mlp", arch_kwargs=MNIST_KW, dataset="mnist", meta={})
    _edit(good, tmp_path / "arch.pt", lambda c: c.__setitem__("arch", "resnet-99"))
    with pytest.raises(LingraftError, match="'resnet-99'.*does not know"):
        load_checkpoint(tmp_path / "arch.pt")
    _edit(good, tmp_path / "miss.pt", lambda c: c["state_dict"].pop("2.weight"))
    with pytest.raises(LingraftError, match=r"missing 2\.weight"):
        load_checkpoint(tmp_path / "miss.pt")
    _edit(good, tmp_path / "extra.pt", lambda c: c["state_dict"].__setitem__("9.bias", torch.zeros(1)))
    with pytest.raises(LingraftError, match=r"unexpected 9\.bias"):
        load_checkpoint(tmp_path / "extra.pt")
    _edit(good, tmp_path / "shape.pt", lambda c: c["state_dict"].__setitem__("2.bias", torch.zeros(7)))
    with pytest.raises(LingraftError, match=r"'2\.bias' has shape \[7\]"):
        load_checkpoint(tmp_path / "shape.pt")
    _edit(good, tmp_path / "future.pt", lambda c: c.__setitem__("format_version", 99))
    with pytest.raises(LingraftError, match="upgrade lingraft"):
        load_checkpoint(tmp_path / "future.pt")


def test_replace_module_errors():
    model = _model("resnet-4b")
    new = nn.Identity()
    replace_module(model, "block2.relu2", new)
    assert model.block2.relu2 is new
    with pytest.raises(LingraftError, match="no submodule"):
        replace_module(model, "block9.relu1", nn.Identity())
    with pytest.raises(LingraftError, match="no submodule"):
        replace_module(model, "block1.nothing", nn.Identity())


# ------------------------------------------------------------------------------------------ masks and integrity


def _grafted_ckpt(tmp_path, name="g.pt"):
    model = _model("mlp").eval()
    x = torch.rand(4, 1, 28, 28)
    layer = _graft(model, "3", x)
    path = tmp_path / name
    save_checkpoint(path, model, arch="mlp", arch_kwargs=MNIST_KW, dataset="mnist", meta={"ratio": 0.3})
    return path, layer


@pytest.mark.parametrize("bad", [0.2, 0.7, float("nan"), 2.0, -1.0])
def test_non_binary_mask_is_refused_on_load(tmp_path, bad):
    """The bound engine bounds a*x+b where mask > 0.5 but the model computes relu((1-m)x) + m(ax+b): a mask that
    is not 0/1 would make every bound wrong, so such a checkpoint must not load."""
    path, layer = _grafted_ckpt(tmp_path)

    def poison(c):
        m = c["state_dict"]["3.mask"]
        m.view(-1)[:3] = bad
        m.view(-1)[-1] = 0.7 if bad != 0.7 else 0.2

    _edit(path, tmp_path / "bad.pt", poison)
    with pytest.raises(LingraftError) as e:
        load_checkpoint(tmp_path / "bad.pt")
    msg = str(e.value)
    assert "\n" not in msg and "'3'" in msg and "0/1" in msg and "bad.pt" in msg and "re-create" in msg


def test_grafted_relu_refuses_non_binary_mask_in_load_state_dict():
    layer = GraftedReLU((4,), torch.tensor([1.0, 0.0, 1.0, 0.0]))
    sd = layer.state_dict()
    sd["mask"] = torch.tensor([1.0, 0.5, 0.0, 0.0])
    with pytest.raises(RuntimeError, match="0/1"):
        layer.load_state_dict(sd)
    assert torch.equal(layer.mask, torch.tensor([1.0, 0.0, 1.0, 0.0]))  # unchanged
    sd["mask"] = torch.tensor([0.0, 1.0, 1.0, 0.0])
    layer.load_state_dict(sd)
    assert layer.num_grafted == 2


def _flip_weight_bytes(path, n=50):
    """Flip ``n`` bytes inside the first weight tensor's data (the zip structure stays intact, so torch loads it)."""
    ck = torch.load(path, weights_only=True)
    w = next(v for k, v in ck["state_dict"].items() if k.endswith("weight")).numpy().tobytes()
    raw = bytearray(path.read_bytes())
    off = bytes(raw).find(w[:64])
    assert off > 0
    for i in range(n):
        raw[off + 100 + i] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_flipped_bytes_do_not_match_the_sidecar(tmp_path):
    path, _ = _grafted_ckpt(tmp_path)
    torch.load(path, weights_only=True)
    _flip_weight_bytes(path)
    torch.load(path, weights_only=True)  # torch itself does not notice
    with pytest.raises(LingraftError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "does not match its sidecar" in msg and "re-copy" in msg
    # without the sidecar there is nothing to check against: it loads (as any .pt copied alone does)
    sidecar_path(path).unlink()
    load_checkpoint(path)


def test_foreign_json_next_to_a_checkpoint_is_not_its_sidecar(tmp_path):
    """``lingraft certify model.pt --json model.json`` puts a result file where the sidecar would be."""
    path, _ = _grafted_ckpt(tmp_path)
    sidecar_path(path).write_text(json.dumps({"command": "certify", "clean_acc": 0.9}))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_checkpoint(path)
    assert json.loads(sidecar_path(path).read_text())["command"] == "certify"  # left alone


class _Killed(BaseException):
    """Stands in for SIGKILL: nothing after the raising call runs (BaseException, like KeyboardInterrupt)."""


@pytest.mark.parametrize("kill_at", range(4))
def test_a_kill_during_save_never_leaves_wrong_metadata(tmp_path, monkeypatch, kill_at):
    """Kill the second save of a checkpoint at each file-system step (each rename and each fsync): the next load
    either gets the old checkpoint or the new one, and the metadata it returns and the sidecar both describe that
    file; a stale sidecar is repaired with a warning, never trusted."""
    import lingraft.io.files as lio

    path, _ = _grafted_ckpt(tmp_path, "m.pt")
    model2 = _model("mlp", seed=5).eval()
    _graft(model2, "3", torch.rand(4, 1, 28, 28), seed=7)
    calls = {"n": 0}
    real_replace, real_fsync = os.replace, os.fsync

    def counted(real):
        def f(*a, **k):
            if calls["n"] == kill_at:
                calls["n"] += 1
                raise _Killed()
            calls["n"] += 1
            return real(*a, **k)

        return f

    monkeypatch.setattr(lio.os, "replace", counted(real_replace))
    monkeypatch.setattr(lio.os, "fsync", counted(real_fsync))
    with pytest.raises(_Killed):
        save_checkpoint(path, model2, arch="mlp", arch_kwargs=MNIST_KW, dataset="mnist", meta={"ratio": 0.5})
    monkeypatch.setattr(lio.os, "replace", real_replace)
    monkeypatch.setattr(lio.os, "fsync", real_fsync)
    import warnings

    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        _, info = load_checkpoint(path)
    raw = torch.load(path, weights_only=True)
    assert info["meta"] == raw["meta"]
    side = json.loads(sidecar_path(path).read_text())
    assert side["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest(), "sidecar does not describe the .pt"
    assert side["meta"] == raw["meta"] and side["grafted"] == raw["grafted"]
    warned = [str(x.message) for x in w if "sidecar" in str(x.message)]
    if warned:  # only a kill between the sidecar and the .pt rename leaves a stale sidecar; the old .pt wins
        assert raw["meta"]["ratio"] == 0.3 and "interrupted" in warned[0] and "\n" not in warned[0]
    assert bool(warned) == (kill_at == 3)  # steps: fsync .pt temp, fsync sidecar temp, rename sidecar, rename .pt
    load_checkpoint(path)  # the rewritten sidecar now matches: no further warning
    # and the next save heals everything, temp files included
    save_checkpoint(path, model2, arch="mlp", arch_kwargs=MNIST_KW, dataset="mnist", meta={"ratio": 0.5})
    _, info = load_checkpoint(path)
    assert info["meta"]["ratio"] == 0.5
    assert json.loads(sidecar_path(path).read_text())["meta"]["ratio"] == 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.pt"]
