"""Soundness checks shared by the bound tests: sampled points, box corners and PGD in both directions must lie
inside the computed bounds."""

import math

import torch
from torch import nn

from lingraft.bounds import BoundedNetwork, input_box, margin_spec
from lingraft.io.checkpoint import replace_module
from lingraft.models.layers import GraftedReLU

TOL = 1e-5


def graft_randomly(model, in_shape, ratio, seed=0):
    """Replace every nn.ReLU by a GraftedReLU with a random mask (a ~ U[-0.5, 1], b ~ U[-0.2, 0.2])."""
    g = torch.Generator().manual_seed(seed)
    shapes = {}
    relus = {n: m for n, m in model.named_modules() if isinstance(m, nn.ReLU)}
    hooks = [
        m.register_forward_hook(lambda mod, i, o, n=n: shapes.__setitem__(n, tuple(o.shape[1:])))
        for n, m in relus.items()
    ]
    with torch.no_grad():
        model(torch.zeros(1, *in_shape))
    for h in hooks:
        h.remove()
    for n in relus:
        mask = (torch.rand(shapes[n], generator=g) < ratio).float()
        gr = GraftedReLU(shapes[n], mask)
        with torch.no_grad():
            gr.a.copy_(torch.rand(shapes[n], generator=g) * 1.5 - 0.5)
            gr.b.copy_(torch.rand(shapes[n], generator=g) * 0.4 - 0.2)
        replace_module(model, n, gr)
    return model


def pgd_extremes(model, C, xl, xu, steps=30):
    """PGD minimising and maximising each spec row over the box. Returns (min [B,S], max [B,S]) found."""
    B, S, _ = C.shape
    out_min = torch.full((B, S), math.inf)
    out_max = torch.full((B, S), -math.inf)
    for sign in (1.0, -1.0):
        x = ((xl + xu) / 2).unsqueeze(1).repeat(1, S, *([1] * (xl.dim() - 1)))  # [B, S, *in]
        x = x + (torch.rand_like(x) - 0.5) * (xu - xl).unsqueeze(1)
        lo, hi = xl.unsqueeze(1).expand_as(x), xu.unsqueeze(1).expand_as(x)
        step = (xu - xl).unsqueeze(1) / 8
        for _ in range(steps):
            x = x.detach().requires_grad_(True)
            y = model(x.reshape(B * S, *xl.shape[1:])).reshape(B, S, -1)
            val = (C * y).sum(-1)
            (g,) = torch.autograd.grad((sign * val).sum(), x)
            with torch.no_grad():
                x = torch.min(torch.max(x - step * g.sign(), lo), hi)
                step = step * 0.9
        with torch.no_grad():
            val = (C * model(x.reshape(B * S, *xl.shape[1:])).reshape(B, S, -1)).sum(-1)
        out_min = torch.minimum(out_min, val)
        out_max = torch.maximum(out_max, val)
    return out_min, out_max


def check_sound(model, in_shape, eps, method, n_points=1000, batch=2, seed=0):
    torch.manual_seed(seed)
    model.eval()
    net = BoundedNetwork(model, in_shape)
    x = torch.rand(batch, *in_shape)
    xl, xu = input_box(x, eps)
    with torch.no_grad():
        y = model(x).argmax(1)
    C = margin_spec(y, net.num_outputs)
    res = net.compute_bounds(xl, xu, method=method, C=C, alpha_iterations=5)
    # certify and verify ask for lower bounds only (bound_upper=False), a separate code path: check it too
    lo_only = net.compute_bounds(xl, xu, method=method, C=C, alpha_iterations=5, bound_upper=False).lower
    lo, up = torch.minimum(res.lower, lo_only), res.upper
    assert torch.isfinite(lo).all() and torch.isfinite(up).all()
    assert (lo <= up + TOL).all()
    with torch.no_grad():
        u = torch.rand(n_points, *xl.shape)
        corners = torch.rand(n_points // 5, *xl.shape).round()
        pts = torch.cat([xl + (xu - xl) * u, xl + (xu - xl) * corners])  # [P, B, *in]
        P = pts.shape[0]
        out = model(pts.reshape(P * batch, *in_shape)).reshape(P, batch, -1)
        vals = torch.einsum("bso,pbo->pbs", C, out)
    assert (vals >= lo - TOL).all(), f"sampled point below lower bound by {(lo - vals).max():.3g}"
    assert (vals <= up + TOL).all(), f"sampled point above upper bound by {(vals - up).max():.3g}"
    pmin, pmax = pgd_extremes(model, C, xl, xu)
    assert (pmin >= lo - TOL).all(), f"PGD point below lower bound by {(lo - pmin).max():.3g}"
    assert (pmax <= up + TOL).all(), f"PGD point above upper bound by {(pmax - up).max():.3g}"
    return res


def random_batchnorm(bn):
    """``bn`` with random running statistics and affine parameters (in place; returned for chaining)."""
    with torch.no_grad():
        bn.running_mean.uniform_(-0.3, 0.3)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)
    return bn
