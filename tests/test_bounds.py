"""Soundness of the bound engine: sampled points and PGD never leave the computed bounds, for every registry
model, every method, random eps; grafted neurons are exact; tightness relations between methods."""

import zlib

import pytest
import torch
from _soundness import TOL, check_sound, graft_randomly
from torch import nn

from lingraft.bounds import METHODS, BoundedNetwork, input_box, margin_spec
from lingraft.errors import UnsupportedModelError
from lingraft.models import create_model, list_models

IN = (1, 12, 12)  # small inputs keep every architecture fast; the engine is size-agnostic


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", list_models())
def test_registry_models_sound(name, method):
    torch.manual_seed(zlib.crc32(name.encode()) % 1000)  # stable across processes, unlike hash()
    model = create_model(name, IN)
    eps = float(torch.empty(1).uniform_(0.002, 0.05))
    check_sound(model, IN, eps, method)


@pytest.mark.parametrize("method", ("crown", "alpha-crown"))
@pytest.mark.parametrize("name", ["mlp", "cnn-b", "resnet-4b"])
def test_grafted_models_sound(name, method):
    torch.manual_seed(1)
    model = graft_randomly(create_model(name, IN), IN, 0.5)
    check_sound(model, IN, 0.03, method)


@pytest.mark.parametrize("name", ["mlp", "cnn-b", "resnet-4b"])
def test_fully_grafted_crown_is_exact(name):
    """A fully grafted network is affine: CROWN's bounds must equal the closed-form min/max over the box."""
    torch.manual_seed(2)
    model = graft_randomly(create_model(name, IN), IN, 1.0).eval()
    net = BoundedNetwork(model, IN)
    x = torch.rand(2, *IN)
    xl, xu = input_box(x, 0.05)
    C = margin_spec(torch.tensor([3, 7]), 10)
    res = net.compute_bounds(xl, xu, method="crown", C=C)
    # f(x) = J x + f(0): exact extremes of C J x over the box
    J = torch.autograd.functional.jacobian(lambda z: model(z.unsqueeze(0))[0], torch.zeros(*IN)).reshape(10, -1)
    f0 = model(torch.zeros(1, *IN))[0]
    W = torch.einsum("bso,on->bsn", C, J)
    c = ((xl + xu) / 2).reshape(2, -1, 1)
    r = ((xu - xl) / 2).reshape(2, -1, 1)
    base = torch.einsum("bso,o->bs", C, f0)
    exact_lo = base + torch.bmm(W, c).squeeze(-1) - torch.bmm(W.abs(), r).squeeze(-1)
    exact_up = base + torch.bmm(W, c).squeeze(-1) + torch.bmm(W.abs(), r).squeeze(-1)
    assert torch.allclose(res.lower, exact_lo, atol=1e-4, rtol=1e-5)
    assert torch.allclose(res.upper, exact_up, atol=1e-4, rtol=1e-5)
    assert all(int(v.sum()) == 0 for v in res.unstable.values())


@pytest.mark.parametrize("name", ["mlp", "cnn-b"])
def test_alpha_crown_at_least_crown_and_crown_beats_ibp(name):
    torch.manual_seed(3)
    model = create_model(name, IN).eval()
    net = BoundedNetwork(model, IN)
    x = torch.rand(3, *IN)
    xl, xu = input_box(x, 0.02)
    C = margin_spec(model(x).argmax(1), 10)
    ibp = net.compute_bounds(xl, xu, "ibp", C)
    cr = net.compute_bounds(xl, xu, "crown", C)
    al = net.compute_bounds(xl, xu, "alpha-crown", C)
    assert (al.lower >= cr.lower - 1e-6).all()
    assert (cr.lower >= ibp.lower - 1e-6).mean(dtype=torch.float) > 0.9


def test_graph_forward_matches_model_for_every_registry_model():
    for name in list_models():
        model = create_model(name, IN).eval()
        net = BoundedNetwork(model, IN)
        x = torch.rand(4, *IN)
        assert torch.allclose(net.forward(x), model(x), atol=1e-5), name


