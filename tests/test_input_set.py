"""InputSet: the concretization of a linear function over a box (exact: attained at a corner) and over a box
intersected with an L2 ball (a valid bound, never looser than the box's); samples select cleanly."""

import itertools

import torch

from lingraft.bounds.input_set import InputSet


def test_box_concretization_is_exact_at_the_corners():
    g = torch.Generator().manual_seed(0)
    lo = torch.rand(2, 4, generator=g) - 0.5
    up = lo + torch.rand(2, 4, generator=g)
    A = torch.randn(2, 3, 4, generator=g)
    s = InputSet(lo, up)
    corners = torch.tensor(list(itertools.product([0.0, 1.0], repeat=4)))  # [16, 4]
    pts = lo.unsqueeze(1) + corners.unsqueeze(0) * (up - lo).unsqueeze(1)  # [2, 16, 4]
    vals = torch.einsum("bsi,bki->bsk", A, pts)
    assert torch.allclose(s.concretize(A, -1), vals.min(-1).values, atol=1e-5)
    assert torch.allclose(s.concretize(A, 1), vals.max(-1).values, atol=1e-5)


def test_l2_ball_bound_is_valid_and_never_looser_than_the_box():
    g = torch.Generator().manual_seed(1)
    center = torch.rand(1, 5, generator=g)
    eps = 0.1
    box = InputSet(center - 0.2, center + 0.2)
    both = InputSet(center - 0.2, center + 0.2, center, eps)
    A = torch.randn(1, 4, 5, generator=g)
    lo_box, lo = box.concretize(A, -1), both.concretize(A, -1)
    assert (lo >= lo_box - 1e-6).all() and (lo > lo_box).any()
    d = torch.randn(4000, 5, generator=g)
    x = center + eps * d / d.norm(dim=1, keepdim=True) * torch.rand(4000, 1, generator=g)  # inside both sets
    vals = torch.einsum("si,ki->sk", A[0], x)
    assert (vals.min(1).values >= lo[0] - 1e-5).all()
    assert (vals.max(1).values <= both.concretize(A, 1)[0] + 1e-5).all()


def test_select_keeps_each_samples_ball_centre():
    c = torch.arange(6.0).reshape(3, 2)
    s = InputSet(c - 1, c + 1, c, 0.5).select(torch.tensor([2, 0]))
    assert torch.equal(s.l2_center, c[[2, 0]]) and torch.equal(s.lower, c[[2, 0]] - 1) and s.l2_eps == 0.5
    assert s.select(slice(1, 2)).batch == 1
