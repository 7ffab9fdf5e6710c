"""auto_LiRPA 0.3 as an oracle: the compatibility patches work, its bounds are sound, and its CROWN
intermediate-bound rule is exactly the one documented in lingraft/compat/auto_lirpa.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lingraft.errors import UsageError
from lingraft.models import create_model
from lingraft.models.layers import GraftedReLU

lirpa = pytest.importorskip("lingraft.compat.auto_lirpa")
if not lirpa.available():  # pragma: no cover
    pytest.skip(f"auto_LiRPA unavailable: {lirpa.import_error()}", allow_module_level=True)

SHAPE = (1, 28, 28)
MNIST = dict(mean=(0.1307,), std=(0.3081,))


# ----------------------------------------------------------------------------------------- helpers
def _graft(model: nn.Sequential, frac: float = 0.5, seed: int = 0) -> nn.Sequential:
    """Replace every nn.ReLU of a Sequential by a GraftedReLU with a random ~frac mask."""
    shapes: dict[int, torch.Size] = {}
    hooks = [
        m.register_forward_hook(lambda m, i, o, k=k: shapes.__setitem__(k, o.shape[1:]))
        for k, m in enumerate(model)
        if isinstance(m, nn.ReLU)
    ]
    with torch.no_grad():
        model(torch.zeros(1, *SHAPE))
    for h in hooks:
        h.remove()
    g = torch.Generator().manual_seed(seed)
    for k, shp in shapes.items():
        mask = (torch.rand(shp, generator=g) < frac).float()
        model[k] = GraftedReLU(shp, mask, init_a=0.3, init_b=0.05)
    return model.eval()


def _problem(name: str, batch: int, eps: float, seed: int = 0, graft: bool = False):
    torch.manual_seed(seed)
    model = create_model(name, SHAPE, **MNIST).eval()
    if graft:
        model = _graft(model, seed=seed)
    x = torch.rand(batch, *SHAPE)
    xl, xu = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    with torch.no_grad():
        y = model(x).argmax(1)
    C = torch.eye(10)[y].unsqueeze(1) - torch.eye(10).unsqueeze(0)  # [B, 10, 10] margins y - j
    return model, xl, xu, C


def _assert_contains_samples(model, xl, xu, C, lb, ub, n: int = 1000):
    assert torch.isfinite(lb).all() and torch.isfinite(ub).all()
    assert (lb <= ub + 1e-5).all()
    g = torch.Generator().manual_seed(1)
    for b in range(xl.shape[0]):
        r = torch.rand(n, *xl.shape[1:], generator=g)
        r[:2] = torch.stack([torch.zeros_like(r[0]), torch.ones_like(r[0])])  # two corners
        s = xl[b] + (xu[b] - xl[b]) * r
        with torch.no_grad():
            m = model(s) @ C[b].T  # [n, S]
        tol = 1e-4 * max(1.0, float(lb[b].abs().max()))
        assert (m >= lb[b] - tol).all(), f"sample below the lower bound (batch {b})"
        assert (m <= ub[b] + tol).all(), f"sample above the upper bound (batch {b})"


# ----------------------------------------------------------------- reference CROWN for Linear/ReLU
def _relax(l, u):
    """auto_LiRPA's ReLU relaxation: (lower slope, upper slope, upper intercept), elementwise."""
    lr, ur = l.clamp(max=0), u.clamp(min=0)
    ur = torch.max(ur, lr + 1e-8)
    du = ur / (ur - lr)
    return (du > 0.5).to(du.dtype), du, -lr * du


def _backward(Ws, bs, bounds, k, C, xl, xu):
    """CROWN bounds of C @ z_k over the box, z_j = W_j relu(z_{j-1}) + b_j (z_0 = x); bounds[j] = (l, u)."""
    out = []
    for sign in (1.0, -1.0):
        A, bias = sign * C @ Ws[k - 1], sign * C @ bs[k - 1]
        for j in range(k - 1, 0, -1):
            dl, du, bu = _relax(*bounds[j])
            Ap, An = A.clamp(min=0), A.clamp(max=0)
            bias = bias + An @ bu
            A = Ap * dl + An * du
            bias = bias + A @ bs[j - 1]
            A = A @ Ws[j - 1]
        out.append(sign * (A.clamp(min=0) @ xl + A.clamp(max=0) @ xu + bias))
    return out[0], out[1]


