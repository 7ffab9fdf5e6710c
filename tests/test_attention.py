"""ACmix / SASA layers: shapes, faithfulness to reference semantics, and soundness of interval_bounds."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lingraft.bounds.ops.attention import convex_combination_bounds, softmax_bounds
from lingraft.models import create_model
from lingraft.models.attention import SASA, ACmix, position_grid, window_index
from lingraft.models.layers import Normalize

torch.set_num_threads(1)

TOL = 1e-5
EPSILONS = (0.01, 0.05, 0.1)


def _randomize(m: nn.Module, seed: int) -> nn.Module:
    """Random (not default-init) weights, including negative mixing rates, so every sign case is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.dim() > 1 else 0.3))
        if isinstance(m, ACmix):
            m.rate1.fill_(0.7)
            m.rate2.fill_(-0.4)
    return m


def _samples(center: torch.Tensor, eps: float, n: int = 1000, seed: int = 0) -> torch.Tensor:
    """n points of the box center +- eps: 80% uniform, 20% random vertices. center [1, ...] -> [n, ...]."""
    g = torch.Generator().manual_seed(seed)
    n_corner = n // 5
    u = torch.rand((n - n_corner,) + center.shape[1:], generator=g) * 2 - 1
    c = torch.randint(0, 2, (n_corner,) + center.shape[1:], generator=g).float() * 2 - 1
    return center + eps * torch.cat([u, c])


def _assert_inside(y: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, tol: float = TOL):
    below = (lo - y).max().item()
    above = (y - hi).max().item()
    assert below <= tol and above <= tol, f"bound violated by {max(below, above):.3g}"


MODULES = {
    "acmix-reflect": lambda: ACmix(4, 8, kernel_att=5, head=2),
    "acmix-zeros-k7": lambda: ACmix(4, 8, kernel_att=7, head=4, padding="zeros"),
    "acmix-stride2": lambda: ACmix(3, 8, kernel_att=3, head=2, stride=2),
    "sasa-k5": lambda: SASA(4, 8, kernel_size=5, heads=2),
    "sasa-k7": lambda: SASA(3, 8, kernel_size=7, heads=4),
}


# ---------------------------------------------------------------------------------------------------------
# shapes and parameters
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hw", [(7, 7), (5, 5), (8, 8), (6, 9)])
def test_shapes_odd_and_even(hw):
    x = torch.rand(2, 4, *hw)
    assert ACmix(4, 8, kernel_att=7, head=4)(x).shape == (2, 8, *hw)
    assert ACmix(4, 8, kernel_att=5, head=2, padding="zeros")(x).shape == (2, 8, *hw)
    assert SASA(4, 8, kernel_size=7, heads=4)(x).shape == (2, 8, *hw)
    h2, w2 = (hw[0] + 1) // 2, (hw[1] + 1) // 2
    assert ACmix(4, 8, kernel_att=3, head=2, stride=2)(x).shape == (2, 8, h2, w2)


def test_window_larger_than_image():
    x = torch.rand(1, 4, 3, 3)
    assert SASA(4, 8, kernel_size=7, heads=2)(x).shape == (1, 8, 3, 3)
    assert ACmix(4, 8, kernel_att=7, head=2, padding="zeros")(x).shape == (1, 8, 3, 3)
    from lingraft.errors import UsageError

    with pytest.raises(UsageError, match="padding='zeros'"):
        ACmix(4, 8, kernel_att=7, head=2)(x)