def test_unsupported_ops_are_listed_up_front():
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return torch.sigmoid(self.fc(x)) * torch.tanh(x)

    with pytest.raises(UnsupportedModelError) as e:
        BoundedNetwork(Bad(), (4,))
    msg = str(e.value)
    assert "sigmoid" in msg and "tanh" in msg and "mul" in msg


def test_zero_eps_bounds_are_tight():
    model = create_model("cnn-b", IN).eval()
    net = BoundedNetwork(model, IN)
    x = torch.rand(2, *IN)
    res = net.compute_bounds(x, x, "crown")
    out = model(x)
    assert torch.allclose(res.lower, out, atol=1e-4) and torch.allclose(res.upper, out, atol=1e-4)


def test_l2_bounds_sound():
    torch.manual_seed(4)
    model = create_model("mlp", IN).eval()
    net = BoundedNetwork(model, IN)
    x = torch.rand(2, *IN)
    eps = 0.3
    xl, xu = input_box(x, eps)
    C = margin_spec(model(x).argmax(1), 10)
    res = net.compute_bounds(xl, xu, "crown", C, l2_center=x, l2_eps=eps)
    box = net.compute_bounds(xl, xu, "crown", C)
    assert (res.lower >= box.lower - 1e-6).all()
    d = torch.randn(2000, *x.shape)
    d = d / d.flatten(2).norm(dim=2).reshape(2000, 2, *([1] * len(IN))) * eps * torch.rand(2000, 2, *([1] * len(IN)))
    pts = (x + d).clamp(0, 1)
    with torch.no_grad():
        vals = torch.einsum("bso,pbo->pbs", C, model(pts.reshape(-1, *IN)).reshape(2000, 2, -1))
    assert (vals >= res.lower - TOL).all()


@pytest.mark.parametrize("w_out", [1.0, -1.0])
def test_single_relu_triangle_relaxation(w_out):
    """y = w_out * relu(x), x in [-1, 3]: the upper line through (-1, 0) and (3, 3), the adaptive lower line."""
    fc1, fc2 = nn.Linear(1, 1), nn.Linear(1, 1)
    with torch.no_grad():
        fc1.weight.fill_(1.0)
        fc1.bias.zero_()
        fc2.weight.fill_(w_out)
        fc2.bias.zero_()
    model = nn.Sequential(fc1, nn.ReLU(), fc2).eval()
    net = BoundedNetwork(model, (1,))
    xl, xu = torch.tensor([[-1.0]]), torch.tensor([[3.0]])
    res = net.compute_bounds(xl, xu, "crown")
    # relu over [-1, 3]: max 3 (upper line at x=3), min of lower line x (slope 1 since u > -l) over the box = -1
    if w_out > 0:
        assert torch.allclose(res.upper, torch.tensor([[3.0]])) and torch.allclose(res.lower, torch.tensor([[-1.0]]))
    else:
        assert torch.allclose(res.lower, torch.tensor([[-3.0]])) and torch.allclose(res.upper, torch.tensor([[1.0]]))
    ibp = net.compute_bounds(xl, xu, "ibp")
    assert torch.allclose(ibp.lower, torch.tensor([[min(0.0, 3 * w_out)]]))


def test_subnormal_weights_are_flushed_in_the_engine_only():
    """Subnormal weights (slow on x86) become 0 in the engine's copies; the model keeps them; bounds stay sound
    (every sampled point and PGD point of the original model inside them)."""
    from lingraft.bounds.tolerance import flush_subnormals

    torch.manual_seed(3)
    model = create_model("cnn-b", IN).eval()
    tiny = torch.finfo(torch.float32).tiny
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        for m in convs:
            w = m.weight.view(-1)
            w[::7] = tiny * torch.rand(w[::7].shape) * torch.sign(torch.randn(w[::7].shape))
    n_sub = sum(int(((m.weight != 0) & (m.weight.abs() < tiny)).sum()) for m in convs)
    assert n_sub > 100
    net = BoundedNetwork(model, IN)
    for nd in net.nodes[1:]:
        for v in vars(nd.op).values():
            if torch.is_tensor(v) and v.is_floating_point():
                assert not ((v != 0) & (v.abs() < tiny)).any()
    assert sum(int(((m.weight != 0) & (m.weight.abs() < tiny)).sum()) for m in convs) == n_sub
    check_sound(model, IN, 0.02, "crown")
    t = torch.tensor([tiny / 2, -tiny / 3, tiny, 1.0, 0.0])
    assert flush_subnormals(t).tolist() == [0.0, 0.0, tiny, 1.0, 0.0]
    clean = torch.ones(3)
    assert flush_subnormals(clean) is clean