def _reference_crown(Ws, bs, xls, xus, rule: str = "autolirpa"):
    """Per-sample bounds under a named intermediate-bound rule (float64).

    autolirpa: reference r = IBP of one layer from the previous layer's bounds; U = r-unstable neurons
    (union over the batch); if |U| <= 0.9 dim: CROWN for U, r elsewhere; else CROWN for all; no
    intersection.  pure: CROWN for all neurons.  intersect: CROWN intersected with r.
    """
    B, n = len(xls), len(Ws)
    bounds = [dict() for _ in range(B)]
    for k in range(1, n):
        dim = Ws[k - 1].shape[0]
        I = torch.eye(dim, dtype=Ws[0].dtype)
        if k == 1:  # one affine layer: interval arithmetic is exact
            for b in range(B):
                c, r = (xls[b] + xus[b]) / 2, (xus[b] - xls[b]) / 2
                mid, rad = Ws[0] @ c + bs[0], Ws[0].abs() @ r
                bounds[b][1] = (mid - rad, mid + rad)
            continue
        refs = []
        for b in range(B):
            pl, pu = bounds[b][k - 1]
            c, r = (pl.clamp(min=0) + pu.clamp(min=0)) / 2, (pu.clamp(min=0) - pl.clamp(min=0)) / 2
            mid, rad = Ws[k - 1] @ c + bs[k - 1], Ws[k - 1].abs() @ r
            refs.append((mid - rad, mid + rad))
        unstable = torch.stack([(rl < 0) & (ru > 0) for rl, ru in refs]).any(0)
        for b in range(B):
            l, u = _backward(Ws, bs, bounds[b], k, I, xls[b], xus[b])
            rl, ru = refs[b]
            if rule == "autolirpa" and unstable.sum() <= 0.9 * dim:
                l, u = torch.where(unstable, l, rl), torch.where(unstable, u, ru)
            elif rule == "intersect":
                l, u = torch.max(l, rl), torch.min(u, ru)
            bounds[b][k] = (l, u)
    I = torch.eye(Ws[-1].shape[0], dtype=Ws[0].dtype)
    return [_backward(Ws, bs, bounds[b], n, I, xls[b], xus[b]) for b in range(B)], bounds


def _mlp(layers: list[tuple[list, list]]) -> tuple[nn.Sequential, list, list]:
    """Sequential Linear/ReLU net from [(W, b)] (float32) and its float64 weights."""
    mods: list[nn.Module] = []
    for i, (W, b) in enumerate(layers):
        W, b = torch.tensor(W, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)
        lin = nn.Linear(W.shape[1], W.shape[0])
        with torch.no_grad():
            lin.weight.copy_(W)
            lin.bias.copy_(b)
        mods += [lin, nn.ReLU()] if i < len(layers) - 1 else [lin]
    model = nn.Sequential(*mods).eval()
    lins = [m for m in model if isinstance(m, nn.Linear)]
    return model, [m.weight.detach().double() for m in lins], [m.bias.detach().double() for m in lins]


def _tricky_net(n_cross: int, n_ibp_stable: int, w_cross: float):
    """Input box [-1, 3]^2.  Layer 2 has 'crossing' neurons (CROWN looser than IBP below, tighter
    above), neurons that IBP proves stable but CROWN does not (relu(x2) + 0.5), and one stable one."""
    W1, b1 = [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], [0.0, 0.0, 0.0]
    W2, b2, w3 = [], [], []
    for r in range(n_cross):
        W2.append([1.0 * (1 + 0.1 * r), -0.9 * (1 + 0.1 * r), 2.0 * (1 + 0.1 * r)])
        b2.append(0.1 * r)
        w3.append(w_cross)
    for _ in range(n_ibp_stable):
        W2.append([0.0, 0.0, 1.0])
        b2.append(0.5)
        w3.append(-1.0)
    W2.append([0.0, 0.0, 2.0])
    b2.append(10.0)
    w3.append(1.0)
    return _mlp([(W1, b1), (W2, b2), ([w3], [0.0])])


