"""The one optimiser of relaxation parameters (lingraft.bounds.optimizer.ProjectedAdam): it is Adam with the
learning rate decaying per step, followed by a projection onto each group's box."""

from __future__ import annotations

import torch

from lingraft.bounds.optimizer import LR_DECAY, ParamGroup, ProjectedAdam


def _loss(p: torch.Tensor, q: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((p - target) ** 2 * torch.linspace(0.1, 3.0, p.numel()).reshape(p.shape)).sum() + (q**2).sum()


def test_matches_torch_adam_with_exponential_decay():
    """Same iterates as torch.optim.Adam + ExponentialLR(LR_DECAY) when no projection is active (unbounded group),
    including gradients far below eps and exact zeros (the second moment is shifted before its square root)."""
    torch.manual_seed(0)
    target = torch.randn(6, 5) * torch.tensor([1.0, 1e-6, 0.0, 1e-12, 3.0]).reshape(1, 5)
    p0 = torch.randn(6, 5) * 0.01
    p0[:, 2] = 0.0  # zero gradient for the whole column
    q0 = torch.randn(4)
    mine_p, mine_q = p0.clone().requires_grad_(True), q0.clone().requires_grad_(True)
    ref_p, ref_q = p0.clone().requires_grad_(True), q0.clone().requires_grad_(True)
    opt = ProjectedAdam([ParamGroup([mine_p], 0.05), ParamGroup([mine_q], 0.2)])
    ref = torch.optim.Adam([{"params": [ref_p], "lr": 0.05}, {"params": [ref_q], "lr": 0.2}])
    sched = torch.optim.lr_scheduler.ExponentialLR(ref, LR_DECAY)
    for _ in range(25):
        opt.step(_loss(mine_p, mine_q, target))
        ref.zero_grad()
        _loss(ref_p, ref_q, target).backward()
        ref.step()
        sched.step()
    torch.testing.assert_close(mine_p.detach(), ref_p.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(mine_q.detach(), ref_q.detach(), rtol=1e-5, atol=1e-7)
    assert torch.equal(mine_p.detach()[:, 2], p0[:, 2])  # no gradient, no move


def test_projection_and_unused_parameters():
    """Every iterate lies in its group's box; a parameter that does not reach the loss stays where it was."""
    a = torch.full((3, 4), 0.5, requires_grad=True)
    b = torch.zeros(5, requires_grad=True)
    unused = torch.randn(2, requires_grad=True)
    before = unused.detach().clone()
    opt = ProjectedAdam([ParamGroup([a, unused], 0.3, 0.0, 1.0), ParamGroup([b], 0.3, 0.0, None)])
    for _ in range(10):
        opt.step(-(a * torch.arange(-6.0, 6.0).reshape(3, 4)).sum() + (b + 1.0).pow(2).sum())
        assert float(a.detach().min()) >= 0.0 and float(a.detach().max()) <= 1.0
        assert float(b.detach().min()) >= 0.0
    assert torch.equal(unused.detach(), before.clamp(0.0, 1.0))  # projected once, never stepped
    assert a.is_leaf and a.requires_grad
    # the coefficient's sign decides the side: negative -> 0 (minimising -c*a with c < 0), positive -> 1
    assert float(a.detach()[0, 0]) == 0.0 and float(a.detach()[2, 3]) == 1.0
