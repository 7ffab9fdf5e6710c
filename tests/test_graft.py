"""Linearity grafting: scores, the staged selection rule, grafting, fine-tuning invariants, the CLI."""

import json

import pytest
import torch
from click.testing import CliRunner

from lingraft.bounds import BoundedNetwork, input_box, margin_spec
from lingraft.errors import LingraftError, UsageError
from lingraft.graft.pipeline import (
    FinetuneConfig,
    NeuronScores,
    apply_graft,
    check_masks_fit,
    compute_scores,
    finetune,
    load_masks,
    relu_modules,
    save_masks,
    select_neurons,
)
from lingraft.io.checkpoint import load_checkpoint, save_checkpoint
from lingraft.models import create_model
from lingraft.models.layers import GraftedReLU

IN = (1, 12, 12)


def _model(name="cnn-b"):
    torch.manual_seed(0)
    return create_model(name, IN).eval()


_CACHE = {}


def _scores(model, n=20, eps=0.02):
    key = (
        tuple(tuple(p.shape) for p in model.parameters()),
        float(sum(p.detach().sum() for p in model.parameters())),
        n,
        eps,
    )
    if key in _CACHE:
        return _CACHE[key]
    torch.manual_seed(1)
    x = torch.rand(n, *IN)
    y = torch.randint(0, 10, (n,))
    _CACHE[key] = compute_scores(model, x, y, eps, in_shape=IN, batch_size=10)
    return _CACHE[key]


def test_scores_shapes_and_ranges():
    m = _model()
    sc = _scores(m)
    assert list(sc.shapes) == list(relu_modules(m))
    for n in sc.shapes:
        assert sc.instability[n].shape == sc.shapes[n]
        assert ((sc.instability[n] >= 0) & (sc.instability[n] <= 1)).all()
        assert (sc.gradient[n] >= 0).all() and (sc.magnitude[n] >= 0).all()
    # some neurons are unstable at this eps on random weights
    assert sum(float(v.sum()) for v in sc.instability.values()) > 0


def test_ratio_zero_is_a_no_op():
    m = _model()
    sc = _scores(m)
    masks = select_neurons(sc, 0.0)
    g = apply_graft(m, masks)
    x = torch.rand(3, *IN)
    assert torch.equal(g(x), m(x))
    xl, xu = input_box(x, 0.02)
    C = margin_spec(m(x).argmax(1), 10)
    b0 = BoundedNetwork(m, IN).compute_bounds(xl, xu, "crown", C)
    b1 = BoundedNetwork(g, IN).compute_bounds(xl, xu, "crown", C)
    assert torch.allclose(b0.lower, b1.lower, atol=1e-6) and torch.allclose(b0.upper, b1.upper, atol=1e-6)


def test_ratio_one_grafts_everything_and_crown_is_exact():
    m = _model("mlp")
    sc = _scores(m)
    g = apply_graft(m, select_neurons(sc, 1.0))
    assert all(mod.num_grafted == mod.num_neurons for mod in relu_modules(g).values())
    net = BoundedNetwork(g, IN)
    x = torch.rand(2, *IN)
    xl, xu = input_box(x, 0.05)
    res = net.compute_bounds(xl, xu, "crown")
    # affine network: sampled corners attain the bounds up to float error for each output
    J = torch.autograd.functional.jacobian(lambda z: g(z.unsqueeze(0))[0], torch.zeros(*IN)).reshape(10, -1)
    f0 = g(torch.zeros(1, *IN))[0]
    c, r = ((xl + xu) / 2).reshape(2, -1), ((xu - xl) / 2).reshape(2, -1)
    exact = f0 + c @ J.t() - r @ J.abs().t()
    assert torch.allclose(res.lower, exact, atol=1e-4)


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_selection_counts_and_order(scope):
    m = _model()
    sc = _scores(m)
    total = sum(v.numel() for v in sc.instability.values())
    masks = select_neurons(sc, 0.3, scope=scope)
    chosen = sum(int(v.sum()) for v in masks.values())
    if scope == "global":
        assert chosen == round(0.3 * total)
    else:
        for v in masks.values():
            assert int(v.sum()) == round(0.3 * v.numel())


