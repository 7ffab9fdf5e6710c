"""Tests for lingraft.io.onnx: ONNX import (real VNN-COMP files, synthetic graphs), export round trips, errors."""

from __future__ import annotations

import copy
import operator
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from lingraft.errors import LingraftError, UnsupportedModelError
from lingraft.io.onnx import export_onnx, list_unsupported_ops, load_onnx, run_onnxruntime
from lingraft.models import create_model, list_models
from lingraft.models.attention import SASA, ACmix
from lingraft.models.layers import GraftedReLU, Normalize

torch.set_num_threads(1)

from conftest import SHARED as VNNCOMP  # noqa: E402  (after the torch thread setting above)

VNN_FILES = sorted(VNNCOMP.glob("**/*.onnx")) if VNNCOMP.is_dir() else []

# What the bound engine understands (see the brief / lingraft.io.onnx docstring).
_MODULES = (
    nn.Linear,
    nn.Conv2d,
    nn.ReLU,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.AvgPool2d,
    nn.MaxPool2d,
    nn.Flatten,
    nn.ZeroPad2d,
    nn.ConstantPad2d,
    nn.Identity,
    Normalize,
    SASA,
    ACmix,
)
_FUNCTIONS = {
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    torch.flatten,
    torch.reshape,
    torch.permute,
    torch.transpose,
    torch.squeeze,
    torch.unsqueeze,
    torch.cat,
    torch.matmul,
    torch.neg,
    torch.nn.functional.relu,
}


def assert_vocabulary(gm) -> None:
    for n in gm.graph.nodes:
        if n.op == "call_module":
            assert isinstance(gm.get_submodule(n.target), _MODULES), (n.target, gm.get_submodule(n.target))
        elif n.op == "call_function":
            assert n.target in _FUNCTIONS, n.target
            if n.target is torch.reshape:
                assert n.args[1][0] == -1  # batch kept in dim 0
            if n.target is torch.permute:
                assert n.args[1][0] == 0
            if n.target in (operator.mul, operator.truediv):
                assert not isinstance(n.args[1], torch.fx.Node) or n.args[1].op == "get_attr"
        else:
            assert n.op in ("placeholder", "get_attr", "output"), n.op


def close(got: torch.Tensor, ref: torch.Tensor, tol: float = 1e-5) -> float:
    """Max abs diff, asserted <= tol * max(1, max|ref|) (float32 round-off grows with the output size)."""
    got, ref = got.double().reshape(ref.shape), ref.double()
    d = float((got - ref).abs().max())
    assert d <= tol * max(1.0, float(ref.abs().max())), d
    return d


# ---------------------------------------------------------------------------------------------------------------
# real VNN-COMP files


