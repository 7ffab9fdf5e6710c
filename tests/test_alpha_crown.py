"""alpha-CROWN with a slope per (start node, unstable neuron): sound, never looser than CROWN, the same in the
patch and the dense pass, tighter than optimising the final layer alone, and samples CROWN proves are left alone."""

import pytest
import torch
from _soundness import check_sound, graft_randomly, pgd_extremes

from lingraft.bounds import BoundedNetwork, input_box, margin_spec
from lingraft.bounds.alpha_crown import optimize_alpha
from lingraft.bounds.input_set import InputSet
from lingraft.models import create_model

IN = (1, 12, 12)


def _problem(name, seed, eps=0.03, n=3, graft=0.0):
    torch.manual_seed(seed)
    model = create_model(name, IN).eval()
    if graft:
        model = graft_randomly(model, IN, graft).eval()
    x = torch.rand(n, *IN)
    xl, xu = input_box(x, eps)
    C = margin_spec(model(x).argmax(1), 10)
    return model, xl, xu, C


@pytest.mark.parametrize("graft", [0.0, 0.5])
@pytest.mark.parametrize("name", ["mlp", "cnn-b", "resnet-4b"])
def test_all_layer_alpha_is_sound(name, graft):
    torch.manual_seed(11)
    model = create_model(name, IN)
    if graft:
        model = graft_randomly(model, IN, graft)
    check_sound(model, IN, 0.04, "alpha-crown")


@pytest.mark.parametrize("name", ["mlp", "cnn-b"])
def test_all_layer_alpha_never_below_pgd_and_at_least_crown_and_final_only(name):
    model, xl, xu, C = _problem(name, 5)
    net = BoundedNetwork(model, IN)
    crown = net.compute_bounds(xl, xu, "crown", C, bound_upper=False).lower
    final = net.compute_bounds(xl, xu, "alpha-crown", C, bound_upper=False, alpha_intermediate=False).lower
    full = net.compute_bounds(xl, xu, "alpha-crown", C, bound_upper=False).lower
    assert (full >= crown).all()
    assert (final >= crown).all()
    # the intermediate slopes tighten the intermediate bounds too: on these nets the gain is large, not noise
    assert float((full - final).mean()) > 0.01 * float((final - crown).abs().mean() + 1e-3)
    lo_attack, _ = pgd_extremes(model, C, xl, xu)
    assert (full <= lo_attack + 1e-4).all()


def test_patch_and_dense_passes_optimise_the_same_slopes():
    """A patch-form slope is the dense slope restricted to the neuron's window (outside it the coefficients are 0,
    so the dense slopes there get no gradient): both passes must give the same bounds."""
    model, xl, xu, C = _problem("cnn-b", 7)
    patched = BoundedNetwork(model, IN)
    dense = BoundedNetwork(model, IN)
    dense.use_patches = False
    a = patched.compute_bounds(xl, xu, "alpha-crown", C, bound_upper=False, alpha_iterations=8).lower
    b = dense.compute_bounds(xl, xu, "alpha-crown", C, bound_upper=False, alpha_iterations=8).lower
    assert torch.allclose(a, b, atol=2e-4, rtol=1e-4), (a - b).abs().max()


def test_returned_intermediate_bounds_are_at_least_as_tight_and_proved_samples_untouched():
    model, xl, xu, C = _problem("cnn-b", 9, n=4)
    net = BoundedNetwork(model, IN)
    with torch.no_grad():
        bounds = net.intermediate_bounds(xl, xu)
        C_out = C.reshape(C.shape[0], C.shape[1], *net.out_shape)
        crown, _ = net.backward_bound(C_out, xl, xu, bounds)
    # pretend sample 0 is already proved: it must come back unchanged and cost no optimisation
    crown = crown.clone()
    crown[0] = 1.0
    lower, tightened, _ = optimize_alpha(net, (C_out, InputSet(xl, xu), bounds), crown, iterations=5, lr=0.1)
    assert torch.equal(lower[0], crown[0])
    assert (lower >= crown).all()
    for b, t in zip(bounds, tightened):
        if b is None:
            assert t is None
            continue
        assert (t[0] >= b[0]).all() and (t[1] <= b[1]).all()
        assert torch.equal(t[0][0], b[0][0]) and torch.equal(t[1][0], b[1][0])


def test_zero_iterations_is_crown():
    model, xl, xu, C = _problem("mlp", 3)
    net = BoundedNetwork(model, IN)
    crown = net.compute_bounds(xl, xu, "crown", C, bound_upper=False).lower
    alpha0 = net.compute_bounds(xl, xu, "alpha-crown", C, bound_upper=False, alpha_iterations=0).lower
    assert torch.equal(crown, alpha0)


class _Unflatten(torch.nn.Module):
    def forward(self, x):
        return x.reshape(x.shape[0], 2, 6, 6)


def _linear_into_conv():
    """Linear -> Reshape into an image -> Conv -> ReLU -> Conv (as VNN-COMP's cifar_biasfield nets)."""
    torch.manual_seed(4)
    return torch.nn.Sequential(
        torch.nn.Linear(5, 72),
        _Unflatten(),
        torch.nn.Conv2d(2, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(4, 4, 3, stride=2, padding=1),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(36, 3),
    ).eval()


@pytest.mark.parametrize("method", ["crown", "alpha-crown"])
def test_patch_chain_ending_at_a_reshape_equals_the_dense_pass_and_is_sound(method):
    model = _linear_into_conv()
    patched = BoundedNetwork(model, (5,))
    dense = BoundedNetwork(model, (5,))
    dense.use_patches = False
    conv2 = next(i for i, nd in enumerate(patched.nodes) if i > 3 and type(nd.op).__name__ == "ConvOp")
    assert patched._chain(conv2) is not None  # the patch pass is used (it ends at the Reshape)
    x = torch.rand(3, 5)
    xl, xu = x - 0.3, x + 0.3
    C = torch.tensor([[1.0, -1.0, 0.0], [1.0, 0.0, -1.0]]).expand(3, 2, 3)
    a = patched.compute_bounds(xl, xu, method, C, alpha_iterations=5)
    b = dense.compute_bounds(xl, xu, method, C, alpha_iterations=5)
    assert torch.allclose(a.lower, b.lower, atol=1e-4, rtol=1e-4)
    assert torch.allclose(a.upper, b.upper, atol=1e-4, rtol=1e-4)
    lo_attack, hi_attack = pgd_extremes(model, C, xl, xu)
    assert (a.lower <= lo_attack + 1e-4).all() and (a.upper >= hi_attack - 1e-4).all()