def test_acmix_rates_and_fixed_shift_kernels():
    m = ACmix(4, 8, kernel_att=5, head=2)
    assert m.rate1.item() == 0.5 and m.rate2.item() == 0.5
    before = m.shift_weight.clone()
    opt = torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    for _ in range(2):
        opt.zero_grad()
        m(torch.rand(2, 4, 6, 6)).square().mean().backward()
        opt.step()
    assert m.rate1.item() != 0.5  # the rates do train
    assert torch.equal(m.shift_weight, before)
    w = m.shift_weight  # [out, kk, 3, 3]: kernel i is the one-hot at (i // 3, i % 3)
    assert w.shape == (8, 9, 3, 3)
    assert torch.all(w.sum((2, 3)) == 1) and torch.all((w == 0) | (w == 1))
    for i in range(9):
        assert torch.all(w[:, i, i // 3, i % 3] == 1)
    assert "shift_weight" not in dict(m.named_parameters())


def _acmix_reference(m: ACmix, x: torch.Tensor) -> torch.Tensor:
    """ACmix written the way the official code computes it: reflection pad + unfold, stride 1."""
    q, k, v = m.conv1(x), m.conv2(x), m.conv3(x)
    b, c, h, w = q.shape
    nh, hd, ka = m.head, m.head_dim, m.kernel_att
    p = ka // 2
    pe = m.conv_p(position_grid(h, w))

    def unfold(t):
        return F.unfold(F.pad(t, (p, p, p, p), mode="reflect"), ka).view(t.shape[0], hd, ka * ka, h, w)

    qa = q.view(b * nh, hd, h, w) * hd**-0.5
    att = (qa.unsqueeze(2) * (unfold(k.view(b * nh, hd, h, w)) + pe.unsqueeze(2) - unfold(pe))).sum(1).softmax(1)
    out_att = (att.unsqueeze(1) * unfold(v.view(b * nh, hd, h, w))).sum(2).view(b, c, h, w)
    kk = m.kernel_conv**2
    f = m.fc(torch.cat([t.view(b, nh, hd, h * w) for t in (q, k, v)], 1))
    f = f.permute(0, 2, 1, 3).reshape(b, -1, h, w)
    dep = nn.Conv2d(kk * hd, c, m.kernel_conv, padding=m.kernel_conv // 2, groups=hd, bias=False)
    with torch.no_grad():
        for o in range(c):
            dep.weight[o].zero_()
            for i in range(kk):
                dep.weight[o, i, i // m.kernel_conv, i % m.kernel_conv] = 1.0
    return m.rate1 * out_att + m.rate2 * dep(f)


@pytest.mark.parametrize("hw", [(8, 8), (7, 7), (5, 6)])
def test_acmix_matches_reference_semantics(hw):
    torch.manual_seed(1)
    m = _randomize(ACmix(4, 8, kernel_att=5, head=2), 1)
    x = torch.rand(2, 4, *hw)
    torch.testing.assert_close(m(x), _acmix_reference(m, x), atol=1e-5, rtol=1e-5)


def test_acmix_stride_matches_strided_stride1():
    """Stride s computes the stride-1 attention at every s-th pixel; the conv path is the strided shift conv."""
    torch.manual_seed(2)
    m1 = _randomize(ACmix(4, 8, kernel_att=3, head=2), 2)
    m2 = ACmix(4, 8, kernel_att=3, head=2, stride=2)
    m2.load_state_dict(m1.state_dict())
    x = torch.rand(1, 4, 7, 7)
    torch.testing.assert_close(m2(x), m1(x)[:, :, ::2, ::2], atol=1e-5, rtol=1e-5)


def _sasa_loop(m: SASA, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit per-pixel, per-window-position SASA: logits [B, heads, K, H*W] and output [B, C, H, W]."""
    q, k, v = m.query(x), m.key(x), m.value(x)
    b, c, h, w = q.shape
    ks, r = m.kernel_size, m.kernel_size // 2
    hd = c // m.heads
    half = c // 2
    logits = torch.full((b, m.heads, ks * ks, h * w), float("-inf"))
    out = torch.zeros(b, c, h, w)
    for i in range(h):
        for j in range(w):
            for hh in range(m.heads):
                chans = range(hh * hd, (hh + 1) * hd)
                for a in range(ks):
                    for bb in range(ks):
                        y, xx = i + a - r, j + bb - r
                        if not (0 <= y < h and 0 <= xx < w):
                            continue
                        val = torch.zeros(b)
                        for ch in chans:
                            val = val + q[:, ch, i, j] * k[:, ch, y, xx]
                            if ch < half:  # row-offset embedding
                                val = val + q[:, ch, i, j] * m.rel_h[ch, a]
                            else:  # column-offset embedding
                                val = val + q[:, ch, i, j] * m.rel_w[ch - half, bb]
                        logits[:, hh, a * ks + bb, i * w + j] = val
                att = logits[:, hh, :, i * w + j].softmax(-1)  # -inf positions get weight 0
                for a in range(ks):
                    for bb in range(ks):
                        y, xx = i + a - r, j + bb - r
                        if 0 <= y < h and 0 <= xx < w:
                            for ch in chans:
                                out[:, ch, i, j] += att[:, a * ks + bb] * v[:, ch, y, xx]
    return logits, out


def test_sasa_relative_logits_match_loop():
    torch.manual_seed(3)
    m = _randomize(SASA(3, 8, kernel_size=3, heads=2), 3)
    x = torch.rand(2, 3, 5, 5)
    with torch.no_grad():
        ref_logits, ref_out = _sasa_loop(m, x)
        got = m.logits(x)
        assert torch.equal(torch.isinf(got), torch.isinf(ref_logits))
        fin = torch.isfinite(ref_logits)
        assert (got[fin] - ref_logits[fin]).abs().max().item() < 1e-5
        assert (m(x) - ref_out).abs().max().item() < 1e-5


def test_sasa_padding_gets_no_attention():
    """A corner pixel's output is a convex combination of in-image values only (zero padding would add 0s)."""
    m = SASA(1, 2, kernel_size=5, heads=1)
    with torch.no_grad():
        for conv in (m.query, m.key, m.value):
            conv.weight.fill_(1.0)
        m.rel_h.zero_()
        m.rel_w.zero_()
    x = torch.full((1, 1, 4, 4), 2.0)
    torch.testing.assert_close(m(x), torch.full((1, 2, 4, 4), 2.0))


# ---------------------------------------------------------------------------------------------------------
# interval helpers
# ---------------------------------------------------------------------------------------------------------


def test_softmax_bounds_exact_and_masked():
    g = torch.Generator().manual_seed(4)
    lo_z = torch.randn(3, 6, generator=g)
    hi_z = lo_z + torch.rand(3, 6, generator=g)
    valid = torch.tensor([True, True, False, True, True, True])
    wl, wu = softmax_bounds(lo_z, hi_z, valid, dim=1)
    assert torch.all(wl[:, 2] == 0) and torch.all(wu[:, 2] == 0)
    # the extreme points are attained: z = (l_i, u_others) for the lower, (u_i, l_others) for the upper
    for i in (0, 1, 3, 4, 5):
        z = hi_z.clone()
        z[:, i] = lo_z[:, i]
        torch.testing.assert_close(wl[:, i], z.masked_fill(~valid, float("-inf")).softmax(1)[:, i])
        z = lo_z.clone()
        z[:, i] = hi_z[:, i]
        torch.testing.assert_close(wu[:, i], z.masked_fill(~valid, float("-inf")).softmax(1)[:, i])
    # and no sample escapes
    z = lo_z + (hi_z - lo_z) * torch.rand(500, 3, 6, generator=g)
    _assert_inside(z.masked_fill(~valid, float("-inf")).softmax(2), wl, wu)
    # large logits stay finite
    wl, wu = softmax_bounds(lo_z * 1e3, hi_z * 1e3, None, dim=1)
    assert torch.isfinite(wl).all() and torch.isfinite(wu).all()


def test_convex_combination_bounds_sound_and_tighter_than_hull():
    g = torch.Generator().manual_seed(5)
    zl = torch.randn(4, 7, generator=g)
    zu = zl + 2 * torch.rand(4, 7, generator=g)
    vl = torch.randn(4, 7, generator=g)
    vu = vl + torch.rand(4, 7, generator=g)
    wl, wu = softmax_bounds(zl, zu, None, dim=1)
    lo, hi = convex_combination_bounds(wl, wu, vl, vu, None, dim=1)
    z = zl + (zu - zl) * torch.rand(2000, 4, 7, generator=g)
    v = vl + (vu - vl) * torch.rand(2000, 4, 7, generator=g)
    _assert_inside((z.softmax(2) * v).sum(2), lo, hi)
    assert torch.all(lo >= vl.amin(1) - 1e-6) and torch.all(hi <= vu.amax(1) + 1e-6)
    assert (lo > vl.amin(1) + 1e-3).any()  # the box on the weights tightens the plain hull


# ---------------------------------------------------------------------------------------------------------
# soundness of interval_bounds
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODULES))
@pytest.mark.parametrize("eps", EPSILONS)
def test_module_bounds_sound(name, eps):
    m = _randomize(MODULES[name](), seed=list(MODULES).index(name) + 10 * EPSILONS.index(eps))
    x0 = torch.rand(1, m.conv1.in_channels if isinstance(m, ACmix) else m.query.in_channels, 5, 6)
    with torch.no_grad():
        lo, hi = m.interval_bounds(x0 - eps, x0 + eps)
        ys = m(_samples(x0, eps))
    assert lo.shape == hi.shape == (1,) + ys.shape[1:]
    assert torch.isfinite(lo).all() and torch.isfinite(hi).all()
    _assert_inside(ys, lo, hi)
    assert (hi - lo).max().item() > 1e-3  # a non-degenerate box really was bounded


@pytest.mark.parametrize("name", list(MODULES))
def test_module_bounds_tight_at_eps0(name):
    m = _randomize(MODULES[name](), seed=7)
    x = torch.rand(3, m.conv1.in_channels if isinstance(m, ACmix) else m.query.in_channels, 6, 5)
    with torch.no_grad():
        lo, hi = m.interval_bounds(x, x)
        y = m(x)
    assert (hi - lo).max().item() < 1e-4
    assert (y - lo).abs().max().item() < 1e-4


def test_bounds_grow_with_eps():
    m = _randomize(SASA(4, 8, kernel_size=5, heads=2), 8)
    x = torch.rand(1, 4, 6, 6)
    widths = []
    with torch.no_grad():
        for eps in EPSILONS:
            lo, hi = m.interval_bounds(x - eps, x + eps)
            widths.append((hi - lo).mean().item())
    assert widths[0] < widths[1] < widths[2]


def _net_interval(net: nn.Sequential, lo: torch.Tensor, hi: torch.Tensor):
    """Plain layer-by-layer IBP through a zoo net, delegating to interval_bounds for attention layers."""
    for layer in net:
        if hasattr(layer, "interval_bounds"):
            lo, hi = layer.interval_bounds(lo, hi)
        elif isinstance(layer, (nn.Conv2d, nn.Linear, nn.AvgPool2d, Normalize)):
            c, r = (hi + lo) / 2, (hi - lo) / 2
            if isinstance(layer, nn.Conv2d):
                c, r = layer(c), F.conv2d(r, layer.weight.abs(), None, layer.stride, layer.padding)
            elif isinstance(layer, nn.Linear):
                c, r = layer(c), F.linear(r, layer.weight.abs())
            elif isinstance(layer, nn.AvgPool2d):
                c, r = layer(c), layer(r)
            else:
                c, r = layer(c), r / layer.std.view(1, -1, 1, 1)
            lo, hi = c - r, c + r
        elif isinstance(layer, (nn.ReLU, nn.Flatten)):
            lo, hi = layer(lo), layer(hi)
        else:
            raise AssertionError(f"no interval rule for {layer}")
    return lo, hi


@pytest.mark.parametrize("name", ["acmix-s", "sasa-s"])
@pytest.mark.parametrize("in_shape", [(1, 28, 28), (3, 32, 32)])
def test_zoo_models_build(name, in_shape):
    net = create_model(name, in_shape=in_shape, num_classes=10, mean=(0.1,) * in_shape[0], std=(0.3,) * in_shape[0])
    assert isinstance(net[0], Normalize)
    assert net(torch.rand(2, *in_shape)).shape == (2, 10)
    assert sum(isinstance(m, nn.ReLU) for m in net) == 3


@pytest.mark.parametrize("name", ["acmix-s", "sasa-s"])
@pytest.mark.parametrize("eps", EPSILONS)
def test_zoo_net_bounds_sound(name, eps):
    torch.manual_seed(9)
    net = create_model(name, in_shape=(1, 28, 28), num_classes=10, mean=(0.13,), std=(0.31,))
    x0 = torch.rand(1, 1, 28, 28)
    with torch.no_grad():
        lo, hi = _net_interval(net, (x0 - eps).clamp(0, 1), (x0 + eps).clamp(0, 1))
        ys = net(_samples(x0, eps, seed=1).clamp(0, 1))
        lo0, hi0 = _net_interval(net, x0, x0)
        y0 = net(x0)
    assert torch.isfinite(lo).all() and torch.isfinite(hi).all()
    _assert_inside(ys, lo, hi)
    assert (hi0 - lo0).max().item() < 1e-4 and (y0 - lo0).abs().max().item() < 1e-4


def test_window_index_reflect_matches_reflection_pad():
    h, w, k = 5, 6, 5
    img = torch.arange(h * w, dtype=torch.float32).view(1, 1, h, w)
    idx, valid, ho, wo = window_index(h, w, k, 1, "reflect")
    ref = F.unfold(F.pad(img, (2, 2, 2, 2), mode="reflect"), k)[0]  # [K, P]
    assert valid.all() and (ho, wo) == (h, w)
    assert torch.equal(img.flatten()[idx], ref)
    idx, valid, _, _ = window_index(h, w, k, 1, "zeros")
    ref0 = F.unfold(F.pad(img + 1, (2, 2, 2, 2)), k)[0]
    assert torch.equal(valid, ref0 > 0)
    assert torch.equal((img.flatten() + 1)[idx][valid], ref0[valid])


@pytest.mark.parametrize("name", ["acmix-s", "sasa-s"])
def test_zoo_net_exports_to_onnx(name):
    """Windows are a constant-index Gather and the coordinate grid a constant, so plain ONNX export works."""
    import io
    import warnings

    ort = pytest.importorskip("onnxruntime")
    net = create_model(name, in_shape=(1, 14, 14)).eval()
    x = torch.rand(1, 1, 14, 14)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (x,), buf, dynamo=False, opset_version=17)
    sess = ort.InferenceSession(buf.getvalue())
    (y,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        assert abs(y - net(x).numpy()).max() < 1e-5


@pytest.mark.parametrize("arch", ["sasa-s", "acmix-s"])
def test_exact_interval_nodes_skip_crown_and_keep_the_bounds(arch):
    """A grafted ReLU right after the first conv has exact interval bounds (each neuron is a monotone function of one
    exactly bounded pre-activation). The attention block needs them; tight mode must not spend CROWN passes there,
    and skipping them must not change any bound."""
    from _soundness import graft_randomly

    from lingraft.bounds import BoundedNetwork, input_box, margin_spec
    from lingraft.bounds.ops import ReLUOp

    torch.manual_seed(0)
    shape = (1, 12, 12)
    model = graft_randomly(create_model(arch, shape).eval(), shape, 0.5, seed=0).eval()
    net = BoundedNetwork(model, shape)
    first_relu = next(i for i, nd in enumerate(net.nodes) if isinstance(nd.op, ReLUOp))
    assert first_relu in net._ibp_exact and first_relu in net._needed
    x = torch.rand(3, *shape)
    xl, xu = input_box(x, 0.02)
    with torch.no_grad():
        C = margin_spec(model(x).argmax(1), 10)
    skipped = net.compute_bounds(xl, xu, "crown", C)
    net._ibp_exact = set()  # force the CROWN passes the skip avoids
    full = net.compute_bounds(xl, xu, "crown", C)
    assert torch.allclose(skipped.lower, full.lower, atol=1e-5) and torch.allclose(skipped.upper, full.upper, atol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_bilinear_logit_bounds_sound_and_tighter_for_small_radius(bias):
    """Sampled inputs stay inside the centred bilinear logit bounds, which beat channel-wise interval products."""
    from lingraft.bounds.ops.attention import AttentionLogits, bilinear_logit_bounds, product_bounds

    g = torch.Generator().manual_seed(0)
    B, C, h, d, K, P = 2, 6, 2, 3, 5, 4
    wq, wk = torch.randn(h, d, C, generator=g), torch.randn(h, d, C, generator=g)
    bq = torch.randn(h, d, generator=g) if bias else None
    bk = torch.randn(h, d, generator=g) if bias else None
    kb = torch.randn(1, h, d, K, 1, generator=g)
    cq, ck = torch.rand(B, C, P, generator=g), torch.rand(B, C, K, P, generator=g)
    rq, rk = 0.02 * torch.rand(B, C, P, generator=g), 0.02 * torch.rand(B, C, K, P, generator=g)
    lo, hi = bilinear_logit_bounds((cq, rq), (ck, rk), AttentionLogits(wq, bq, wk, bk, kb, scale=0.7))

    def logits(xq, xk):
        q = torch.einsum("hdc,bcp->bhdp", wq, xq) + (0 if bq is None else bq[None, :, :, None])
        k = torch.einsum("hdc,bckp->bhdkp", wk, xk) + kb + (0 if bk is None else bk[None, :, :, None, None])
        return 0.7 * (q.unsqueeze(3) * k).sum(2)

    for _ in range(300):
        xq = cq + rq * (2 * torch.rand(cq.shape, generator=g) - 1)
        xk = ck + rk * (2 * torch.rand(ck.shape, generator=g) - 1)
        z = logits(xq, xk)
        assert bool((z >= lo - 1e-5).all() and (z <= hi + 1e-5).all())
    # channel-wise products of exact q and k intervals are looser
    ql = torch.einsum("hdc,bcp->bhdp", wq, cq) - torch.einsum("hdc,bcp->bhdp", wq.abs(), rq)
    qu = torch.einsum("hdc,bcp->bhdp", wq, cq) + torch.einsum("hdc,bcp->bhdp", wq.abs(), rq)
    kl = torch.einsum("hdc,bckp->bhdkp", wk, ck) - torch.einsum("hdc,bckp->bhdkp", wk.abs(), rk) + kb
    ku = torch.einsum("hdc,bckp->bhdkp", wk, ck) + torch.einsum("hdc,bckp->bhdkp", wk.abs(), rk) + kb
    if bias:
        ql, qu = ql + bq[None, :, :, None], qu + bq[None, :, :, None]
        kl, ku = kl + bk[None, :, :, None, None], ku + bk[None, :, :, None, None]
    pl, pu = product_bounds(0.7 * ql.unsqueeze(3), 0.7 * qu.unsqueeze(3), kl, ku)
    assert float((hi - lo).mean()) < float((pu.sum(2) - pl.sum(2)).mean())


def test_logit_difference_softmax_bounds_sound_and_tighter():
    """Softmax weights of sampled inputs stay inside the difference-based bounds, which beat softmax_bounds of the
    logit box; invalid window positions get [0, 0]."""
    from lingraft.bounds.ops.attention import AttentionLogits, bilinear_logit_bounds, logit_difference_softmax_bounds

    g = torch.Generator().manual_seed(1)
    B, C, h, d, K, P = 3, 5, 2, 3, 9, 4
    wq, wk = torch.randn(h, d, C, generator=g), torch.randn(h, d, C, generator=g)
    bq, bk = torch.randn(h, d, generator=g), torch.randn(h, d, generator=g)
    kb = torch.randn(1, h, d, K, 1, generator=g)
    valid = torch.rand(K, P, generator=g) > 0.2
    valid[K // 2] = True
    cq, ck = torch.rand(B, C, P, generator=g), torch.rand(B, C, K, P, generator=g)
    rq, rk = 0.05 * torch.rand(B, C, P, generator=g), 0.05 * torch.rand(B, C, K, P, generator=g)
    logits = AttentionLogits(wq, bq, wk, bk, kb, scale=0.6)
    wl, wu = logit_difference_softmax_bounds((cq, rq), (ck, rk), logits, valid, chunk=2)
    assert bool((wl[..., ~valid] == 0).all() and (wu[..., ~valid] == 0).all())
    for _ in range(300):
        xq = cq + rq * (2 * torch.rand(cq.shape, generator=g) - 1)
        xk = ck + rk * (2 * torch.rand(ck.shape, generator=g) - 1)
        q = torch.einsum("hdc,bcp->bhdp", wq, xq) + bq[None, :, :, None]
        k = torch.einsum("hdc,bckp->bhdkp", wk, xk) + kb + bk[None, :, :, None, None]
        z = (0.6 * (q.unsqueeze(3) * k).sum(2)).masked_fill(~valid, float("-inf"))
        w = z.softmax(2)
        assert bool((w >= wl - 1e-6).all() and (w <= wu + 1e-6).all())
    ll, lu = bilinear_logit_bounds((cq, rq), (ck, rk), logits)
    sl, su = softmax_bounds(ll, lu, valid, dim=2)
    assert float((wu - wl)[..., valid].mean()) < float((su - sl)[..., valid].mean())