# ----------------------------------------------------------------------------------------- tests
def test_available_and_errors():
    assert lirpa.available() and lirpa.import_error() is None
    model, xl, xu, C = _problem("mlp", 1, 0.01)
    with pytest.raises(UsageError):
        lirpa.autolirpa_bounds(model, xl, xu, "deeppoly")
    with pytest.raises(UsageError):
        lirpa.autolirpa_bounds(model, xu, xl, "crown")  # lower > upper
    with pytest.raises(UsageError):
        lirpa.autolirpa_bounds(model, xl, xu, "crown", C=C[0])  # C without batch dimension


def test_mlp_all_methods_sound_and_alpha_tighter():
    model, xl, xu, C = _problem("mlp", 2, 0.02)
    res = {}
    for method in ("ibp", "crown", "alpha-crown"):
        lb, ub = lirpa.autolirpa_bounds(model, xl, xu, method, C=C, alpha_iterations=10)
        assert lb.shape == ub.shape == (2, 10)
        _assert_contains_samples(model, xl, xu, C, lb, ub)
        res[method] = (lb, ub)
    (cl, cu), (al, au), (il, _) = res["crown"], res["alpha-crown"], res["ibp"]
    assert (al >= cl - 1e-5).all() and (au <= cu + 1e-5).all()
    assert (al > cl + 1e-4).any(), "alpha-CROWN should improve some bound on this problem"
    off = C.abs().sum(2) > 0  # [B, 10]; the y - y row is 0 for every method
    assert (cl >= il - 1e-6).all() and (cl[off] > il[off]).all(), "CROWN should beat IBP here"
    assert all(p.requires_grad for p in model.parameters()), "the oracle must not freeze the model"


def test_crown_identity_spec_is_default():
    model, xl, xu, _ = _problem("mlp", 1, 0.01)
    lb, ub = lirpa.autolirpa_bounds(model, xl, xu, "crown")
    lb2, ub2 = lirpa.autolirpa_bounds(model, xl, xu, "crown", C=torch.eye(10).unsqueeze(0))
    assert lb.shape == (1, 10)
    assert torch.allclose(lb, lb2, atol=1e-6) and torch.allclose(ub, ub2, atol=1e-6)


def test_cnnb_sound_patches_equals_matrix():
    model, xl, xu, C = _problem("cnn-b", 1, 0.005)
    for method in ("ibp", "crown"):
        lb, ub = lirpa.autolirpa_bounds(model, xl, xu, method, C=C, conv_mode="patches")
        _assert_contains_samples(model, xl, xu, C, lb, ub)
        if method == "crown":
            lm, um = lirpa.autolirpa_bounds(model, xl, xu, method, C=C, conv_mode="matrix")
            assert torch.allclose(lb, lm, atol=1e-4) and torch.allclose(ub, um, atol=1e-4)
    al, au = lirpa.autolirpa_bounds(model, xl, xu, "alpha-crown", C=C, alpha_iterations=3)
    _assert_contains_samples(model, xl, xu, C, al, au)
    assert (al >= lb - 1e-5).all() and (au <= ub + 1e-5).all()


def test_grafted_cnnb_crown_sound():
    model, xl, xu, C = _problem("cnn-b", 1, 0.005, graft=True)
    assert any(isinstance(m, GraftedReLU) and m.num_grafted > 0 for m in model)
    for method in ("ibp", "crown"):
        lb, ub = lirpa.autolirpa_bounds(model, xl, xu, method, C=C, conv_mode="patches")
        _assert_contains_samples(model, xl, xu, C, lb, ub)


def test_grafted_mlp_alpha_crown():
    model, xl, xu, C = _problem("mlp", 2, 0.02, graft=True)
    cl, cu = lirpa.autolirpa_bounds(model, xl, xu, "crown", C=C)
    al, au = lirpa.autolirpa_bounds(model, xl, xu, "alpha-crown", C=C, alpha_iterations=5)
    _assert_contains_samples(model, xl, xu, C, al, au)
    assert (al >= cl - 1e-5).all() and (au <= cu + 1e-5).all()


