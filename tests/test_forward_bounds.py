"""Forward-mode linear bound propagation (lingraft/bounds/forward.py): soundness on small MLPs and CNNs (grafted
ReLUs included) against sampled and PGD points, exactness on affine regions, agreement with CROWN where the two
coincide, and the cifar_biasfield net of VNN-COMP."""

from __future__ import annotations

import pytest
import torch
from _soundness import graft_randomly
from torch import nn

from lingraft.bounds import BoundedNetwork
from lingraft.bounds.forward import (
    engine_bound_nodes,
    forward_crown_bounds,
    forward_intermediate_bounds,
    forward_memory_bytes,
    supports_forward,
)
from lingraft.bounds.ops import ReLUOp
from lingraft.models.layers import Normalize

TOL = 1e-4


class Unflatten(nn.Module):
    """[B, n] -> [B, *shape] (a Reshape node of the bound graph)."""

    def __init__(self, shape):
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, x):
        return x.reshape(x.shape[0], *self.shape)


class Residual(nn.Module):
    """x + conv(relu(conv(x))) (an Add node)."""

    def __init__(self, c):
        super().__init__()
        self.a = nn.Conv2d(c, c, 3, padding=1)
        self.b = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + self.b(torch.relu(self.a(x)))


def mlp():
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)), (4,)


def cnn():
    model = nn.Sequential(
        nn.Linear(6, 2 * 8 * 8),
        Unflatten((2, 8, 8)),
        nn.Conv2d(2, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64, 5),
    )
    return model, (6,)


