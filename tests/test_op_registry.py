"""Registry-driven operator tests: every entry of :data:`lingraft.bounds.registry.REGISTRY` is checked through the
small networks of EXAMPLES (one or more per entry; an entry without one fails ``test_every_entry_has_examples``).

Per example: (a) soundness of IBP, CROWN and alpha-CROWN against sampled points, box corners and a short PGD attack
(and the bound graph computes the model's function); (b) the patch-mode and the dense backward pass give the same
bounds, and an op that declares a patch capability is really used in patch form; (c) each op that declares
``exact_ibp`` attains its IBP interval at the box corners, and each ``affine`` op's IBP equals its CROWN bound.
And once: (d) the importer's ONNX ops are exactly the op types with a handler and a registry entry; (e) every
BoundOp class is built by some entry or listed as internal; the pooling constraint is one check on both sides.
"""

import inspect
import math
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _soundness import graft_randomly, pgd_extremes, random_batchnorm
from torch import nn

import lingraft.bounds.ops as ops_pkg
from lingraft.bounds import BoundedNetwork
from lingraft.bounds.ops.base import BoundOp
from lingraft.bounds.patches import chain_to_input
from lingraft.bounds.registry import INTERNAL_OPS, REGISTRY, onnx_entries
from lingraft.errors import UnsupportedModelError
from lingraft.models.layers import Normalize

IN = (2, 5, 5)
EPS = 0.1
TOL = 1e-5


class Net(nn.Module):
    """x [2, 5, 5] -> conv (2->3, 3x3, pad 1) -> relu -> body(h, x) -> [conv2 (-> 3) -> relu, when the body gives an
    image] -> flatten -> fc (-> 3). ``body`` is an nn.Module or a function (m, h, x) -> tensor (traced through)."""

    def __init__(self, body):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.conv_b = nn.Conv2d(2, 3, 3, padding=1)  # a second input-dependent branch for binary ops
        self.lin = nn.Linear(75, 48)
        self.c = nn.Parameter(torch.randn(3, 5, 5) * 0.3, requires_grad=False)
        self.body_mod = body if isinstance(body, nn.Module) else None
        self.body_fn = None if isinstance(body, nn.Module) else body
        with torch.no_grad():
            y = self._body(F.relu(self.conv(torch.zeros(1, *IN))), torch.zeros(1, *IN))
        self.conv2 = nn.Conv2d(y.shape[1], 3, 3, padding=1) if y.dim() == 4 else None
        n = 3 * y.shape[2] * y.shape[3] if y.dim() == 4 else y[0].numel()
        self.fc = nn.Linear(n, 3)

    def _body(self, h, x):
        return self.body_mod(h) if self.body_mod is not None else self.body_fn(self, h, x)

    def forward(self, x):
        y = self._body(F.relu(self.conv(x)), x)
        if self.conv2 is not None:
            y = F.relu(self.conv2(y))
        return self.fc(y.flatten(1))


class _ClampBox(nn.Module):
    """clamp(x, -0.2, 0.5), bounded only through its own interval_bounds (an opaque leaf)."""

    def forward(self, x):
        return x.clamp(-0.2, 0.5)

    def interval_bounds(self, lo, up):
        return lo.clamp(-0.2, 0.5), up.clamp(-0.2, 0.5)


def _bn(bn):
    return random_batchnorm(bn).eval()


def _seq(*layers):
    """A Net whose body is nn.Sequential(*layers()) (layers built fresh per call)."""
    return lambda: Net(nn.Sequential(*layers[0]()))


def _fn(f):
    return lambda: Net(f)