def test_grafted_ibp_is_exact_interval_arithmetic():
    """Regression (P9 of the module): IBP through relu(s*x) + t*x + c equals the interval of
    a*x + b for grafted neurons and relu(x) for the others (0.3 computed t = mask*a as mask*mask)."""
    torch.manual_seed(0)
    l1, l2 = nn.Linear(6, 8), nn.Linear(8, 3)
    mask = torch.tensor([1.0, 0, 1, 0, 1, 1, 0, 0])
    g = GraftedReLU((8,), mask, init_a=0.3, init_b=0.05)
    with torch.no_grad():
        g.a.copy_(torch.linspace(-0.5, 0.7, 8))
    model = nn.Sequential(l1, g, l2).eval()
    xl, xu = -torch.rand(2, 6), torch.rand(2, 6)
    lb, ub = lirpa.autolirpa_bounds(model, xl, xu, "ibp")
    with torch.no_grad():
        c, r = (xl + xu) / 2, (xu - xl) / 2
        zl, zu = l1(c) - r @ l1.weight.abs().T, l1(c) + r @ l1.weight.abs().T
        a, b = g.a, g.b
        hl = torch.where(mask.bool(), torch.minimum(a * zl, a * zu) + b, zl.clamp(min=0))
        hu = torch.where(mask.bool(), torch.maximum(a * zl, a * zu) + b, zu.clamp(min=0))
        c, r = (hl + hu) / 2, (hu - hl) / 2
        el, eu = l2(c) - r @ l2.weight.abs().T, l2(c) + r @ l2.weight.abs().T
    assert torch.allclose(lb, el, atol=1e-5) and torch.allclose(ub, eu, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("conv_mode", ["patches", "matrix"])
def test_grafted_cnnb_all_methods_both_modes(conv_mode):
    model, xl, xu, C = _problem("cnn-b", 1, 0.01, graft=True)
    crown = lirpa.autolirpa_bounds(model, xl, xu, "crown", C=C, conv_mode=conv_mode)
    alpha = lirpa.autolirpa_bounds(model, xl, xu, "alpha-crown", C=C, conv_mode=conv_mode, alpha_iterations=3)
    for lb, ub in (crown, alpha):
        _assert_contains_samples(model, xl, xu, C, lb, ub)
    assert (alpha[0] >= crown[0] - 1e-5).all()


@pytest.mark.parametrize("eps", [0.001, 0.01])
def test_mlp_crown_matches_documented_rule(eps):
    """Intermediate and final CROWN bounds equal the documented rule (reference in float64)."""
    model, xl, xu, C = _problem("mlp", 2, eps, seed=3)
    lins = [m for m in model if isinstance(m, nn.Linear)]
    Ws = [m.weight.detach().double() for m in lins]
    bs = [m.bias.detach().double() for m in lins]
    mean, std = MNIST["mean"][0], MNIST["std"][0]
    zl = [((xl[b].flatten() - mean) / std).double() for b in range(2)]
    zu = [((xu[b].flatten() - mean) / std).double() for b in range(2)]
    final, inter = _reference_crown(Ws, bs, zl, zu)
    lb, ub = lirpa.autolirpa_bounds(model, xl, xu, "crown")
    got = lirpa.autolirpa_intermediate_bounds(model, xl, xu, "crown")
    assert len(got) == 2 and got[0][0].shape == (2, 100)
    for b in range(2):
        assert torch.allclose(lb[b].double(), final[b][0], atol=1e-4)
        assert torch.allclose(ub[b].double(), final[b][1], atol=1e-4)
        for k in (1, 2):
            assert torch.allclose(got[k - 1][0][b].double(), inter[b][k][0], atol=1e-4)
            assert torch.allclose(got[k - 1][1][b].double(), inter[b][k][1], atol=1e-4)


def test_intermediate_bounds_contain_preactivations():
    model, xl, xu, _ = _problem("cnn-b", 1, 0.01)
    got = lirpa.autolirpa_intermediate_bounds(model, xl, xu, "crown")
    ibp = lirpa.autolirpa_intermediate_bounds(model, xl, xu, "ibp")
    relu_inputs = []
    hooks = [m.register_forward_hook(lambda m, i, o: relu_inputs.append(i[0])) for m in model if isinstance(m, nn.ReLU)]
    with torch.no_grad():
        model(xl + (xu - xl) * torch.rand(200, *SHAPE))
    for h in hooks:
        h.remove()
    assert len(got) == len(ibp) == len(relu_inputs) == 3
    for (l, u), z in zip(got, relu_inputs):
        assert l.shape[1:] == z.shape[1:]
        assert (z >= l - 1e-4).all() and (z <= u + 1e-4).all()
    # CROWN intermediate bounds are tighter than pure IBP on average in the deeper layers
    assert (got[-1][1] - got[-1][0]).mean() < (ibp[-1][1] - ibp[-1][0]).mean()


@pytest.mark.parametrize(
    "n_cross,n_ibp_stable,w_cross,differs_from",
    [
        (1, 1, 0.2, "pure"),  # 1 of 3 reference-unstable: IBP-stable neuron keeps its reference
        (8, 2, 0.2, "pure"),  # 8 of 11 <= 90%: sparse
        (18, 1, 0.2, "pure"),  # 18 of 20 = 90%: still sparse
        (19, 1, 0.2, "intersect"),  # 19 of 21 > 90%: CROWN for all (== pure), and no intersection
        (1, 1, -0.2, "intersect"),  # sparse, and the crossing neuron's CROWN bounds are not intersected
    ],
)
def test_sparse_rule_no_intersection_threshold(n_cross, n_ibp_stable, w_cross, differs_from):
    model, Ws, bs = _tricky_net(n_cross, n_ibp_stable, w_cross)
    xl, xu = torch.tensor([[-1.0, -1.0]]), torch.tensor([[3.0, 3.0]])
    lb, ub = lirpa.autolirpa_bounds(model, xl, xu, "crown")
    ref = {
        rule: _reference_crown(Ws, bs, [xl[0].double()], [xu[0].double()], rule)[0][0]
        for rule in ("autolirpa", "pure", "intersect")
    }
    ref = {k: (v[0].item(), v[1].item()) for k, v in ref.items()}
    assert (lb.item(), ub.item()) == pytest.approx(ref["autolirpa"], abs=1e-4)
    # the net is built so that the documented rule and the named alternative disagree
    assert ref[differs_from] != pytest.approx(ref["autolirpa"], abs=1e-3)
    if n_cross / (n_cross + n_ibp_stable + 1) > 0.9:
        assert ref["pure"] == pytest.approx(ref["autolirpa"], abs=1e-6)


def test_unstable_set_is_union_over_batch():
    """A sample's CROWN bounds change when another sample in the batch makes a neuron unstable."""
    model, Ws, bs = _mlp(
        [
            ([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], [0.0, 0.0, 0.0]),
            ([[-0.3, 0.0, 1.0], [0.0, 0.0, 2.0]], [0.5, 10.0]),
            ([[-1.0, 1.0]], [0.0]),
        ]
    )
    xl, xu = torch.tensor([[-1.0, -1.0], [-1.0, -1.0]]), torch.tensor([[1.0, 3.0], [3.0, 3.0]])
    alone = lirpa.autolirpa_bounds(model, xl[:1], xu[:1], "crown")[0]
    together = lirpa.autolirpa_bounds(model, xl, xu, "crown")[0]
    ref = _reference_crown(Ws, bs, [xl[0].double(), xl[1].double()], [xu[0].double(), xu[1].double()])[0]
    assert together[0].item() == pytest.approx(ref[0][0].item(), abs=1e-4)
    assert together[1].item() == pytest.approx(ref[1][0].item(), abs=1e-4)
    assert alone.item() == pytest.approx(8.5, abs=1e-4)  # reference-stable when alone
    assert together[0].item() < alone.item() - 0.5


def test_adaptive_lower_slope_tie_is_zero():
    """u == -l gives lower slope 0 (strict u > -l for slope 1), in both bound directions."""
    # z1 = x in [-1, 1] (tie), output = relu(z1) and -relu(z1)
    model, Ws, bs = _mlp([([[1.0]], [0.0]), ([[1.0], [-1.0]], [0.0, 0.0])])
    lb, ub = lirpa.autolirpa_bounds(model, torch.tensor([[-1.0]]), torch.tensor([[1.0]]), "crown")
    assert lb[0].tolist() == pytest.approx([0.0, -1.0], abs=1e-6)  # slope 0: relu >= 0
    assert ub[0].tolist() == pytest.approx([1.0, 0.0], abs=1e-6)
    # u slightly above -l: slope 1, lower bound of relu becomes l = -1
    lb, ub = lirpa.autolirpa_bounds(model, torch.tensor([[-1.0]]), torch.tensor([[1.01]]), "crown")
    assert lb[0, 0].item() == pytest.approx(-1.0, abs=1e-6)
    assert ub[0, 1].item() == pytest.approx(1.0, abs=1e-6)  # -relu <= -x <= 1: same slope for upper