def test_single_stage_follows_score_order():
    """With one stage of gamma g, the chosen set is exactly the top-k of g*rank(inst) - rank(sig)."""
    sc = NeuronScores()
    torch.manual_seed(5)
    sc.instability = {"a": torch.rand(50)}
    sc.gradient = {"a": torch.rand(50)}
    sc.magnitude = {"a": torch.rand(50)}
    sc.shapes = {"a": (50,)}
    sc.grafted = {"a": torch.zeros(50, dtype=torch.bool)}
    masks = select_neurons(sc, 0.2, gammas=(1.5,))
    r_i = torch.argsort(torch.argsort(sc.instability["a"], stable=True)).float()
    r_s = torch.argsort(torch.argsort(sc.gradient["a"], stable=True)).float()
    score = 1.5 * r_i - r_s
    expect = torch.zeros(50, dtype=torch.bool)
    expect[torch.topk(score, 10).indices] = True
    assert torch.equal(masks["a"], expect)
    # instability-only baseline picks the most unstable
    m2 = select_neurons(sc, 0.2, rule="instability")["a"]
    assert sc.instability["a"][m2].min() >= sc.instability["a"][~m2].max()
    # magnitude baseline picks the smallest magnitudes
    m3 = select_neurons(sc, 0.2, rule="magnitude")["a"]
    assert sc.magnitude["a"][m3].max() <= sc.magnitude["a"][~m3].min()


def test_already_grafted_neurons_stay_and_count():
    sc = NeuronScores()
    sc.instability = {"a": torch.rand(10)}
    sc.gradient = {"a": torch.rand(10)}
    sc.magnitude = {"a": torch.rand(10)}
    sc.shapes = {"a": (10,)}
    g = torch.zeros(10, dtype=torch.bool)
    g[:3] = True
    sc.grafted = {"a": g}
    masks = select_neurons(sc, 0.5)
    assert masks["a"][:3].all() and int(masks["a"].sum()) == 5


def test_bad_arguments():
    sc = _scores(_model("mlp"))
    with pytest.raises(UsageError):
        select_neurons(sc, 1.5)
    with pytest.raises(UsageError):
        select_neurons(sc, 0.5, rule="nope")
    with pytest.raises(UsageError):
        select_neurons(sc, 0.5, scope="nope")


def test_finetune_never_changes_the_mask_and_trains_a_b():
    m = _model("mlp")
    sc = _scores(m)
    g = apply_graft(m, select_neurons(sc, 0.5))
    masks_before = {n: mod.mask.clone() for n, mod in relu_modules(g).items()}
    a_before = {n: mod.a.detach().clone() for n, mod in relu_modules(g).items()}
    torch.manual_seed(2)
    x = torch.rand(64, *IN)
    y = torch.randint(0, 10, (64,))
    g, info = finetune(
        g,
        x,
        y,
        x[:16],
        y[:16],
        FinetuneConfig(epochs=1, batch_size=16, eps=0.02, lr=0.05, lr_graft=0.5),
        log=lambda s: None,
    )
    for n, mod in relu_modules(g).items():
        assert torch.equal(mod.mask, masks_before[n])
    # grafted a's moved (the best checkpoint may be epoch 0 if validation got worse; then nothing moved at all)
    moved = any(
        not torch.equal(mod.a.detach()[mod.mask > 0], a_before[n][mod.mask > 0]) for n, mod in relu_modules(g).items()
    )
    h0 = info["history"][0]
    kept_initial = (info["best"]["pgd_acc"], info["best"]["clean_acc"]) == (h0["pgd_acc"], h0["clean_acc"])
    assert moved or kept_initial
    assert len(info["history"]) == 2


def test_mask_roundtrip_and_fit_check(tmp_path):
    m = _model()
    masks = select_neurons(_scores(m), 0.25)
    save_masks(tmp_path / "m.json", masks)
    back = load_masks(tmp_path / "m.json")
    assert all(torch.equal(back[n], masks[n]) for n in masks)
    check_masks_fit(m, back, IN)
    with pytest.raises(UsageError):
        check_masks_fit(_model("mlp"), back, IN)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(LingraftError, match="not a lingraft graft mask"):
        load_masks(tmp_path / "bad.json")


def test_grafted_checkpoint_roundtrip(tmp_path):
    m = _model()
    sc = _scores(m)
    g = apply_graft(m, select_neurons(sc, 0.5), init="fit", scores=sc)
    save_checkpoint(
        tmp_path / "g.pt",
        g,
        arch="cnn-b",
        arch_kwargs={"in_shape": list(IN), "num_classes": 10, "mean": [0.0], "std": [1.0]},
        dataset="digits",
        meta={},
    )
    back, info = load_checkpoint(tmp_path / "g.pt")
    x = torch.rand(2, *IN)
    assert torch.allclose(back(x), g(x))
    assert any(isinstance(mod, GraftedReLU) and mod.num_grafted > 0 for mod in back.modules())