# registry entry name -> {variant: model factory}
EXAMPLES = {
    "Identity/Dropout": {"modules": _seq(lambda: [nn.Identity(), nn.Dropout(0.5)])},
    "Linear": {
        "module": _seq(lambda: [nn.Flatten(), nn.Linear(75, 8), nn.ReLU()]),
        "matmul_const": _fn(lambda m, h, x: h @ m.c[0]),
        "linear_fn": _fn(lambda m, h, x: F.linear(h, m.c[0], bias=m.c[1, 0])),
    },
    "Conv2d": {
        "strided": _seq(lambda: [nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU()]),
        "grouped_same": _seq(lambda: [nn.Conv2d(3, 3, 3, padding="same", groups=3)]),
    },
    "ReLU": {
        "module": _seq(lambda: [nn.Conv2d(3, 3, 3, padding=1), nn.ReLU()]),
        "function": _fn(lambda m, h, x: torch.relu(h - 0.1) + m.conv_b(x)),
    },
    "GraftedReLU": {
        "grafted": lambda: graft_randomly(Net(nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.ReLU())), IN, 0.5)
    },
    "Normalize": {"module": _seq(lambda: [Normalize([0.1, 0.2, 0.3], [0.5, 0.6, 0.7])])},
    "BatchNorm": {
        "bn2d": _seq(lambda: [_bn(nn.BatchNorm2d(3))]),
        "bn1d": _seq(lambda: [nn.Flatten(), nn.Linear(75, 6), _bn(nn.BatchNorm1d(6))]),
    },
    "AvgPool2d": {
        "padded": _seq(lambda: [nn.AvgPool2d(2, 1, padding=1)]),
        "strided": _seq(lambda: [nn.AvgPool2d(2)]),
    },
    "MaxPool2d": {
        "plain": _seq(lambda: [nn.MaxPool2d(2)]),
        "overlapping": _seq(lambda: [nn.MaxPool2d(2, stride=1)]),
        "padded": _seq(lambda: [nn.MaxPool2d(3, 2, padding=1)]),
        "ceil_mode": _seq(lambda: [nn.MaxPool2d(2, 2, ceil_mode=True)]),
        "padded_ceil": _seq(lambda: [nn.MaxPool2d(2, 2, padding=1, ceil_mode=True)]),
    },
    "Flatten/Reshape/View/Squeeze/Unsqueeze": {
        "module": _seq(lambda: [nn.Flatten(), nn.Linear(75, 8)]),
        "views_into_conv": _fn(
            lambda m, h, x: F.relu(m.lin(h.reshape(h.shape[0], -1))).view(-1, 3, 4, 4).unsqueeze(1).squeeze(1)
        ),
    },
    "Permute/Transpose": {
        "permute": _fn(lambda m, h, x: h.permute(0, 1, 3, 2) + m.c),
        "transpose": _fn(lambda m, h, x: h.transpose(dim0=1, dim1=2)),
    },
    "Pad": {
        "zero_module": _seq(lambda: [nn.ZeroPad2d((1, 0, 0, 1))]),
        "constant_module": _seq(lambda: [nn.ConstantPad2d(1, -0.2)]),
        "function": _fn(lambda m, h, x: F.pad(h, (1, 1, 0, 1), value=0.3)),
    },
    "Concat": {"two": _fn(lambda m, h, x: torch.cat([h, -m.conv_b(x)], dim=1))},
    "Add/Sub/Mul/Div/Neg": {
        "add_sub_two": _fn(lambda m, h, x: torch.add(h, m.conv_b(x), alpha=-1.5) - 0.5 * m.conv_b(x)),
        "constants": _fn(lambda m, h, x: -(h * m.c - 0.2) / (0.5 + m.c.abs()) + 1.0),
    },
    "modules with interval_bounds()": {"clamp": _seq(lambda: [_ClampBox()])},
}

#: examples whose conv2 pass runs in patch form (every op between the two convolutions supports it)
PATCH_FORM = {
    ("Identity/Dropout", "modules"),
    ("Conv2d", "strided"),
    ("Conv2d", "grouped_same"),
    ("ReLU", "module"),
    ("GraftedReLU", "grafted"),
    ("Normalize", "module"),
    ("BatchNorm", "bn2d"),
    ("AvgPool2d", "padded"),
    ("AvgPool2d", "strided"),
    ("Flatten/Reshape/View/Squeeze/Unsqueeze", "views_into_conv"),
    ("Pad", "zero_module"),
    ("Add/Sub/Mul/Div/Neg", "constants"),
}

_ENTRY = {e.name: e for e in REGISTRY}
CASES = [(name, variant) for name in EXAMPLES for variant in EXAMPLES[name]]


def _build(name, variant):
    torch.manual_seed(zlib.crc32(f"{name}/{variant}".encode()) % 10_000)
    model = EXAMPLES[name][variant]().eval()
    return model, BoundedNetwork(model, IN)