def cnn_ops():
    """Normalize, ZeroPad2d, BatchNorm, residual Add, MaxPool and AvgPool (a grouped conv) on an image input."""
    bn = nn.BatchNorm2d(3).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
    model = nn.Sequential(
        Normalize([0.5, 0.4], [0.3, 0.2]),
        nn.ZeroPad2d(1),
        nn.Conv2d(2, 3, 3),
        bn,
        nn.ReLU(),
        Residual(3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(3 * 2 * 2, 4),
    )
    return model, (2, 8, 8)


def node_values(net: BoundedNetwork, x: torch.Tensor) -> list[torch.Tensor]:
    """Every node's value [P, *shape] at the points x [P, *in_shape]."""
    vals: list = []
    for nd in net.nodes:
        vals.append(x if nd.op is None else nd.op.forward(*[vals[j] for j in nd.inputs]))
    return vals


def pgd_points(net: BoundedNetwork, xl, xu, k: int = 3, steps: int = 25) -> torch.Tensor:
    """Points of the box [1, *in] that minimise and maximise k random neurons of every node: [P, *in_shape]."""
    g = torch.Generator().manual_seed(1)
    targets = []
    for i, nd in enumerate(net.nodes[1:], start=1):
        for j in torch.randint(0, int(torch.tensor(nd.shape).prod()), (k,), generator=g).tolist():
            targets += [(i, j, 1.0), (i, j, -1.0)]
    P = len(targets)
    x = xl + torch.rand(P, *xl.shape[1:], generator=g) * (xu - xl)
    step = (xu - xl) / 8
    for _ in range(steps):
        x = x.detach().requires_grad_(True)
        vals = node_values(net, x)
        obj = torch.stack([s * vals[i][p].flatten()[j] for p, (i, j, s) in enumerate(targets)]).sum()
        (grad,) = torch.autograd.grad(obj, x)
        with torch.no_grad():
            x = torch.clamp(x + step * grad.sign(), xl, xu)
            step = step * 0.9
    return x.detach()


def assert_contains(net, bounds, x, tol=TOL):
    """Every node's value at x [P, *in_shape] lies in bounds[i] (sample 0 of the batch) up to tol relative."""
    with torch.no_grad():
        vals = node_values(net, x)
    for i, b in enumerate(bounds):
        if b is None:
            continue
        lo, up = b[0][0:1], b[1][0:1]
        slack = tol * (1 + vals[i].abs())
        assert (vals[i] >= lo - slack).all(), f"node {i}: value below the forward lower bound"
        assert (vals[i] <= up + slack).all(), f"node {i}: value above the forward upper bound"


def sample(bounds: list, b: int) -> list:
    """Sample b's bounds ([1, *shape] each) of a batched bounds list."""
    return [None if bb is None else (bb[0][b : b + 1], bb[1][b : b + 1]) for bb in bounds]


BUILDERS = {"mlp": mlp, "cnn": cnn, "cnn_ops": cnn_ops}


@pytest.mark.parametrize("graft", [False, True])
@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_forward_bounds_sound(arch, graft):
    torch.manual_seed(0)
    model, in_shape = BUILDERS[arch]()
    if graft:
        model = graft_randomly(model, in_shape, 0.4, seed=3)
    net = BoundedNetwork(model.eval(), in_shape)
    assert supports_forward(net)
    if graft:
        assert any(op.num_grafted > 0 for _, op in net.relu_layers())
    center = torch.rand(2, *in_shape)
    xl, xu = center - 0.3, center + 0.3
    fb = forward_intermediate_bounds(net, xl, xu, all_nodes=True)
    ibp = net.ibp_all(xl, xu)
    for i, (b, r) in enumerate(zip(fb, ibp)):
        assert torch.isfinite(b[0]).all() and torch.isfinite(b[1]).all(), f"node {i}"
        assert (b[0] >= r[0] - 1e-6).all() and (b[1] <= r[1] + 1e-6).all(), f"node {i} looser than IBP"
    hb = forward_crown_bounds(net, xl, xu)
    for b_sel in range(2):
        sl, su = xl[b_sel : b_sel + 1], xu[b_sel : b_sel + 1]
        x = sl + torch.rand(2000, *in_shape) * (su - sl)
        x = torch.cat([x, pgd_points(net, sl, su)])
        assert_contains(net, sample(fb, b_sel), x)
        assert_contains(net, sample(hb, b_sel), x)
    # the default structure is the engine's: the same nodes filled
    ref = net.intermediate_bounds(xl, xu)
    fd = forward_intermediate_bounds(net, xl, xu)
    assert [b is not None for b in fd] == [b is not None for b in ref]
    assert [i for i, b in enumerate(fd) if b is not None] == engine_bound_nodes(net)


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_forward_bounds_exact_without_unstable_relus(arch):
    """On a tiny box where no (non-grafted) ReLU is unstable the network is affine: the bounds are the exact range
    value(centre) +- |J| r."""
    torch.manual_seed(1)
    model, in_shape = BUILDERS[arch]()
    model = graft_randomly(model, in_shape, 0.3, seed=5).eval()
    net = BoundedNetwork(model, in_shape)
    r = 1e-4
    for _ in range(20):  # a centre whose box leaves every ReLU stable
        x0 = torch.rand(1, *in_shape)
        fb = forward_intermediate_bounds(net, x0 - r, x0 + r, all_nodes=True)
        if not any(net.nodes[k].op.unstable_mask(*fb[i]).any() for k, i in net.relu_input_nodes().items()):
            break
    else:
        pytest.fail("no box without unstable ReLUs found")
    vals0 = node_values(net, x0)
    for i in range(1, len(net.nodes)):

        def f(x, i=i):
            return node_values(net, x.reshape(1, *in_shape))[i].flatten()

        J = torch.autograd.functional.jacobian(f, x0.flatten())  # [m, n]
        rad = J.abs().sum(1) * r
        mid = vals0[i].flatten()
        lo, up = fb[i][0].flatten(), fb[i][1].flatten()
        torch.testing.assert_close(lo, mid - rad, atol=1e-5, rtol=0)
        torch.testing.assert_close(up, mid + rad, atol=1e-5, rtol=0)


def test_one_hidden_layer_matches_crown():
    """With one ReLU layer on an exact pre-activation, forward mode and backward CROWN use the same relaxation on the
    same linear functions: the output bounds agree."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 30), nn.ReLU(), nn.Linear(30, 4)).eval()
    net = BoundedNetwork(model, (5,))
    center = torch.rand(3, 5)
    xl, xu = center - 0.5, center + 0.5
    fb = forward_intermediate_bounds(net, xl, xu, all_nodes=True)
    assert net.nodes[2].op.unstable_mask(*fb[1]).any()
    crown = net.compute_bounds(xl, xu, method="crown")
    ibp = net.ibp_all(xl, xu)[-1]
    torch.testing.assert_close(fb[-1][0], torch.maximum(crown.lower, ibp[0]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fb[-1][1], torch.minimum(crown.upper, ibp[1]), atol=1e-5, rtol=1e-5)


def test_supports_forward_and_memory():
    model, in_shape = cnn()
    net = BoundedNetwork(model.eval(), in_shape)
    assert supports_forward(net)
    m1, m4 = forward_memory_bytes(net, 1), forward_memory_bytes(net, 4)
    assert m1 > 0 and m4 == 4 * m1
    relu = next(nd for nd in net.nodes if isinstance(nd.op, ReLUOp))
    # an op without forward-mode bounds (it says so itself; forward mode never asks for the concrete class)
    relu.op = type("OtherReLU", (ReLUOp,), {"forward_linear_ok": lambda self: False})(relu.shape)
    assert not supports_forward(net)
    with pytest.raises(ValueError, match=r"ops: ReLU\(4x8x8\)"):
        forward_intermediate_bounds(net, torch.zeros(1, *in_shape), torch.ones(1, *in_shape))


def test_interm_bounds_tighten():
    """interm_bounds (split neurons) replace the computed bounds where tighter, as in the engine."""
    model, in_shape = mlp()
    net = BoundedNetwork(model.eval(), in_shape)
    xl, xu = -torch.ones(1, 4), torch.ones(1, 4)
    fb = forward_intermediate_bounds(net, xl, xu)
    i = next(iter(net.relu_input_nodes().values()))
    lo, up = fb[i]
    split = (torch.zeros_like(lo), up.clone())  # every neuron of the first layer split active
    sb = forward_intermediate_bounds(net, xl, xu, interm_bounds={i: split})
    assert (sb[i][0] >= 0).all()
    assert not net.nodes[i + 1].op.unstable_mask(*sb[i]).any()


@pytest.mark.vnncomp
def test_cifar_biasfield_forward_bounds(vnncomp_dir):
    from lingraft.spec.region import region_spec
    from lingraft.spec.vnnlib import parse_vnnlib
    from lingraft.verify.core import load_model

    d = vnncomp_dir / "cifar_biasfield"
    model, in_shape, n_out, _ = load_model(str(d / "onnx" / "cifar_bias_field_0.onnx"), None, [])
    net = BoundedNetwork(model, in_shape)
    assert supports_forward(net)
    spec = region_spec(parse_vnnlib(str(d / "vnnlib" / "prop_0.vnnlib")).regions[0], in_shape, n_out)
    xl, xu = spec.x_L, spec.x_U
    fb = forward_intermediate_bounds(net, xl, xu, all_nodes=True)
    torch.manual_seed(0)
    x = xl + torch.rand(500, *in_shape) * (xu - xl)
    x = torch.cat([x, xl, xu])
    assert_contains(net, fb, x)
    fd = forward_intermediate_bounds(net, xl, xu)
    C = spec.C.reshape(1, -1, n_out)
    lo, _ = net.backward_bound(C, xl, xu, fd)
    with torch.no_grad():
        margins = net.forward(x) @ spec.C.T  # [P, S]
    assert (lo <= margins.min(0).values + 1e-3).all()