@pytest.mark.vnncomp
@pytest.mark.skipif(not VNN_FILES, reason="shared/vnncomp not present")
@pytest.mark.parametrize("path", VNN_FILES, ids=lambda p: p.name)
def test_vnncomp_file_matches_onnxruntime(path):
    assert list_unsupported_ops(path) == []
    gm = load_onnx(path)
    assert_vocabulary(gm)
    assert gm.onnx_path == str(path)
    n_in = int(np.prod(gm.input_shape))
    assert n_in >= 1
    for batch in (1, 4):
        x = torch.rand(batch, *gm.input_shape, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            y = gm(x)
        assert tuple(y.shape) == (batch, *gm.output_shape)
        close(y, run_onnxruntime(path, x))


@pytest.mark.vnncomp
@pytest.mark.skipif(not VNN_FILES, reason="shared/vnncomp not present")
def test_vnncomp_shapes_and_structure():
    known = {
        "mnist-net_256x2.onnx": ((784, 1), (10,), 3),
        "Convnet_maxpool.onnx": ((1, 28, 28), (10,), 2),
        "test_sat.onnx": ((1, 1, 5), (5,), 7),
        "test_small.onnx": ((1,), (1,), 3),
    }
    for p in VNN_FILES:
        if p.name in known:
            gm = load_onnx(p, check=False)
            ins, outs, n_lin = known[p.name]
            assert gm.input_shape == ins and gm.output_shape == outs, p.name
            layers = [m for m in gm.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
            assert len(layers) == n_lin, p.name  # MatMul + Add fused into one Linear


# ---------------------------------------------------------------------------------------------------------------
# export -> import round trips


def _graft(model: nn.Module, in_shape, seed: int = 0) -> nn.Module:
    """Replace every nn.ReLU by a GraftedReLU with a random 50% mask and random (a, b)."""
    shapes = {}
    hooks = [
        m.register_forward_hook(lambda m, i, o, name=name: shapes.__setitem__(name, tuple(o.shape[1:])))
        for name, m in model.named_modules()
        if isinstance(m, nn.ReLU)
    ]
    with torch.no_grad():
        model(torch.zeros(1, *in_shape))
    for h in hooks:
        h.remove()
    g = torch.Generator().manual_seed(seed)
    for name, shape in shapes.items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        gr = GraftedReLU(shape, (torch.rand(shape, generator=g) < 0.5).float())
        with torch.no_grad():
            gr.a.uniform_(-1, 1, generator=g)
            gr.b.uniform_(-0.2, 0.2, generator=g)
        setattr(parent, attr, gr)
    assert shapes, "model has no nn.ReLU to graft"
    return model


#: registry models with local attention (Softmax, windows as a constant-index Gather): the importer rebuilds each
#: block as one SASA/ACmix layer (lingraft.io.onnx.attention_fusion; more in tests/test_onnx_attention.py)
ATTENTION = {"acmix-s", "sasa-s"}


def _export_registry_model(name, grafted, tmp_path):
    """Export registry model ``name`` (optionally grafted) for MNIST-shaped inputs; checks the export itself."""
    in_shape = (1, 28, 28)
    torch.manual_seed(0)
    model = create_model(name, in_shape=in_shape, num_classes=10, mean=(0.1307,), std=(0.3081,)).eval()
    if grafted:
        _graft(model, in_shape)
    path = tmp_path / f"{name}.onnx"
    real = torch.rand(3, *in_shape, generator=torch.Generator().manual_seed(7))
    info = export_onnx(model, path, in_shape, check_inputs=real)
    assert path.exists() and info["path"] == str(path)
    assert info["max_abs_diff"] <= 1e-5 and info["input_shape"] == in_shape
    proto = onnx.load(str(path))
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [13]
    assert info["num_nodes"] == len(proto.graph.node)
    assert [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim] == [1, *in_shape]
    return model, path, info, real, in_shape, proto


@pytest.mark.parametrize("grafted", [False, True], ids=["plain", "grafted"])
@pytest.mark.parametrize("name", sorted(list_models()))
def test_roundtrip_registry_models(name, grafted, tmp_path):
    model, path, info, real, in_shape, proto = _export_registry_model(name, grafted, tmp_path)
    assert list_unsupported_ops(path) == []
    # attention layers are not in the fx writer's vocabulary: torch's TorchScript exporter writes them
    assert info["exporter"] == ("torchscript" if name in ATTENTION else "lingraft-fx")
    gm = load_onnx(path)
    assert_vocabulary(gm)
    assert gm.input_shape == in_shape and gm.output_shape == (10,)
    x = torch.cat([real, torch.rand(4, *in_shape, generator=torch.Generator().manual_seed(8))])
    with torch.no_grad():
        close(gm(x), model(x))
    ops = {n.op_type for n in proto.graph.node}
    assert {"Sub", "Div"} <= ops  # normalization baked in
    from lingraft.bounds import BoundedNetwork, input_box

    net_orig, net_back = BoundedNetwork(model, in_shape), BoundedNetwork(gm, in_shape)
    if grafted:
        assert "Mul" in ops and "Relu" in ops
        # the importer's Mul/Relu/Mul/Add/Add chains fuse back into grafted ReLUs with the same masks
        orig = [op.num_grafted for _, op in net_orig.relu_layers()]
        back = [op.num_grafted for _, op in net_back.relu_layers()]
        assert back == orig and sum(back) > 0
    # the same CROWN bounds through the imported graph
    xl, xu = input_box(real[:1], 0.01)
    ref = net_orig.compute_bounds(xl, xu, "crown")
    got = net_back.compute_bounds(xl, xu, "crown")
    close(got.lower, ref.lower)
    close(got.upper, ref.upper)


class _ManualGraft(nn.Module):
    """conv -> relu(s*x) + t*x + c -> linear, written out by hand (as an ONNX import arrives)."""

    def __init__(self, s, t, c):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 4, 3, stride=2)
        self.fc = nn.Linear(4 * 3 * 3, 3)
        self.register_buffer("s", s)
        self.register_buffer("t", t)
        self.register_buffer("c", c)

    def forward(self, x):
        h = self.conv(x)
        h = torch.relu(h * self.s) + h * self.t + self.c
        return self.fc(h.flatten(1))


@pytest.mark.parametrize("binary", [True, False], ids=["fused", "not-fused"])
def test_grafted_relu_pattern_fusion(binary):
    from lingraft.bounds import BoundedNetwork, input_box

    g = torch.Generator().manual_seed(0)
    shape = (4, 3, 3)
    mask = torch.rand(shape, generator=g) < 0.5
    s = (~mask).float() if binary else torch.rand(shape, generator=g) + 0.1
    t = torch.where(mask, torch.rand(shape, generator=g) - 0.5, torch.zeros(shape))
    c = torch.where(mask, torch.rand(shape, generator=g) * 0.2, torch.zeros(shape))
    model = _ManualGraft(s, t, c).eval()
    net = BoundedNetwork(model, (1, 7, 7))
    ((_, relu),) = net.relu_layers()
    assert relu.num_grafted == (int(mask.sum()) if binary else 0)
    x = torch.rand(5, 1, 7, 7, generator=g)
    with torch.no_grad():
        close(net.forward(x), model(x))
    xl, xu = input_box(x, 0.05)
    res = net.compute_bounds(xl, xu, "crown")
    pts = xl + (xu - xl) * torch.rand(200, *xl.shape, generator=g)
    with torch.no_grad():
        out = model(pts.reshape(-1, 1, 7, 7)).reshape(200, 5, 3)
    assert bool((out >= res.lower - 1e-5).all() and (out <= res.upper + 1e-5).all())


def test_export_ungrafted_graftedrelu_is_plain_relu(tmp_path):
    model = create_model("mlp", in_shape=(1, 4, 4)).eval()
    model[3] = GraftedReLU((100,))  # all-zero mask: exactly a ReLU
    info = export_onnx(model, tmp_path / "m.onnx", (1, 4, 4))
    ops = [n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node]
    assert ops.count("Relu") == 2 and "Mul" not in ops
    assert info["num_nodes"] == len(ops)


def test_export_dynamic_batch_and_check_failure(tmp_path):
    model = create_model("cnn-b", in_shape=(3, 8, 8), mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3)).eval()
    p = tmp_path / "dyn.onnx"
    info = export_onnx(model, p, (3, 8, 8), dynamic_batch=True, opset=17)
    assert info["onnx_input_shape"][0] == "batch" and info["opset"] == 17
    import onnxruntime as ort

    x = torch.rand(5, 3, 8, 8)
    y = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {info["input_name"]: x.numpy()})[0]
    with torch.no_grad():
        close(torch.from_numpy(y), model(x))
    gm = load_onnx(p)  # symbolic batch dim is accepted
    assert gm.input_shape == (3, 8, 8)
    with torch.no_grad():
        close(gm(x), model(x))
    # an impossible tolerance makes the check fail: the file is deleted, the error is one line
    p2 = tmp_path / "bad.onnx"
    with pytest.raises(LingraftError, match="export check failed") as ei:
        export_onnx(model, p2, (3, 8, 8), tol=-1.0)
    assert not p2.exists() and "\n" not in str(ei.value)