def _box(seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, *IN, generator=g)
    return x - EPS, x + EPS


def test_every_entry_has_examples():
    assert set(EXAMPLES) == set(_ENTRY), "add an example to EXAMPLES for " + ", ".join(set(_ENTRY) - set(EXAMPLES))


@pytest.mark.parametrize("name,variant", CASES)
def test_sound(name, variant):
    """(a) IBP, CROWN, alpha-CROWN bound every sampled, corner and PGD point of the box, on both sides."""
    model, net = _build(name, variant)
    entry = _ENTRY[name]
    if entry.ops:
        assert any(type(nd.op) in entry.ops for nd in net.nodes), f"the example builds no {entry.ops}"
    xl, xu = _box()
    with torch.no_grad():
        assert torch.allclose(net.forward(xl), model(xl), atol=1e-5), "the bound graph computes another function"
    C = torch.eye(net.num_outputs).expand(2, -1, -1)
    g = torch.Generator().manual_seed(1)
    pts = torch.cat([torch.rand(200, *xl.shape, generator=g), torch.rand(40, *xl.shape, generator=g).round()])
    pts = xl + (xu - xl) * pts  # [P, B, *IN]
    with torch.no_grad():
        vals = model(pts.reshape(-1, *IN)).reshape(pts.shape[0], 2, -1)
    torch.manual_seed(2)
    pmin, pmax = pgd_extremes(model, C, xl, xu, steps=10)
    for method in ("ibp", "crown", "alpha-crown"):
        res = net.compute_bounds(xl, xu, method, C, alpha_iterations=3)
        lo, up = res.lower, res.upper
        assert torch.isfinite(lo).all() and torch.isfinite(up).all(), method
        assert (vals >= lo - TOL).all() and (pmin >= lo - TOL).all(), f"{method}: a point below the lower bound"
        assert (vals <= up + TOL).all() and (pmax <= up + TOL).all(), f"{method}: a point above the upper bound"


def _patch_capable(op: BoundOp) -> bool:
    return op.patchable or op.starts_patches or op.ends_patches


@pytest.mark.parametrize("name,variant", CASES)
def test_patch_form_equals_dense_form(name, variant):
    """(b) Intermediate and final CROWN bounds with and without the patch-mode pass agree; an op of this entry
    with a patch capability between the two convolutions is part of conv2's patch chain."""
    model, patched = _build(name, variant)
    dense = BoundedNetwork(model, IN)
    dense.use_patches = False
    xl, xu = _box(3)
    ib_p, ib_d = patched.intermediate_bounds(xl, xu), dense.intermediate_bounds(xl, xu)
    for bp, bd in zip(ib_p, ib_d):
        assert (bp is None) == (bd is None)
        if bp is not None:
            assert torch.allclose(bp[0], bd[0], atol=TOL) and torch.allclose(bp[1], bd[1], atol=TOL)
    a, b = patched.compute_bounds(xl, xu, "crown"), dense.compute_bounds(xl, xu, "crown")
    assert torch.allclose(a.lower, b.lower, atol=TOL) and torch.allclose(a.upper, b.upper, atol=TOL)
    names = [nd.module_name for nd in patched.nodes]
    if "conv2" not in names:
        return
    k1, k2 = names.index("conv"), names.index("conv2")
    path = [patched.nodes[k] for k in range(k1 + 1, k2)]
    mine = [k for k in range(k1 + 1, k2) if type(patched.nodes[k].op) in _ENTRY[name].ops]
    # conv2's pass must run in patch form when every op below it declares a patch capability (and in PATCH_FORM,
    # so that losing a capability shows here too, not only in time)
    if (name, variant) in PATCH_FORM or (
        mine and all(len(nd.inputs) == 1 and _patch_capable(nd.bound_op) for nd in path)
    ):
        chain = chain_to_input(patched.nodes, k2)
        assert chain is not None, f"{name}/{variant}: conv2's pass is not in patch form"
        assert not mine or any(k in chain for k in mine), f"{name}: no op of the entry is in conv2's patch chain"


