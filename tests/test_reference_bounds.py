"""Reference bounds and the patch/dense choice: what input splitting and refined branch and bound rest on.

A box inside a bounded box inherits the outer box's intermediate bounds (``ref_bounds``): CROWN then runs only on
the neurons they leave unstable, the result lies inside the reference, and stays sound. The engine takes the
patch pass only where patches stay smaller than their planes; both passes give the same bounds.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from lingraft.bounds import BoundedNetwork
from lingraft.clock import now
from lingraft.spec.region import region_spec
from lingraft.spec.vnnlib import OutputConstraint, Region, VnnlibProperty
from lingraft.verify.bounding import bound_domains, split_clamps
from lingraft.verify.relu_bab import ReluBaB
from lingraft.verify.search import KeptBounds

torch.set_num_threads(1)


class _FieldNet(nn.Module):
    """cifar_biasfield in miniature: a few coefficients -> Linear -> image -> convs -> logits."""

    def __init__(self, n_in: int = 4, hw: int = 8):
        super().__init__()
        self.hw = hw
        self.lin = nn.Linear(n_in, 3 * hw * hw)
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(8 * (hw // 2) ** 2, 5),
        )

    def forward(self, x):
        return self.body(self.lin(x).reshape(-1, 3, self.hw, self.hw))


def _net(seed: int = 0):
    torch.manual_seed(seed)
    model = _FieldNet().eval()
    return model, BoundedNetwork(model, (4,))


def _count_pairs(net: BoundedNetwork) -> list[int]:
    """Wrap net.bound_pairs to count the (sample, neuron) pairs CROWN bounds; returns the live counter."""
    count = [0]
    inner = net.bound_pairs

    def counting(i, rows, *a, **k):
        count[0] += rows.numel()
        return inner(i, rows, *a, **k)

    net.bound_pairs = counting  # type: ignore[method-assign]
    return count


def test_child_box_with_parent_bounds_is_sound_and_inside_the_parents():
    model, net = _net()
    x_L, x_U = torch.full((1, 4), -1.0), torch.full((1, 4), 1.0)
    parent = net.intermediate_bounds(x_L, x_U)
    c_L, c_U = x_L.clone(), x_U.clone()
    c_U[0, 0] = 0.0  # the lower half along the first coefficient
    count = _count_pairs(net)
    child = net.intermediate_bounds(c_L, c_U, ref_bounds=parent)
    with_ref = count[0]
    count[0] = 0
    net.intermediate_bounds(c_L, c_U)
    assert 0 < with_ref < count[0]  # fewer CROWN pairs: the parent's bounds settle some neurons
    checked = 0
    for j in net.bounded_nodes()[1:]:
        lo, up = child[j]
        assert bool((lo >= parent[j][0]).all() and (up <= parent[j][1]).all())
        checked += 1
    assert checked >= 3
    # sound: every sampled point of the child box lies inside the child's bounds
    xs = c_L + (c_U - c_L) * torch.rand(4000, 4)
    with torch.no_grad():
        outs = [xs]
        for nd in net.nodes[1:]:
            outs.append(nd.op.forward(*[outs[k] for k in nd.inputs]))
    for j in net.bounded_nodes()[1:]:
        lo, up = child[j]
        assert bool((outs[j] >= lo - 1e-5).all() and (outs[j] <= up + 1e-5).all()), j


def test_split_neurons_are_not_bounded_by_crown_again():
    """A split neuron is stable under its clamp: refined branch and bound runs no CROWN pass for it."""
    _, net = _net(1)
    x_L, x_U = torch.full((1, 4), -1.0), torch.full((1, 4), 1.0)
    bounds = net.intermediate_bounds(x_L, x_U)
    relu, pre = next(iter(net.relu_input_nodes().items()))
    lo, up = bounds[pre]
    unstable = torch.nonzero(((lo < 0) & (up > 0)).flatten()).flatten()
    assert unstable.numel() >= 2
    s = torch.zeros(1, *lo.shape[1:], dtype=torch.int8)
    s.view(-1)[unstable] = 1  # every unstable neuron of the first layer split active
    count = _count_pairs(net)
    res = bound_domains(net, x_L, x_U, torch.eye(5).unsqueeze(0), splits={relu: s})
    assert bool((res.bounds[pre][0].flatten()[unstable] >= 0).all())
    first = count[0]
    count[0] = 0
    net.intermediate_bounds(x_L, x_U, interm_bounds=split_clamps(net, {relu: s}))
    assert count[0] == first
    count[0] = 0
    net.intermediate_bounds(x_L, x_U)
    assert first < count[0]


def test_root_bounds_as_reference_keep_refined_domains_inside_the_roots():
    _, net = _net(2)
    x_L, x_U = torch.full((2, 4), -1.0), torch.full((2, 4), 1.0)
    root = net.intermediate_bounds(x_L[:1], x_U[:1])
    ref = [None if b is None else (b[0].expand(2, *b[0].shape[1:]), b[1].expand(2, *b[1].shape[1:])) for b in root]
    res = bound_domains(net, x_L, x_U, torch.eye(5).unsqueeze(0).expand(2, -1, -1), ref_bounds=ref)
    xs = x_L[:1] + (x_U[:1] - x_L[:1]) * torch.rand(4000, 4)
    with torch.no_grad():
        y = net.forward(xs)
    assert bool((y.min(0).values >= res.lower - 1e-5).all())  # sound
    for j in net.bounded_nodes()[1:]:
        assert bool((res.bounds[j][0] >= root[j][0] - 1e-6).all() and (res.bounds[j][1] <= root[j][1] + 1e-6).all())


class _DeepSmallConv(nn.Module):
    """Convolutions on a 6x6 image whose receptive fields soon cover the whole plane."""

    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(4 * 36, 3),
        )

    def forward(self, x):
        return self.f(x)


def test_patch_pass_only_where_patches_stay_smaller_than_their_plane():
    torch.manual_seed(3)
    model = _DeepSmallConv().eval()
    net = BoundedNetwork(model, (2, 6, 6))
    convs = [i for i, nd in enumerate(net.nodes) if nd.op is not None and nd.op.starts_patches]
    assert len(convs) == 4
    chains = [net._chain(i) for i in convs]
    # the second conv's patches are 5x5 on the 6x6 input (0.69 of it): patches; the last's would be 9x9: dense
    assert chains[1] is not None and chains[3] is None
    x = torch.rand(2, 2, 6, 6)
    with_choice = net.intermediate_bounds(x - 0.1, x + 0.1)
    dense = BoundedNetwork(model, (2, 6, 6))
    dense.use_patches = False
    ref = dense.intermediate_bounds(x - 0.1, x + 0.1)
    for j in net.bounded_nodes()[1:]:
        assert torch.allclose(with_choice[j][0], ref[j][0], atol=1e-5)
        assert torch.allclose(with_choice[j][1], ref[j][1], atol=1e-5)


def test_linear_reshape_conv_takes_the_dense_pass():
    """A conv right after the Reshape of a Linear: patches would end at once, so the dense pass is used."""
    _, net = _net()
    first_conv = next(i for i, nd in enumerate(net.nodes) if nd.op is not None and nd.op.starts_patches)
    assert net._chain(first_conv) is None


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1)
    ).eval()


def test_settled_samples_keep_their_reference_up_to_the_settled_node():
    net = BoundedNetwork(_mlp(), (2,))
    x_L, x_U = torch.full((2, 2), -1.0), torch.full((2, 2), 1.0)
    ref = net.intermediate_bounds(x_L, x_U)
    pres = sorted(net.relu_input_nodes().values())
    settled = torch.tensor([pres[1], -1])  # sample 0: final up to the second pre-activation; sample 1: none
    count = _count_pairs(net)
    out = net.intermediate_bounds(x_L, x_U, ref_bounds=ref, settled_upto=settled)
    with_settled = count[0]
    count[0] = 0
    free = net.intermediate_bounds(x_L, x_U, ref_bounds=ref)
    assert with_settled < count[0]
    for j in pres[:2]:  # sample 0 kept the reference there; sample 1 was bounded as without settled_upto
        assert bool((out[j][0][0] >= ref[j][0][0]).all() and (out[j][1][0] <= ref[j][1][0]).all())
        assert torch.equal(out[j][0][1], free[j][0][1]) and torch.equal(out[j][1][1], free[j][1][1])
    assert torch.equal(out[pres[2]][0], free[pres[2]][0])  # past the settled node both are recomputed


def test_relu_bab_children_start_from_their_parents_bounds():
    """Kept parent bounds change the work (fewer CROWN pairs), not the verdict; both are sound."""
    model = _mlp(5)
    g = torch.linspace(-1, 1, 301)
    X = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        low = float(model(X).min())

    def search(threshold: float, bounds_mb: float):
        c = OutputConstraint(np.array([[1.0]]), np.array([threshold]))
        prop = VnnlibProperty(2, 1, [Region(np.array([-1.0, -1.0]), np.array([1.0, 1.0]), [c])], None)
        net = BoundedNetwork(model, (2,))
        spec = region_spec(prop.regions[0], (2,), 1)
        root = bound_domains(net, spec.x_L, spec.x_U, spec.C[None], iterations=20, record_lA=True)
        bab = ReluBaB(
            net,
            spec,
            model,
            lambda xs, v: None,
            now() + 300,
            batch_size=8,
            max_rounds=300,
            bounds_memory_mb=bounds_mb,
            attack_every=float("inf"),
        )
        count = _count_pairs(net)
        out = bab.run(root)
        return out, count[0]

    net = BoundedNetwork(model, (2,))
    box = torch.full((1, 2), 1.0)
    root_low = float(bound_domains(net, -box, box, torch.ones(1, 1, 1), iterations=20).lower)
    threshold = root_low + 0.5 * (low - root_low)  # alpha-CROWN alone cannot prove it, the true minimum is above
    assert root_low < threshold < low - 0.05
    kept, kept_pairs = search(threshold, 64.0)
    plain, plain_pairs = search(threshold, 0.0)
    assert kept.status == plain.status == "unsat" and kept.branches > 2
    assert kept_pairs < plain_pairs
    bad, _ = search(low + 0.01, 64.0)  # violated on the grid: never unsat
    assert bad.status in ("unknown", "timeout")


def test_kept_bounds_go_to_each_parents_own_children():
    """A child must get its own parent's bounds (another box's would be unsound): both child orders, and the
    root's for a parent that kept none."""
    root = [None, (torch.full((1, 3), -9.0), torch.full((1, 3), 9.0))]
    store = KeptBounds(root, memory_bytes=2 * 2 * 3 * 4)  # room for two domains
    batch = [(torch.full((2, 3), float(p)), torch.full((2, 3), p + 0.5)) for p in (0, 1)]
    kept = [store.keep([None, (batch[0][0], batch[0][1])], 0, 0), store.keep([None, batch[1]], 1, 1)]
    assert store.keep([None, batch[1]], 0, 2) is None  # past the memory: nothing kept
    kept.append(None)
    lo_i, up_i = store.for_children(kept, interleaved=True)[1]
    assert lo_i[:, 0].tolist() == [0.0, 0.0, 1.0, 1.0, -9.0, -9.0] and up_i[:, 0].tolist() == [0.5, 0.5, 1.5, 1.5, 9, 9]
    lo_h, _ = store.for_children(kept, interleaved=False)[1]
    assert lo_h[:, 0].tolist() == [0.0, 1.0, -9.0, 0.0, 1.0, -9.0]