# ---------------------------------------------------------------------------------------------------------------
# synthetic ONNX graphs (operator coverage)


def _save(tmp_path, nodes, inp, out, inits, opset=13, name="m.onnx"):
    graph = helper.make_graph(
        nodes, "g", [inp], [out], initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    p = tmp_path / name
    onnx.save(model, str(p))
    return p


def _f32(*shape, seed=0, scale=0.5):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def test_synthetic_conv_graph_all_ops(tmp_path):
    """Sub/Div normalization, asymmetric-pad Conv + folded BN, pools, Pad, Transpose, Shape->Reshape chain,
    Gemm(alpha, beta, transB=0), Unsqueeze/Squeeze, Neg, Sum, Concat, const - x, MatMul + Add, Identity."""
    c, h = 3, 8
    r = np.random.default_rng(0)
    inits = {
        "mean": np.array([0.4, 0.5, 0.6], np.float32).reshape(1, 3, 1, 1),
        "std": np.array([0.2, 0.3, 0.25], np.float32).reshape(1, 3, 1, 1),
        "W": _f32(4, 3, 3, 3),
        "B": _f32(4, seed=1),
        "s": (r.random(4) + 0.5).astype(np.float32),
        "bb": _f32(4, seed=2),
        "m": _f32(4, seed=3),
        "v": (r.random(4) + 0.5).astype(np.float32),
        "pads": np.array([0, 0, 1, 0, 0, 0, 0, 1], np.int64),
        "zero": np.array([0], np.int64),
        "minus1": np.array([-1], np.int64),
        "G": _f32(64, 6, seed=4),
        "Gc": _f32(6, seed=5),
        "ax1": np.array([1], np.int64),
        "k": np.array(2.0, np.float32),
        "c3": _f32(12, seed=6),
        "M": _f32(12, 5, seed=7),
        "Mb": _f32(5, seed=8),
    }
    n = helper.make_node
    nodes = [
        n("Sub", ["x", "mean"], ["a0"], name="sub"),
        n("Div", ["a0", "std"], ["a1"], name="div"),
        n("Conv", ["a1", "W", "B"], ["a2"], name="conv", pads=[1, 0, 0, 1], kernel_shape=[3, 3]),
        n("BatchNormalization", ["a2", "s", "bb", "m", "v"], ["a3"], name="bn", epsilon=1e-3),
        n("Relu", ["a3"], ["a4"], name="relu"),
        n("AveragePool", ["a4"], ["a5"], name="avg", kernel_shape=[2, 2], strides=[1, 1]),
        n("Pad", ["a5", "pads"], ["a6"], name="pad", mode="constant"),
        n("MaxPool", ["a6"], ["a7"], name="max", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        n("Transpose", ["a7"], ["a8"], name="tr", perm=[0, 2, 3, 1]),
        n("Transpose", ["a8"], ["a9"], name="tr_back", perm=[0, 3, 1, 2]),
        n("Identity", ["a9"], ["a10"], name="id"),
        # x.view(x.size(0), -1) as exported by torch: Shape -> Gather -> Unsqueeze -> Concat -> Reshape
        n("Shape", ["a10"], ["sh"], name="shape"),
        n("Gather", ["sh", "zero"], ["b0"], name="gather", axis=0),
        n("Concat", ["b0", "minus1"], ["newshape"], name="cat_shape", axis=0),
        n("Reshape", ["a10", "newshape"], ["a11"], name="reshape"),
        n("Gemm", ["a11", "G", "Gc"], ["a12"], name="gemm", alpha=0.5, beta=2.0),
        n("Unsqueeze", ["a12", "ax1"], ["a13"], name="unsq"),
        n("Squeeze", ["a13", "ax1"], ["a14"], name="sq"),
        n("Neg", ["a14"], ["a15"], name="neg"),
        n("Sum", ["a15", "a12", "a14"], ["a16"], name="sum"),
        n("Concat", ["a16", "a12"], ["a17"], name="cat", axis=1),
        n("Mul", ["k", "a17"], ["a18"], name="mul"),
        n("Sub", ["c3", "a18"], ["a19"], name="rsub"),
        n("MatMul", ["a19", "M"], ["a20"], name="mm"),
        n("Add", ["Mb", "a20"], ["y"], name="add"),
    ]
    p = _save(
        tmp_path,
        nodes,
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, h, h]),
        helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5]),
        inits,
    )
    gm = load_onnx(p)
    assert_vocabulary(gm)
    assert gm.input_shape == (3, 8, 8) and gm.output_shape == (5,)
    mods = [type(m) for m in gm.modules()]
    assert nn.BatchNorm2d not in mods  # folded into the conv
    assert nn.ZeroPad2d in mods  # asymmetric conv pads
    assert mods.count(nn.Linear) == 2  # Gemm, MatMul + Add fused
    x = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        close(gm(x), run_onnxruntime(p, x))
    gm2 = copy.deepcopy(gm)
    assert gm2.input_shape == gm.input_shape and gm2.onnx_input_name == "x"