def _exact_ibp_cases():
    """(name, variant) of the examples holding an op that declares exact_ibp or affine."""
    out = []
    for name, variant in CASES:
        if any(getattr(c, "exact_ibp", False) is True or getattr(c, "affine", False) is True for c in _ENTRY[name].ops):
            out.append((name, variant))
    return out


@pytest.mark.parametrize("name,variant", _exact_ibp_cases())
def test_ibp_is_exact_where_declared(name, variant):
    """(c) On a random box of its input: an exact_ibp op's IBP interval is attained at the box's corners (each output
    is monotone in one input), and an affine op's IBP equals the CROWN (backward) bound of its unit rows."""
    _, net = _build(name, variant)
    g = torch.Generator().manual_seed(4)
    checked = 0
    for nd in net.nodes:
        op = nd.op
        if op is None or type(op) not in _ENTRY[name].ops or len(nd.inputs) != 1:
            continue
        in_shape = net.nodes[nd.inputs[0]].shape
        lo = torch.randn(2, *in_shape, generator=g)
        up = lo + torch.rand(2, *in_shape, generator=g)
        il, iu = op.ibp((lo, up))
        if op.exact_ibp:
            at_lo, at_up = op.forward(lo), op.forward(up)
            assert torch.allclose(il, torch.minimum(at_lo, at_up), atol=TOL), type(op).__name__
            assert torch.allclose(iu, torch.maximum(at_lo, at_up), atol=TOL), type(op).__name__
            # and each output neuron depends on one input neuron only (a max of several would not stay exact on
            # correlated inputs): the Jacobians' supports at a few points of the box
            support = torch.zeros(math.prod(nd.shape), math.prod(in_shape), dtype=torch.bool)
            for _ in range(4):
                z = lo[:1] + (up[:1] - lo[:1]) * torch.rand(1, *in_shape, generator=g)
                J = torch.autograd.functional.jacobian(op.forward, z)
                support |= J.reshape(support.shape) != 0
            assert (support.sum(1) <= 1).all(), f"{type(op).__name__}: an output depends on several inputs"
            checked += 1
        if op.affine:
            n = math.prod(nd.shape)
            eye = torch.eye(n).reshape(1, n, *nd.shape)
            (outs, lb, ub) = op.backward(eye, eye, [None])
            A = outs[0][0].reshape(1, n, -1)
            c, r = ((up + lo) / 2).reshape(2, -1, 1), ((up - lo) / 2).reshape(2, -1, 1)
            mid = (A @ c).squeeze(-1) + lb
            rad = (A.abs() @ r).squeeze(-1)
            assert torch.allclose(il.reshape(2, -1), mid - rad, atol=1e-4), type(op).__name__
            assert torch.allclose(iu.reshape(2, -1), mid + rad, atol=1e-4), type(op).__name__
            checked += 1
    assert checked, "no exact_ibp / affine op of this entry in the example"


def test_diagonal_ops_declare_exact_ibp():
    """A diagonal op maps a box onto a box exactly, so it must declare exact_ibp (the engine relies on it)."""
    for cls in _bound_op_classes():
        if cls.diagonal:
            assert cls.exact_ibp is True, cls.__name__


# ---- the ONNX side ---------------------------------------------------------------------------------------------------
onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402

from lingraft.io.onnx import SUPPORTED_ONNX_OPS, list_unsupported_ops, load_onnx  # noqa: E402
from lingraft.io.onnx.analysis import SHAPE_QUERY_OPS  # noqa: E402
from lingraft.io.onnx.import_ops import OpConverters  # noqa: E402


def _handlers() -> set[str]:
    return {m[3:] for m, f in inspect.getmembers(OpConverters) if m.startswith("op_") and callable(f)}


def test_onnx_supported_ops_are_derived_from_the_registry():
    """(d) The importer accepts exactly the op types that have an op_<OpType> handler and a registry entry (plus the
    shape queries it evaluates itself); every handler has a registry entry and every registry ONNX type a handler."""
    registered = set(onnx_entries())
    assert SUPPORTED_ONNX_OPS == (_handlers() & registered) | SHAPE_QUERY_OPS
    missing = _handlers() - registered
    assert not missing, f"add the ONNX op types {sorted(missing)} to their entry's onnx=(...) in bounds/registry.py"
    assert registered <= _handlers(), f"registry names ONNX ops without a handler: {sorted(registered - _handlers())}"


