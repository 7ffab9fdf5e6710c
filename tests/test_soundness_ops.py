"""Soundness over every operation the bound graph accepts, one small random network per operation.

Two registries: torch modules/functions (what the torch.fx graph builder accepts) and ONNX graphs (what the
ONNX importer accepts), binary operations with two input-dependent operands included (a Sub of two bounded
tensors once gave unsound bounds: its second operand's coefficients were swapped). Every case is checked for
IBP, CROWN and alpha-CROWN, lower and upper bounds, against sampled points, box corners and PGD; and the
bound graph's forward must equal the model's. Calls the builder does not model are refused by name.
"""

import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _soundness import check_sound, graft_randomly, random_batchnorm
from torch import nn

from lingraft.bounds import BoundedNetwork
from lingraft.errors import UnsupportedModelError
from lingraft.models.layers import GraftedReLU, Normalize

METHODS = ("ibp", "crown", "alpha-crown")


class Fn(nn.Module):
    """conv -> relu -> body(h, x) -> relu -> linear head; ``body`` holds the operation under test."""

    def __init__(self, body, in_shape=(2, 6, 6), mid=3, head_in=None):
        super().__init__()
        self.conv = nn.Conv2d(in_shape[0], mid, 3, padding=1)
        self.body = body
        self.head_in = head_in
        self.fc = nn.LazyLinear(4) if head_in is None else nn.Linear(head_in, 4)
        self.c = nn.Parameter(torch.randn(mid, in_shape[1], in_shape[2]) * 0.3, requires_grad=False)

    def forward(self, x):
        h = F.relu(self.conv(x))
        y = self.body(self, h, x)
        return self.fc(F.relu(y).flatten(1))


def _fn(body, **kw):
    def make():
        m = Fn(body, **kw)
        with torch.no_grad():
            m(torch.zeros(1, 2, 6, 6))  # materialise the lazy head
        return m

    return make


def _seq(layers):
    return lambda: nn.Sequential(*layers())


# name -> factory of a model on input (2, 6, 6)
TORCH_CASES = {
    # binary ops with two input-dependent operands
    "add_two": _fn(lambda m, h, x: h + m.conv(x) * 0.5),
    "sub_two": _fn(lambda m, h, x: h - m.conv(x)),
    "sub_x_minus_conv": lambda: _XMinusConv(),
    "add_alpha_two": _fn(lambda m, h, x: torch.add(h, m.conv(x), alpha=-2.5)),
    "sub_alpha_two": _fn(lambda m, h, x: torch.sub(h, m.conv(x), alpha=0.5)),
    "method_sub_alpha": _fn(lambda m, h, x: h.sub(m.conv(x), alpha=1.5)),
    "iadd_isub": _fn(lambda m, h, x: _inplace(h, m.conv(x))),
    "self_sub": _fn(lambda m, h, x: h - h + m.conv(x)),
    "cat_two": _fn(lambda m, h, x: torch.cat([h, -m.conv(x)], dim=1)),
    "cat_kwargs": _fn(lambda m, h, x: torch.cat(tensors=(h, m.conv(x)), dim=-1)),
    # one input-dependent operand and a constant
    "add_const_alpha": _fn(lambda m, h, x: torch.add(m.c, h, alpha=-0.7)),
    "sub_const_first": _fn(lambda m, h, x: torch.sub(m.c, h, alpha=2.0)),
    "sub_const_second": _fn(lambda m, h, x: torch.sub(h, m.c, alpha=3.0)),
    "mul_kwarg": _fn(lambda m, h, x: torch.mul(h, other=m.c)),
    "div_const": _fn(lambda m, h, x: torch.div(h, 0.5 + m.c.abs())),
    "neg": _fn(lambda m, h, x: -h + 1.0),
    "transpose_kwargs": _fn(lambda m, h, x: h.transpose(dim0=2, dim1=3)),
    "permute": _fn(lambda m, h, x: h.permute(0, 3, 1, 2)),
    "pad_const": _fn(lambda m, h, x: F.pad(h, (1, 0, 2, 1), value=0.3)),
    "reshape_view_squeeze": _fn(lambda m, h, x: h.reshape(h.shape[0], 3, 36).unsqueeze(1).squeeze(1).view(-1, 3, 6, 6)),
    "matmul_const": _fn(lambda m, h, x: h @ m.c[0]),
    "linear_fn": _fn(lambda m, h, x: F.linear(h, m.c[0], bias=m.c[1, 0])),
    # modules
    "conv_stride_groups": _seq(
        lambda: [nn.Conv2d(2, 4, 3, stride=2, padding=1, groups=2), nn.ReLU(), nn.Flatten(), nn.Linear(36, 4)]
    ),
    "conv_same_valid": _seq(
        lambda: [
            nn.Conv2d(2, 3, 3, padding="same"),
            nn.ReLU(),
            nn.Conv2d(3, 3, 3, padding="valid"),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(48, 4),
        ]
    ),
    "avgpool_padded": _seq(
        lambda: [nn.Conv2d(2, 3, 3), nn.ReLU(), nn.AvgPool2d(2, 1, padding=1), nn.Flatten(), nn.Linear(75, 4)]
    ),
    "maxpool": _seq(
        lambda: [nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(27, 4)]
    ),
    "batchnorm_normalize": _seq(
        lambda: [
            Normalize([0.4, 0.6], [0.3, 0.2]),
            nn.Conv2d(2, 3, 3),
            _bn(nn.BatchNorm2d(3)),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(48, 5),
            _bn(nn.BatchNorm1d(5)),
            nn.ReLU(),
            nn.Dropout(0.3),
            nn.Identity(),
            nn.Linear(5, 4),
        ]
    ),
    "zero_constant_pad": _seq(
        lambda: [
            nn.ZeroPad2d((1, 0, 0, 1)),
            nn.Conv2d(2, 3, 3),
            nn.ReLU(),
            nn.ConstantPad2d(1, -0.2),
            nn.Flatten(),
            nn.Linear(147, 4),
        ]
    ),
    "grafted_relu": lambda: graft_randomly(
        nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 6), nn.ReLU(), nn.Linear(6, 4)),
        (2, 6, 6),
        0.5,
    ),
}