class _FewInputsConvNet(nn.Module):
    """cifar_biasfield's shape in small: 6 inputs -> Linear -> image -> convs (every pre-activation below the
    first ReLU is one affine map of the input, far wider than it)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 3 * 8 * 8)
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(8 * 4 * 4, 5),
        )

    def forward(self, x):
        return self.body(self.lin(x).reshape(-1, 3, 8, 8))


@pytest.mark.parametrize("method", ["crown", "alpha-crown"])
def test_input_maps_give_the_same_bounds_as_the_ops_below(method):
    """A backward pass that reaches a node that is one affine map of a low-dimensional input jumps to the input
    with the node's precomputed map: same bounds as going through the ops, and sound."""
    torch.manual_seed(4)
    model = _FewInputsConvNet().eval()
    net = BoundedNetwork(model, (6,))
    maps = net.input_maps()
    assert maps and all(W.shape[1] == 6 for W, _ in maps.values())
    x = torch.rand(3, 6)
    xl, xu = input_box(x, 0.2)
    x_in = xl + (xu - xl) * torch.rand(50, 1, 6)
    for node, (W, b) in maps.items():  # each map reproduces the node's value
        vals = net.ibp_all(x_in.reshape(-1, 6), x_in.reshape(-1, 6))[node][0]
        assert torch.allclose(vals.reshape(150, -1), x_in.reshape(-1, 6) @ W.T + b, atol=1e-5)
    C = margin_spec(model(x).argmax(1), 5)
    with_maps = net.compute_bounds(xl, xu, method=method, C=C, alpha_iterations=5)
    plain = BoundedNetwork(model, (6,))
    plain._input_maps = {}
    without = plain.compute_bounds(xl, xu, method=method, C=C, alpha_iterations=5)
    assert torch.allclose(with_maps.lower, without.lower, atol=1e-4, rtol=1e-5)
    assert torch.allclose(with_maps.upper, without.upper, atol=1e-4, rtol=1e-5)
    check_sound(model, (6,), 0.2, method)
    assert BoundedNetwork(create_model("cnn-b", IN), IN).input_maps() == {}  # 144 inputs: not worth it


def test_relu_relaxation_is_reused_only_for_the_same_unchanged_bounds():
    from lingraft.bounds.ops import ReLUOp

    op = ReLUOp((4,))
    lo = torch.tensor([[-1.0, -2.0, 0.5, -3.0]])
    up = torch.tensor([[1.0, -1.0, 2.0, 1.0]])
    first = op.relaxation(lo, up)
    assert op.relaxation(lo, up) is first  # an optimisation loop over fixed bounds: computed once
    assert op.relaxation(lo.clone(), up) is not first  # other tensors: computed again
    lo[0, 0] = 0.5  # changed in place: the cached slopes are stale
    u_slope, _, l_slope, unstable = op.relaxation(lo, up)
    assert not bool(unstable[0, 0]) and float(u_slope[0, 0]) == 1.0 and float(l_slope[0, 0]) == 1.0
    lo_g = lo.clone().requires_grad_(True)  # bounds under optimisation: never cached (fresh graph each time)
    a = op.relaxation(lo_g, up)
    assert op.relaxation(lo_g, up) is not a
    a[0].sum().backward()
    assert lo_g.grad is not None