@pytest.fixture(scope="module")
def digits_ckpt(tmp_path_factory):
    pytest.importorskip("sklearn")
    from lingraft.train.loop import TrainConfig, train

    out = tmp_path_factory.mktemp("g") / "mlp.pt"
    train(
        TrainConfig(
            arch="mlp",
            dataset="digits",
            epochs=2,
            batch_size=32,
            optimizer="adam",
            lr=3e-3,
            method="fgsm",
            eps=0.05,
            val_size=200,
            eval_pgd_steps=5,
        ),
        out,
        progress=False,
        log=lambda s: None,
    )
    return out


def test_graft_cli_end_to_end(digits_ckpt, tmp_path):
    from lingraft.cli.main import cli

    out = tmp_path / "g.pt"
    r = CliRunner().invoke(
        cli,
        [
            "graft",
            str(digits_ckpt),
            "--ratio",
            "0.5",
            "--eps",
            "0.05",
            "--out",
            str(out),
            "--epochs",
            "1",
            "--num-train",
            "300",
            "--score-images",
            "100",
            "-n",
            "50",
            "--save-mask",
            str(tmp_path / "mask.json"),
            "--json",
            str(tmp_path / "r.json"),
        ],
    )
    assert r.exit_code == 0, r.output
    assert "before" in r.output and "after" in r.output
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["grafted_neurons"] == round(0.5 * res["relu_neurons"])
    ev = res["evaluation"]
    unst_b = sum(ev["before"]["crown"]["unstable_per_layer"].values())
    unst_a = sum(ev["after"]["crown"]["unstable_per_layer"].values())
    assert unst_a <= unst_b
    # the grafted checkpoint certifies through the normal path
    r2 = CliRunner().invoke(cli, ["certify", str(out), "-n", "20", "--eps", "0.05", "--json", "-"])
    assert r2.exit_code == 0, r2.output
    # graft from the saved mask, no fine-tuning: same mask
    out2 = tmp_path / "g2.pt"
    r3 = CliRunner().invoke(
        cli,
        [
            "graft",
            str(digits_ckpt),
            "--mask",
            str(tmp_path / "mask.json"),
            "--eps",
            "0.05",
            "--out",
            str(out2),
            "--epochs",
            "0",
            "-n",
            "0",
        ],
    )
    assert r3.exit_code == 0, r3.output
    a, _ = load_checkpoint(out)
    b, _ = load_checkpoint(out2)
    for m1, m2 in zip(relu_modules(a).values(), relu_modules(b).values()):
        assert torch.equal(m1.mask, m2.mask)


def test_graft_cli_scores_only(digits_ckpt, tmp_path):
    from lingraft.cli.main import cli

    r = CliRunner().invoke(
        cli,
        ["graft", str(digits_ckpt), "--eps", "0.05", "--scores-only", str(tmp_path / "s.json"), "--score-images", "50"],
    )
    assert r.exit_code == 0, r.output
    d = json.loads((tmp_path / "s.json").read_text())
    assert d["format"] == "lingraft-graft-scores" and "instability" in d["scores"]


def test_clean_drop_warning():
    from lingraft.graft.pipeline import _clean_drop_warning

    ev = {"before": {"crown": {"clean_acc": 0.95}}, "after": {"crown": {"clean_acc": 0.88}}}
    (w,) = _clean_drop_warning(ev)
    assert "95.0% to 88.0%" in w and "--epochs" in w
    assert (
        _clean_drop_warning({"before": {"crown": {"clean_acc": 0.95}}, "after": {"crown": {"clean_acc": 0.93}}}) == []
    )
    assert _clean_drop_warning({"before": {}, "after": {}}) == []


def test_mask_file_with_fractional_indices_is_refused(tmp_path):
    """[0.5, 2.7] is no list of neuron indices: it was silently truncated to neurons 0 and 2."""
    import json

    from lingraft.errors import LingraftError

    (tmp_path / "frac.json").write_text(
        json.dumps({"format": "lingraft-graft-mask", "masks": {"relu1": {"shape": [4], "grafted": [0.5, 2.7]}}})
    )
    with pytest.raises(LingraftError, match="malformed"):
        load_masks(tmp_path / "frac.json")