def test_synthetic_unfolded_batchnorm_and_global_pool(tmp_path):
    inits = {
        "s": np.array([1.5, 0.5], np.float32),
        "b": np.array([0.1, -0.2], np.float32),
        "m": np.array([0.3, 0.6], np.float32),
        "v": np.array([0.5, 2.0], np.float32),
        "W": _f32(3, 2),
    }
    n = helper.make_node
    nodes = [
        n("Relu", ["x"], ["r"]),
        n("BatchNormalization", ["r", "s", "b", "m", "v"], ["bn"]),
        n("GlobalAveragePool", ["bn"], ["g"]),
        n("Flatten", ["g"], ["f"]),
        n("Gemm", ["f", "W"], ["y"], transB=1),
    ]
    p = _save(
        tmp_path,
        nodes,
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 5, 5]),
        helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3]),
        inits,
        opset=11,
    )
    gm = load_onnx(p)
    assert_vocabulary(gm)
    assert any(isinstance(m, nn.BatchNorm2d) for m in gm.modules())
    x = torch.rand(4, 2, 5, 5)
    with torch.no_grad():
        close(gm(x), run_onnxruntime(p, x))


def test_synthetic_implicit_batch_matrix_input(tmp_path):
    """Input [4, 3] with dim 0 != 1: the whole tensor is one sample; W @ X and a transpose over ONNX dim 0."""
    inits = {"W": _f32(5, 4), "C": _f32(5, 3, seed=1), "V": _f32(5, 2, seed=2)}
    n = helper.make_node
    nodes = [
        n("MatMul", ["W", "x"], ["a"]),
        n("Add", ["a", "C"], ["b"]),
        n("Relu", ["b"], ["c"]),
        n("Transpose", ["c"], ["d"], perm=[1, 0]),
        n("MatMul", ["d", "V"], ["y"]),
    ]
    p = _save(
        tmp_path,
        nodes,
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 3]),
        helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 2]),
        inits,
    )
    gm = load_onnx(p)
    assert_vocabulary(gm)
    assert gm.input_shape == (4, 3) and gm.output_shape == (3, 2)
    x = torch.rand(5, 4, 3)
    with torch.no_grad():
        close(gm(x), run_onnxruntime(p, x))