def _bound_op_classes() -> set[type]:
    out, todo = set(), [BoundOp]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub.__module__.startswith(ops_pkg.__name__) and sub not in out:
                out.add(sub)
                todo.append(sub)
    return out


def test_every_bound_op_is_reachable_from_the_registry():
    """(e) Each BoundOp class of lingraft.bounds.ops is built by a registry entry or listed as internal."""
    reachable = {c for e in REGISTRY for c in e.ops} | set(INTERNAL_OPS)
    orphans = {c.__name__ for c in _bound_op_classes()} - {c.__name__ for c in reachable}
    assert not orphans, f"register {sorted(orphans)} in bounds/registry.py (or list them in INTERNAL_OPS)"


def _pool_onnx(tmp_path, op, **attrs):
    """x [1, 2, 5, 5] -> Conv(3, pad 1) -> Relu -> op -> Flatten -> Gemm(3)."""
    n = helper.make_node
    rng = np.random.default_rng(0)
    w = {"W": rng.standard_normal((3, 2, 3, 3)).astype(np.float32) * 0.5, "b": np.zeros(3, np.float32)}
    nodes = [n("Conv", ["x", "W", "b"], ["c"], pads=[1, 1, 1, 1]), n("Relu", ["c"], ["r"])]
    nodes.append(n(op, ["r"], ["p"], name="pool", **attrs))
    with torch.no_grad():
        t = torch.zeros(1, 3, 5, 5)
        k, s, p = attrs["kernel_shape"], attrs.get("strides", [1, 1]), attrs.get("pads", [0, 0, 0, 0])
        pool = F.max_pool2d if op == "MaxPool" else F.avg_pool2d
        n_out = pool(t, k, s, p[:2]).numel()
    w["G"] = rng.standard_normal((3, n_out)).astype(np.float32) * 0.3
    nodes += [n("Flatten", ["p"], ["f"]), n("Gemm", ["f", "G"], ["y"], transB=1)]
    g = helper.make_graph(
        nodes,
        "pool",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, *IN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        [onnx.numpy_helper.from_array(v, k) for k, v in w.items()],
    )
    path = tmp_path / f"{op}.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


def test_padded_onnx_maxpool_imports_and_bounds_soundly(tmp_path):
    """The importer accepted a padded MaxPool that the graph refused; now both accept it, and it is bounded soundly."""
    path = _pool_onnx(tmp_path, "MaxPool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    assert list_unsupported_ops(path) == []
    gm = load_onnx(path)
    net = BoundedNetwork(gm, IN)
    xl, xu = _box(5)
    res = net.compute_bounds(xl, xu, "crown")
    pts = xl + (xu - xl) * torch.rand(300, *xl.shape)
    with torch.no_grad():
        vals = gm(pts.reshape(-1, *IN)).reshape(300, 2, -1)
    assert (vals >= res.lower - TOL).all() and (vals <= res.upper + TOL).all()


def test_pooling_constraint_is_one_check_on_both_sides(tmp_path):
    """A padded average pool that divides by the window's inside count is refused by the ONNX analysis and by the
    graph builder, with the same reason (module_ops.pool_problem)."""
    why = "padding without count_include_pad"
    path = _pool_onnx(tmp_path, "AveragePool", kernel_shape=[2, 2], pads=[1, 1, 1, 1], count_include_pad=0)
    assert list_unsupported_ops(path) == [("AveragePool", "pool")]
    with pytest.raises(UnsupportedModelError, match=why):
        load_onnx(path)
    model = Net(nn.Sequential(nn.AvgPool2d(2, 1, padding=1, count_include_pad=False))).eval()
    with pytest.raises(UnsupportedModelError, match=why):
        BoundedNetwork(model, IN)


def test_infinite_constant_pad_is_refused_up_front():
    """-inf padding in front of a max pool made CROWN's bounds -inf / NaN (unsound); it is refused when the
    graph is built, naming the fix (the max pool's own padding, which is bounded soundly)."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.ConstantPad2d(1, float("-inf")), nn.MaxPool2d(2))
    with pytest.raises(UnsupportedModelError, match="MaxPool"):
        BoundedNetwork(model.eval(), (1, 8, 8))