class _XMinusConv(nn.Module):
    """x - conv(x), the audit's random-net pattern (a residual written as a subtraction)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.fc = nn.Linear(72, 4)

    def forward(self, x):
        return self.fc(F.relu(x - self.conv(x)).flatten(1))


def _inplace(h, g):
    h = h * 1.0
    h += g
    h -= 0.5 * g
    return h


def _bn(bn):
    return random_batchnorm(bn)


def _seed(name):
    return zlib.crc32(name.encode()) % 10_000


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", sorted(TORCH_CASES))
def test_torch_op_sound(name, method):
    torch.manual_seed(_seed(name))
    model = TORCH_CASES[name]().eval()
    net = BoundedNetwork(model, (2, 6, 6))
    x = torch.rand(3, 2, 6, 6)
    with torch.no_grad():
        assert torch.allclose(net.forward(x), model(x), atol=1e-5), "bound graph computes another function"
    check_sound(model, (2, 6, 6), 0.1, method, n_points=300)


def test_sub_of_two_bounded_tensors_is_exact_on_a_linear_net():
    """y = W1 x - W2 x over a box: CROWN on a linear net is exact, so any swap of the second operand's
    coefficients shows as a wrong bound (the audit's finding; before the fix the lower bound was too high)."""
    torch.manual_seed(0)
    f1, f2 = nn.Linear(3, 2), nn.Linear(3, 2)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.f1, self.f2 = f1, f2

        def forward(self, x):
            return self.f1(x) - self.f2(x)

    model = M().eval()
    net = BoundedNetwork(model, (3,))
    xl, xu = -torch.ones(1, 3), torch.ones(1, 3)
    W = (f1.weight - f2.weight).detach()
    b = (f1.bias - f2.bias).detach()
    exact_lo = b - W.abs().sum(1)
    exact_up = b + W.abs().sum(1)
    for method in ("crown", "alpha-crown"):
        lo_only = net.compute_bounds(xl, xu, method, bound_upper=False).lower[0]
        both = net.compute_bounds(xl, xu, method)
        assert torch.allclose(lo_only, exact_lo, atol=1e-5), method
        assert torch.allclose(both.lower[0], exact_lo, atol=1e-5) and torch.allclose(both.upper[0], exact_up, atol=1e-5)


# ---- refused by name ----------------------------------------------------------------------------------------------
REFUSED = {
    "div_rounding": (_fn(lambda m, h, x: torch.div(h, 2.0, rounding_mode="floor")), "rounding_mode"),
    "conv_same_dilated": (
        _seq(lambda: [nn.Conv2d(2, 3, 3, padding="same", dilation=2), nn.Flatten(), nn.Linear(108, 4)]),
        "dilation",
    ),
    "conv_dilated": (
        _seq(lambda: [nn.Conv2d(2, 3, 3, padding=2, dilation=2), nn.Flatten(), nn.Linear(108, 4)]),
        "dilation",
    ),
    "conv_reflect_same": (
        _seq(lambda: [nn.Conv2d(2, 3, 3, padding="same", padding_mode="reflect"), nn.Flatten(), nn.Linear(108, 4)]),
        "padding_mode='reflect'",
    ),
    "conv_circular": (
        _seq(lambda: [nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular"), nn.Flatten(), nn.Linear(108, 4)]),
        "padding_mode='circular'",
    ),
    "pad_reflect": (_fn(lambda m, h, x: F.pad(h, (1, 1, 1, 1), mode="reflect")), "pad mode 'reflect'"),
    "mul_two": (_fn(lambda m, h, x: h * m.conv(x)), "bilinear"),
    "unknown_kwarg": (_fn(lambda m, h, x: torch.add(h, 1.0, out=None)), "out="),
    "maxpool_indices": (lambda: _MaxIdx(), "returning several tensors"),
    "hooked": (lambda: _hooked(), "forward hooks"),
}


class _MaxIdx(nn.Module):
    def __init__(self):
        super().__init__()
        self.pool = nn.MaxPool2d(2, return_indices=True)
        self.fc = nn.Linear(18, 4)

    def forward(self, x):
        v, _ = self.pool(x)
        return self.fc(v.flatten(1))


def _hooked():
    m = nn.Sequential(nn.Flatten(), nn.Linear(72, 4), nn.ReLU(), nn.Linear(4, 4))
    m[1].register_forward_hook(lambda mod, i, o: o * 2)
    return m


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_unmodelled_calls_are_refused_by_name(name):
    make, words = REFUSED[name]
    torch.manual_seed(0)
    with pytest.raises(UnsupportedModelError) as e:
        BoundedNetwork(make().eval(), (2, 6, 6))
    assert words in str(e.value)


def test_non_binary_graft_mask_is_refused():
    """relu((1-m)x) + m(ax+b) with m = 0.7 is not a graft: bounding a*x+b there was unsound."""
    m = nn.Sequential(nn.Linear(3, 4), GraftedReLU((4,)), nn.Linear(4, 2))
    with torch.no_grad():
        m[1].mask.copy_(torch.tensor([0.0, 1.0, 0.2, 0.7]))
    with pytest.raises(UnsupportedModelError, match="mask is not 0/1"):
        BoundedNetwork(m.eval(), (3,))


# ---- the ONNX importer ----------------------------------------------------------------------------------------------
onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402

from lingraft.io.onnx import SUPPORTED_ONNX_OPS, load_onnx  # noqa: E402


def _r(*shape, seed, scale=0.5):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def _head():
    """x [1,2,6,6] -> Conv(3) -> Relu: 'h' and Conv(3) of x: 'g' (two input-dependent tensors)."""
    n = helper.make_node
    return (
        [
            n("Conv", ["x", "W1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
            n("Relu", ["c1"], ["h"]),
            n("Conv", ["x", "W2", "b2"], ["g"], pads=[1, 1, 1, 1]),
        ],
        {"W1": _r(3, 2, 3, 3, seed=1), "b1": _r(3, seed=2), "W2": _r(3, 2, 3, 3, seed=3), "b2": _r(3, seed=4)},
    )


def _tail(src, n_in):
    """src -> Relu -> Flatten -> Gemm(4)."""
    n = helper.make_node
    return (
        [n("Relu", [src], ["t0"]), n("Flatten", ["t0"], ["t1"]), n("Gemm", ["t1", "WF", "bF"], ["y"], transB=1)],
        {"WF": _r(4, n_in, seed=5), "bF": _r(4, seed=6)},
    )


def _mid(nodes, inits, out, n_out):
    def make():
        h_nodes, h_inits = _head()
        t_nodes, t_inits = _tail(out, n_out)
        return h_nodes + nodes + t_nodes, {**h_inits, **inits, **t_inits}

    return make


_n = helper.make_node
ONNX_CASES = {
    "Add_two": _mid([_n("Add", ["h", "g"], ["m"])], {}, "m", 108),
    "Sub_two": _mid([_n("Sub", ["h", "g"], ["m"])], {}, "m", 108),
    "Sub_two_reversed": _mid([_n("Sub", ["g", "h"], ["m"])], {}, "m", 108),
    "Sum_three": _mid([_n("Sum", ["h", "g", "h"], ["m"])], {}, "m", 108),
    "Concat_two": _mid([_n("Concat", ["h", "g"], ["m"], axis=1)], {}, "m", 216),
    "Sub_const_first": _mid([_n("Sub", ["k", "h"], ["m"])], {"k": _r(3, 1, 1, seed=7)}, "m", 108),
    "Mul_Div_Neg": _mid(
        [
            _n("Mul", ["h", "k"], ["m0"]),
            _n("Div", ["m0", "d"], ["m1"]),
            _n("Neg", ["m1"], ["m2"]),
            _n("Add", ["m2", "g"], ["m"]),
        ],
        {"k": _r(1, 3, 6, 6, seed=8), "d": np.array(0.7, np.float32)},
        "m",
        108,
    ),
    "Pools_Pad_BN": _mid(
        [
            _n("BatchNormalization", ["h", "s", "bb", "mu", "v"], ["m0"]),
            _n("MaxPool", ["m0"], ["m1"], kernel_shape=[2, 2], strides=[2, 2]),
            _n("Pad", ["m1", "pads"], ["m2"], mode="constant"),
            _n("AveragePool", ["m2"], ["m3"], kernel_shape=[2, 2], strides=[1, 1]),
            _n("GlobalAveragePool", ["m3"], ["m4"]),
            _n("GlobalAveragePool", ["m1"], ["m5"]),
            _n("Sub", ["m4", "m5"], ["m"]),
        ],
        {
            "s": np.abs(_r(3, seed=9)) + 0.5,
            "bb": _r(3, seed=10),
            "mu": _r(3, seed=11),
            "v": np.abs(_r(3, seed=12)) + 0.5,
            "pads": np.array([0, 0, 1, 1, 0, 0, 0, 0], np.int64),
        },
        "m",
        3,
    ),
    "Transpose_Reshape_MatMul": _mid(
        [
            _n("Transpose", ["h"], ["m0"], perm=[0, 2, 3, 1]),
            _n("MatMul", ["m0", "M"], ["m1"]),
            _n("Reshape", ["m1", "shp"], ["m2"]),
            _n("Unsqueeze", ["m2", "ax"], ["m3"]),
            _n("Squeeze", ["m3", "ax"], ["m4"]),
            _n("Identity", ["m4"], ["m5"]),
            _n("Dropout", ["m5"], ["m6"]),
            _n("Cast", ["m6"], ["m"], to=TensorProto.FLOAT),
        ],
        {"M": _r(3, 5, seed=13), "shp": np.array([1, 180], np.int64), "ax": np.array([1], np.int64)},
        "m",
        180,
    ),
}


def _save_onnx(tmp_path, name, nodes, inits):
    g = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [onnx.numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    p = tmp_path / f"{name}.onnx"
    onnx.save(model, str(p))
    return p


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", sorted(ONNX_CASES))
def test_onnx_op_sound(name, method, tmp_path):
    nodes, inits = ONNX_CASES[name]()
    gm = load_onnx(_save_onnx(tmp_path, name, nodes, inits))  # checked against onnxruntime on load
    torch.manual_seed(_seed(name))
    check_sound(gm, (2, 6, 6), 0.1, method, n_points=300)


def test_onnx_cases_cover_every_supported_op():
    used = {nd.op_type for make in ONNX_CASES.values() for nd in make()[0]}
    assert SUPPORTED_ONNX_OPS - used <= {"Shape", "Size"}, "add a case for " + ", ".join(
        sorted(SUPPORTED_ONNX_OPS - used)
    )


def _gemm_sub_net(tmp_path, seed):
    """The audit's ONNX shape: Gemm-Relu-Gemm-Relu-Sub-Gemm, the Sub taking two input-dependent tensors."""
    n = helper.make_node
    nodes = [
        n("Gemm", ["x", "A1", "a1"], ["p"], transB=1),
        n("Relu", ["p"], ["q"]),
        n("Gemm", ["q", "A2", "a2"], ["r"], transB=1),
        n("Relu", ["r"], ["s"]),
        n("Gemm", ["q", "A3", "a3"], ["u"], transB=1),
        n("Sub", ["s", "u"], ["v"]),
        n("Gemm", ["v", "A4", "a4"], ["y"], transB=1),
    ]
    inits = {
        "A1": _r(8, 4, seed=seed),
        "a1": _r(8, seed=seed + 1),
        "A2": _r(8, 8, seed=seed + 2),
        "a2": _r(8, seed=seed + 3),
        "A3": _r(8, 8, seed=seed + 4),
        "a3": _r(8, seed=seed + 5),
        "A4": _r(3, 8, seed=seed + 6),
        "a4": _r(3, seed=seed + 7),
    }
    g = helper.make_graph(
        nodes,
        "gemm_sub",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        [onnx.numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    p = tmp_path / f"gemm_sub_{seed}.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), str(p))
    return p


@pytest.mark.parametrize("seed", [0, 10, 20, 30])
def test_verify_never_unsat_when_onnxruntime_violates_the_property(seed, tmp_path):
    """A property violated at a point of the box (checked in onnxruntime) must never come back unsat; with the
    swapped Sub coefficients CROWN's lower bound passed the threshold and verify said unsat."""
    from lingraft.io.onnx import run_onnxruntime
    from lingraft.verify import verify_property

    path = _gemm_sub_net(tmp_path, seed)
    lo, hi = np.full(4, -0.5), np.full(4, 0.5)
    x_star = torch.tensor(np.random.default_rng(seed).uniform(lo, hi), dtype=torch.float32)
    y_star = run_onnxruntime(path, x_star.reshape(1, 4))[0]
    b = float(y_star[1]) + 0.003  # Y_1 <= b holds at x_star: the unsafe set is reachable
    text = "".join(f"(declare-const X_{i} Real)\n" for i in range(4))
    text += "".join(f"(declare-const Y_{j} Real)\n" for j in range(3))
    text += "".join(f"(assert (>= X_{i} {lo[i]}))\n(assert (<= X_{i} {hi[i]}))\n" for i in range(4))
    text += f"(assert (<= Y_1 {b!r}))\n"
    prop = tmp_path / "prop.vnnlib"
    prop.write_text(text)
    for attack in (True, False):
        res = verify_property(path, prop, timeout=20, attack=attack, split="relu")
        assert res.status != "unsat", (attack, res)


def test_certify_needs_the_proof_margin_at_large_logits():
    """Logits near 1e4 differ by 1e-3: a float32 bound of that margin is within rounding of the logits' size, so
    it is no certificate (before the shared proof margin, any positive lower bound was 'verified')."""
    from lingraft.certify.pipeline import certify

    model = nn.Sequential(nn.Flatten(), nn.Linear(2, 2)).eval()
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.tensor([1e4 + 1e-3, 1e4]))
    x, y = torch.rand(3, 1, 2), torch.zeros(3, dtype=torch.long)
    rep = certify(model, x, y, 0.01, method="crown").to_dict()
    assert all(0 < s["margin_lower"] < 0.01 for s in rep["samples"])
    assert rep["counts"]["verified"] == 0 and rep["counts"]["unknown"] == 3
    with torch.no_grad():
        model[1].bias.copy_(torch.tensor([1.0 + 1e-3, 1.0]))  # the same margin at ordinary scale is a proof
    assert certify(model, x, y, 0.01, method="crown").to_dict()["counts"]["verified"] == 3
