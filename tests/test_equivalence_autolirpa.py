"""lingraft's engine against auto_LiRPA 0.3 (an independent implementation of the same algorithms).

IBP and CROWN bounds must agree within 1e-4 on MLP, CNN and residual models, grafted ones included (auto_LiRPA sees
the graft as relu(s*x) + t*x + c; lingraft.compat.auto_lirpa patches the 0.3 bugs that made those bounds wrong).
In "autolirpa" mode lingraft reproduces auto_LiRPA's choice of intermediate bounds exactly; the default "tight" mode
may only be tighter. alpha-CROWN is at least as tight as CROWN.
"""

import pytest
import torch

from lingraft.bounds import BoundedNetwork, input_box, margin_spec
from lingraft.models import create_model

lirpa = pytest.importorskip("lingraft.compat.auto_lirpa")
if not lirpa.available():  # pragma: no cover
    pytest.skip(f"auto_LiRPA unavailable: {lirpa.import_error()}", allow_module_level=True)

from _soundness import graft_randomly  # noqa: E402

CASES = [
    ("mlp", (1, 28, 28), 0.02),
    ("fc-8x200", (1, 12, 12), 0.01),
    ("cnn-b", (1, 16, 16), 0.01),
    ("resnet-4b", (1, 12, 12), 0.005),
]


def _setup(name, shape, eps, graft, seed=0):
    torch.manual_seed(seed)
    model = create_model(name, shape).eval()
    if graft:
        model = graft_randomly(model, shape, 0.5, seed=seed).eval()
    x = torch.rand(3, *shape)
    xl, xu = input_box(x, eps)
    with torch.no_grad():
        C = margin_spec(model(x).argmax(1), 10)
    return model, xl, xu, C


PARAMS = [(*c, g) for c in CASES for g in (False, True)]


@pytest.mark.parametrize("name,shape,eps,graft", PARAMS)
def test_ibp_and_crown_equal_auto_lirpa(name, shape, eps, graft):
    model, xl, xu, C = _setup(name, shape, eps, graft)
    for method in ("ibp", "crown"):
        la, ua = lirpa.autolirpa_bounds(model, xl, xu, method, C)
        ours = BoundedNetwork(model, shape, mode="autolirpa").compute_bounds(xl, xu, method, C)
        scale = max(1.0, float(la.abs().max()))
        assert (ours.lower - la).abs().max() <= 1e-4 * scale, f"{method} lower differs"
        assert (ours.upper - ua).abs().max() <= 1e-4 * scale, f"{method} upper differs"
        tight = BoundedNetwork(model, shape).compute_bounds(xl, xu, method, C)
        assert (tight.lower >= la - 1e-4 * scale).all() and (tight.upper <= ua + 1e-4 * scale).all()


@pytest.mark.parametrize("name,shape,eps", CASES[:3])
def test_alpha_crown_at_least_crown(name, shape, eps):
    model, xl, xu, C = _setup(name, shape, eps, False, seed=1)
    net = BoundedNetwork(model, shape)
    cr = net.compute_bounds(xl, xu, "crown", C)
    al = net.compute_bounds(xl, xu, "alpha-crown", C, alpha_iterations=10)
    assert (al.lower >= cr.lower - 1e-6).all()


@pytest.mark.parametrize("name,shape,eps", CASES[2:])
def test_grafted_conv_nets_contain_pgd_points(name, shape, eps):
    from _soundness import pgd_extremes

    model, xl, xu, C = _setup(name, shape, eps, True)
    ours = BoundedNetwork(model, shape).compute_bounds(xl, xu, "crown", C)
    pmin, pmax = pgd_extremes(model, C, xl, xu, steps=60)
    assert (pmin >= ours.lower - 1e-5).all() and (pmax <= ours.upper + 1e-5).all()
