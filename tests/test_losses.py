"""Tests for lingraft.train.losses: hand-computed values (explicit numpy arithmetic), invariances, gradients, taps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from lingraft.errors import UsageError
from lingraft.models import create_model
from lingraft.models.layers import GraftedReLU
from lingraft.train.losses import (
    LOSSES,
    ce_loss,
    competition_rank,
    dense_logits_from_head,
    get_loss,
    kd_loss,
    label_smoothing_loss,
    needs_features,
    needs_teacher,
    nkd_loss,
    non_target,
    split_at_flatten,
    uskd_feature_layer,
    uskd_loss,
    uskd_non_target_label,
    zipf_loss,
    zipf_soft_label,
    zipf_votes,
)

torch.set_num_threads(1)

ZS = [[1.0, 2.0, 0.5, -0.3], [0.1, -1.0, 2.0, 0.7]]  # student logits, B=2, C=4
ZT = [[0.2, 1.5, -0.5, 0.9], [1.2, 0.3, 0.8, -0.6]]  # teacher / weak logits
Y = [1, 2]


def t(x):
    return torch.tensor(x, dtype=torch.float64)


def softmax(v):
    e = [math.exp(a) for a in v]
    s = sum(e)
    return [a / s for a in e]


def ce_np(z, y):
    return float(np.mean([-math.log(softmax(row)[yy]) for row, yy in zip(z, y)]))


def drop(v, y):
    return [a for j, a in enumerate(v) if j != y]


# ------------------------------------------------------------------------------------------ values by hand
def test_ce_and_label_smoothing_by_hand():
    assert ce_loss(t(ZS), torch.tensor(Y)).item() == pytest.approx(ce_np(ZS, Y), abs=1e-12)
    eps, c = 0.1, 4
    per = []
    for row, yy in zip(ZS, Y):
        p = softmax(row)
        q = [(1 - eps) * (j == yy) + eps / c for j in range(c)]
        per.append(-sum(qj * math.log(pj) for qj, pj in zip(q, p)))
    assert label_smoothing_loss(t(ZS), torch.tensor(Y), 0.1).item() == pytest.approx(np.mean(per), abs=1e-12)


def test_kd_by_hand():
    T, alpha = 4.0, 0.9
    kl = []
    for zs, zt in zip(ZS, ZT):
        ps = softmax([a / T for a in zs])
        pt = softmax([a / T for a in zt])
        kl.append(sum(b * (math.log(b) - math.log(a)) for a, b in zip(ps, pt)))
    want = (1 - alpha) * ce_np(ZS, Y) + alpha * T * T * np.mean(kl)
    got = kd_loss(t(ZS), t(ZT), torch.tensor(Y), temperature=T, alpha=alpha).item()
    assert got == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("T,gamma", [(1.0, 1.5), (2.0, 0.7)])
def test_nkd_by_hand(T, gamma):
    target_terms, non_terms = [], []
    for zs, zt, yy in zip(ZS, ZT, Y):
        target_terms.append(softmax(zt)[yy] * math.log(softmax(zs)[yy]))
        qs = softmax([a / T for a in drop(zs, yy)])  # 3 non-target classes, target removed
        qt = softmax([a / T for a in drop(zt, yy)])
        non_terms.append(sum(b * math.log(a) for a, b in zip(qs, qt)))
    want = ce_np(ZS, Y) - np.mean(target_terms) - gamma * T * T * np.mean(non_terms)
    got = nkd_loss(t(ZS), t(ZT), torch.tensor(Y), temperature=T, gamma=gamma).item()
    assert got == pytest.approx(want, abs=1e-12)


def test_nkd_non_target_term_ignores_target_logit():
    y = torch.tensor(Y)

    def non_term(zs, zt):  # isolates -gamma T^2 mean(sum q^t log q^s)
        return (nkd_loss(zs, zt, y, 2.0, gamma=1.0) - nkd_loss(zs, zt, y, 2.0, gamma=0.0)).item()

    base = non_term(t(ZS), t(ZT))
    zs2, zt2 = t(ZS), t(ZT)
    zs2[0, 1] += 3.0
    zs2[1, 2] -= 2.0
    zt2[0, 1] -= 5.0
    zt2[1, 2] += 4.0
    assert non_term(zs2, zt2) == pytest.approx(base, abs=1e-12)
    zs3 = t(ZS)
    zs3[0, 0] += 1.0  # a non-target logit does change it
    assert abs(non_term(zs3, t(ZT)) - base) > 1e-3


def _uskd_label_np(zs, zw, y):
    s, w = softmax(zs), softmax(zw)
    score = {j: w[j] / (1 - w[y] + 1e-6) + s[j] / (1 - s[y] + 1e-6) for j in range(len(zs)) if j != y}
    order = sorted(score, key=lambda j: -score[j])
    zipf = {j: 1.0 / (r + 1) for r, j in enumerate(order)}
    tot = sum(zipf.values())
    return [zipf[j] / tot for j in sorted(zipf)]


def test_uskd_by_hand():
    alpha, beta, mu, c = 0.3, 0.2, 0.1, 4
    s_y = [softmax(zs)[yy] for zs, yy in zip(ZS, Y)]
    m = np.mean([v * v for v in s_y])
    l_t = -np.mean([(v * v + 1 - m) * math.log(v) for v in s_y])
    l_w, l_non = [], []
    for zs, zw, yy in zip(ZS, ZT, Y):
        w = softmax(zw)
        soft = [0.9 * (j == yy) + 0.1 / c for j in range(c)]
        l_w.append(-sum(a * math.log(b) for a, b in zip(soft, w)))
        z = _uskd_label_np(zs, zw, yy)
        q = softmax(drop(zs, yy))
        l_non.append(-sum(a * math.log(b) for a, b in zip(z, q)))
    want = ce_np(ZS, Y) + alpha * l_t + beta * np.mean(l_non) + mu * np.mean(l_w)
    got = uskd_loss(t(ZS), t(ZT), torch.tensor(Y), alpha=alpha, beta=beta, mu=mu).item()
    assert got == pytest.approx(want, abs=1e-12)


def test_uskd_soft_target_formula():
    y = torch.tensor(Y)
    l_t = (
        uskd_loss(t(ZS), t(ZT), y, alpha=1.0, beta=0.0, mu=0.0)
        - uskd_loss(t(ZS), t(ZT), y, alpha=0.0, beta=0.0, mu=0.0)
    ).item()
    s_y = np.array([softmax(zs)[yy] for zs, yy in zip(ZS, Y)])
    p_t = s_y**2 + 1 - np.mean(s_y**2)
    assert l_t == pytest.approx(float(-np.mean(p_t * np.log(s_y))), abs=1e-12)
    # p_t is detached: the gradient of L_t w.r.t. logits is that of -mean(p_t log s_y) with constant p_t
    z = t(ZS).requires_grad_(True)
    (uskd_loss(z, t(ZT), y, 1.0, 0.0, 0.0) - ce_loss(z, y)).backward()
    zc = t(ZS).requires_grad_(True)
    lsm = torch.log_softmax(zc, 1).gather(1, y[:, None]).squeeze(1)
    (-(torch.tensor(p_t) * lsm).mean()).backward()
    assert torch.allclose(z.grad, zc.grad, atol=1e-12)


def test_uskd_non_target_ranking():
    # class 3 dominates both heads' non-target mass, then 0, then 2 (target 1)
    zs = t([[0.0, 5.0, -2.0, 1.0]])
    zw = t([[0.5, 3.0, -1.0, 2.0]])
    z = uskd_non_target_label(zs, zw, torch.tensor([1]))
    h = 1 + 1 / 2 + 1 / 3
    assert torch.allclose(z, t([[1 / 2 / h, 1 / 3 / h, 1 / h]]), atol=1e-12)
    assert z.sum().item() == pytest.approx(1.0)
    # official mode: all 4 classes ranked (target first here) -> non-targets get 1/2, 1/3, 1/4
    zo = uskd_non_target_label(zs, zw, torch.tensor([1]), official_rank=True)
    h = 1 / 2 + 1 / 3 + 1 / 4
    assert torch.allclose(zo, t([[1 / 3 / h, 1 / 4 / h, 1 / 2 / h]]), atol=1e-12)


def test_competition_rank_ties_and_zero_votes():
    r = competition_rank(t([[5, 3, 3, 0, 0], [0, 0, 0, 0, 1], [2, 2, 2, 2, 2]]))
    assert r.tolist() == [[1, 2, 2, 4, 4], [2, 2, 2, 2, 1], [1, 1, 1, 1, 1]]


def _dense_from_argmax(am, c):
    """[B, L] argmax classes -> dense logits [B, C, 1, L] whose per-location argmax is am."""
    b, n = len(am), len(am[0])
    d = torch.zeros(b, c, 1, n, dtype=torch.float64)
    for i in range(b):
        for j in range(n):
            d[i, am[i][j], 0, j] = 1.0
    return d


def test_zipf_ranking_and_loss_by_hand():
    c = 5
    am = [[0, 2, 2, 0, 3], [4, 4, 4, 1, 1]]  # votes [2,0,2,1,0] and [0,2,0,0,3]
    dense = _dense_from_argmax(am, c)
    assert zipf_votes(dense).tolist() == [[2, 0, 2, 1, 0], [0, 2, 0, 0, 3]]
    y = [3, 0]
    # ranks (competition, target included): [1,4,1,3,4] and [3,2,3,3,1]; drop target, renormalize
    ranks = [[1, 4, 1, 3, 4], [3, 2, 3, 3, 1]]
    zs_np = []
    for rk, yy in zip(ranks, y):
        v = [1.0 / r for j, r in enumerate(rk) if j != yy]
        zs_np.append([a / sum(v) for a in v])
    zl = zipf_soft_label(dense, torch.tensor(y))
    assert torch.allclose(zl, t(zs_np), atol=1e-12)
    logits = [[0.3, -0.2, 1.0, 2.0, 0.1], [1.5, 0.2, -0.7, 0.4, 0.9]]
    lam = 0.5
    kl = []
    for row, yy, z in zip(logits, y, zs_np):
        q = softmax(drop(row, yy))
        kl.append(sum(a * (math.log(a) - math.log(b)) for a, b in zip(z, q)))
    want = ce_np(logits, y) + lam * np.mean(kl)
    assert zipf_loss(t(logits), dense, torch.tensor(y), lam=lam).item() == pytest.approx(want, abs=1e-12)
    # power: z = rank^-2
    z2 = zipf_soft_label(dense, torch.tensor(y), power=2.0)
    v = [1.0 / r**2 for j, r in enumerate(ranks[0]) if j != y[0]]
    assert torch.allclose(z2[0], t([a / sum(v) for a in v]), atol=1e-12)


def test_zipf_mlp_variant_ranks_logits():
    logits = t([[0.5, 2.0, -1.0, 1.0]])
    z = zipf_soft_label(logits, torch.tensor([3]))  # ranks [3,1,4,2] -> drop class 3
    v = [1 / 3, 1, 1 / 4]
    assert torch.allclose(z, t([[a / sum(v) for a in v]]), atol=1e-12)


def test_gradients_finite_and_nonzero():
    torch.manual_seed(0)
    y = torch.tensor([0, 3, 1])
    zt = torch.randn(3, 4)
    for name, fn in LOSSES.items():
        z = torch.randn(3, 4, requires_grad=True)
        extra = None
        if needs_teacher(name):
            loss = fn(z, zt, y)
        elif needs_features(name) == "weak":
            extra = torch.randn(3, 4, requires_grad=True)
            loss = fn(z, extra, y)
        elif needs_features(name) == "dense":
            loss = fn(z, torch.randn(3, 4, 2, 2), y)
        else:
            loss = fn(z, y)
        assert loss.dim() == 0 and torch.isfinite(loss), name
        loss.backward()
        assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0, name
        if extra is not None:
            assert torch.isfinite(extra.grad).all() and extra.grad.abs().sum() > 0
    # teacher never receives a gradient
    zt2 = torch.randn(3, 4, requires_grad=True)
    z = torch.randn(3, 4, requires_grad=True)
    (kd_loss(z, zt2, y) + nkd_loss(z, zt2, y)).backward()
    assert zt2.grad is None


def test_non_target_removes_target():
    x = t([[0, 1, 2, 3], [10, 11, 12, 13]])
    assert non_target(x, torch.tensor([0, 2])).tolist() == [[1, 2, 3], [10, 11, 13]]


# ------------------------------------------------------------------------------------------ feature taps
def _cnnb():
    torch.manual_seed(0)
    return create_model("cnn-b", (1, 28, 28), 10, (0.1307,), (0.3081,)).eval()


def test_dense_logits_cnnb_mnist():
    m = _cnnb()
    feats, head = split_at_flatten(m)
    x = torch.rand(3, 1, 28, 28)
    f = feats(x)
    assert f.shape == (3, 128, 7, 7)
    assert torch.allclose(head(f), m(x), atol=1e-5)
    d = dense_logits_from_head(f, head)
    assert d.shape == (3, 10, 7, 7)
    # generic (batched masked copies) path agrees with the einsum fast path
    d_gen = dense_logits_from_head(f, lambda u: head(u), max_chunk_elems=3 * 128 * 49 * 5)
    assert torch.allclose(d, d_gen, atol=1e-5)
    # one location by hand
    mask = torch.zeros(1, 1, 7, 7)
    mask[0, 0, 2, 5] = 1
    assert torch.allclose(d[:, :, 2, 5], head(f * mask), atol=1e-5)
    votes = zipf_votes(d)
    assert votes.sum(1).tolist() == [49.0] * 3


def test_dense_logits_upsample_small_map():
    torch.manual_seed(1)
    head = nn.Sequential(nn.Flatten(), nn.Linear(3 * 2 * 2, 6), nn.ReLU(), nn.Linear(6, 4))
    f = torch.randn(2, 3, 2, 2)
    d = dense_logits_from_head(f, head)
    d_gen = dense_logits_from_head(f, lambda u: head(u))
    assert d.shape == (2, 4, 4, 4)
    assert torch.allclose(d, d_gen, atol=1e-6)
    mask = torch.zeros(1, 1, 2, 2)
    mask[0, 0, 1, 0] = 1
    want = head(f * mask / 4)
    for hh in (2, 3):
        for ww in (0, 1):
            assert torch.allclose(d[:, :, hh, ww], want, atol=1e-6)
    assert dense_logits_from_head(f, head, upsample_small=False).shape == (2, 4, 2, 2)


def test_split_and_uskd_layer():
    x = torch.rand(2, 3, 32, 32)
    for name in ("convbig", "resnet-4b", "cnn-b"):
        m = create_model(name, (3, 32, 32), 10, (0.5,) * 3, (0.25,) * 3)
        feats, head = split_at_flatten(m)
        f = feats(x)
        assert f.dim() == 4 and torch.allclose(head(f), m(x), atol=1e-5), name
        layer = uskd_feature_layer(m)
        got = []
        hk = layer.register_forward_hook(lambda mod, i, o, got=got: got.append(o))
        m(x)
        hk.remove()
        assert len(got) == 1 and got[0].dim() == 4, name
    cb = create_model("convbig", (3, 32, 32), 10, (0.5,) * 3, (0.25,) * 3)
    assert uskd_feature_layer(cb) is cb[6]  # ReLU after the third (second-to-last) conv
    mlp = create_model("mlp", (1, 28, 28), 10, (0.1,), (0.3,))
    assert uskd_feature_layer(mlp) is mlp[3]
    with pytest.raises(UsageError):
        split_at_flatten(mlp)
    # grafted ReLUs are activations too
    m = _cnnb()
    m[5] = GraftedReLU((128, 7, 7))
    feats, head = split_at_flatten(m)
    assert len(feats) == 6


def test_registry():
    assert set(LOSSES) == {"ce", "ls", "kd", "nkd", "uskd", "zipf"}
    assert [needs_teacher(n) for n in LOSSES] == [False, False, True, True, False, False]
    assert [needs_features(n) for n in LOSSES] == [None, None, None, None, "weak", "dense"]
    with pytest.raises(UsageError):
        get_loss("focal")
    with pytest.raises(UsageError):
        needs_teacher("nope")