def test_torchscript_exported_model_imports(tmp_path):
    """A model exported by torch's own exporter (view(x.size(0), -1), BatchNorm, cat, permute)."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.fc = nn.Linear(2 * 4 * 6 * 6, 7)

        def forward(self, x):
            y = torch.relu(self.bn(self.conv(x)))
            y = torch.cat([y, y.permute(0, 1, 3, 2) * 0.5], dim=1)
            return self.fc(y.view(y.size(0), -1)) - 1.0

    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2)
    p = tmp_path / "ts.onnx"
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(net, (torch.rand(1, 2, 6, 6),), str(p), dynamo=False, opset_version=13)
    except Exception as e:  # the legacy exporter may be removed from future torch
        pytest.skip(f"torch.onnx.export(dynamo=False) unavailable: {e}")
    gm = load_onnx(p)
    assert_vocabulary(gm)
    x = torch.rand(3, 2, 6, 6)
    with torch.no_grad():
        close(gm(x), net(x))


# ---------------------------------------------------------------------------------------------------------------
# bad inputs


def test_missing_empty_and_corrupt_files(tmp_path):
    with pytest.raises(LingraftError, match="not found"):
        load_onnx(tmp_path / "nope.onnx")
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(LingraftError, match="empty"):
        load_onnx(empty)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(LingraftError) as ei:
        load_onnx(junk)
    assert "ONNX" in str(ei.value) and "\n" not in str(ei.value)
    text = tmp_path / "text.onnx"
    text.write_text("hello, I am not a network\n")
    with pytest.raises(LingraftError):
        list_unsupported_ops(text)
    with pytest.raises(LingraftError, match="directory"):
        load_onnx(tmp_path)


def test_unsupported_ops_are_all_named(tmp_path):
    n = helper.make_node
    inits = {"W": _f32(4, 6)}
    nodes = [
        n("MatMul", ["x", "W"], ["a"], name="fc"),
        n("Sigmoid", ["a"], ["b"], name="sig1"),
        n("Relu", ["b"], ["c"], name="r"),
        n("Mul", ["c", "a"], ["d"], name="sq"),
        n("Softmax", ["d"], ["y"], name="sm1", axis=1),
    ]
    p = _save(
        tmp_path,
        nodes,
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
        helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6]),
        inits,
    )
    assert list_unsupported_ops(p) == [("Sigmoid", "sig1"), ("Mul", "sq"), ("Softmax", "sm1")]
    with pytest.raises(UnsupportedModelError) as ei:
        load_onnx(p)
    msg = str(ei.value)
    assert "\n" not in msg
    for frag in ("Sigmoid (node 'sig1')", "Softmax (node 'sm1')", "Mul (node 'sq'", "lingraft supports:"):
        assert frag in msg, msg


def test_unsupported_lstm(tmp_path):
    n = helper.make_node
    inits = {"Wl": _f32(1, 12, 2), "Rl": _f32(1, 12, 3)}
    nodes = [n("LSTM", ["x", "Wl", "Rl"], ["y"], name="l", hidden_size=3)]
    p = _save(
        tmp_path,
        nodes,
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 1, 2]),
        helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, 1, 1, 3]),
        inits,
    )
    with pytest.raises(UnsupportedModelError, match=r"LSTM \(node 'l'\)"):
        load_onnx(p)


def test_dynamic_non_batch_input_shape(tmp_path):
    n = helper.make_node
    nodes = [n("Relu", ["x"], ["y"])]
    p = _save(
        tmp_path,
        nodes,
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"]),
        helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, "H", "W"]),
        {},
    )
    with pytest.raises(UnsupportedModelError, match="dynamic non-batch dims") as ei:
        load_onnx(p)
    assert "\n" not in str(ei.value)
    assert list_unsupported_ops(p) == []  # the op list does not depend on shapes
    # shape and op problems are reported together, in one line
    nodes = [n("Relu", ["x"], ["a"], name="r"), n("Tanh", ["a"], ["y"], name="t1")]
    p = _save(
        tmp_path,
        nodes,
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "C"]),
        helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "C"]),
        {},
        name="both.onnx",
    )
    with pytest.raises(UnsupportedModelError, match=r"Tanh \(node 't1'\).*dynamic non-batch dims"):
        load_onnx(p)


def test_two_inputs_rejected(tmp_path):
    n = helper.make_node
    graph = helper.make_graph(
        [n("Add", ["x", "z"], ["y"])],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 3]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "two.onnx"))
    with pytest.raises(UnsupportedModelError, match="2 inputs"):
        load_onnx(tmp_path / "two.onnx")


def test_export_writes_a_vnncomp_benchmark(digits_mlp_pt, tmp_path):
    """export --vnnlib-samples: properties whose box is certify's box, an instances.csv that verify runs, and
    answers that agree with certify (verified -> unsat, falsified -> sat)."""
    import json as _json

    from click.testing import CliRunner

    from lingraft.bounds import input_box
    from lingraft.cli.main import cli
    from lingraft.data.datasets import load_dataset, subset
    from lingraft.spec.vnnlib import parse_vnnlib

    out = tmp_path / "bench" / "net.onnx"
    res = CliRunner().invoke(
        cli,
        [
            "export",
            str(digits_mlp_pt),
            "--out",
            str(out),
            "--vnnlib-samples",
            "12",
            "--vnnlib-eps",
            "0.05",
            "--json",
            "-",
        ],
    )
    assert res.exit_code == 0, res.output
    info = _json.loads(res.stdout)["vnnlib"]
    rows = (out.parent / "instances.csv").read_text().splitlines()
    assert len(rows) == len(info["properties"]) == 12 - info["skipped_misclassified"] > 0
    x, y = subset(*load_dataset("digits", "test"), 12)
    first = int(rows[0].split(",")[1].split("_")[1])
    prop = parse_vnnlib(out.parent / rows[0].split(",")[1], num_inputs=64, num_outputs=10)
    xl, xu = input_box(x[first : first + 1], 0.05)
    (reg,) = prop.regions
    assert np.array_equal(reg.lower, xl.flatten().double().numpy()) and np.array_equal(
        reg.upper, xu.flatten().double().numpy()
    )
    assert len(reg.outputs) == 9
    cert = CliRunner().invoke(cli, ["certify", str(digits_mlp_pt), "-n", "12", "--eps", "0.05", "--json", "-"])
    status = {s["index"]: s["status"] for s in _json.loads(cert.stdout)["samples"]}
    ver = CliRunner().invoke(cli, ["verify", "--instances", str(out.parent / "instances.csv"), "--json", "-"])
    assert ver.exit_code == 0, ver.output
    for r in _json.loads(ver.stdout)["instances"]:
        idx = int(Path(r["vnnlib"]).name.split("_")[1])
        want = {"verified": "unsat", "falsified": "sat"}.get(status[idx])
        assert want is None or r["status"] == want, (idx, status[idx], r["status"])
