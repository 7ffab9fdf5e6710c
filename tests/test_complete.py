"""Branch and bound inside certify (lingraft.certify.complete, certify --bab-timeout): it only ever decides samples the
bounds left unknown, its "verified" survives a strong attack, and its counterexamples are real."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from lingraft.bounds import input_box
from lingraft.certify.complete import decide_sample
from lingraft.certify.pipeline import certify
from lingraft.cli.main import cli
from lingraft.data.datasets import load_dataset, subset
from lingraft.errors import UsageError
from lingraft.spec.benchmark import robustness_property
from lingraft.train.attack import pgd_attack

torch.set_num_threads(1)
EPS = 0.08  # the digits MLP below leaves ~11 of 60 samples unknown under CROWN here; BaB decides most of them
EPS_CEX = 0.12  # larger: some unknown samples have counterexamples that PGD misses and BaB finds


@pytest.fixture(scope="module")
def trained(digits_mlp_pt):
    """(model, x [N, 1, 8, 8], y [N], checkpoint path) for the conftest digits MLP."""
    from lingraft.io.loader import load_model

    lm = load_model(digits_mlp_pt)
    x, y = subset(*load_dataset("digits", "test"), 60)
    return lm.model.eval(), x.reshape(-1, *lm.in_shape), y, digits_mlp_pt


def test_robustness_property_is_the_certify_box():
    x = torch.rand(1, 4, 4)
    prop = robustness_property(x, 2, 0.1, 5)
    (reg,) = prop.regions
    xl, xu = input_box(x.unsqueeze(0), 0.1)
    assert np.array_equal(reg.lower, xl.reshape(-1).double().numpy())
    assert np.array_equal(reg.upper, xu.reshape(-1).double().numpy())
    assert len(reg.outputs) == 4  # one disjunct per j != label
    y_bad = np.array([0.0, 0.0, 1.0, 0.0, 1.0])  # class 4 ties the label: unsafe (a tie is not certified)
    y_ok = np.array([0.0, 0.0, 1.0, 0.0, 0.999])
    assert prop.is_violated_by(x.numpy(), y_bad) and not prop.is_violated_by(x.numpy(), y_ok)


@pytest.mark.bab
def test_bab_only_moves_unknown_samples_and_is_sound(trained):
    model, x, y, _ = trained
    plain = certify(model, x, y, EPS, method="crown", pgd_steps=20)
    assert plain.counts["unknown"] > 0, plain.counts  # otherwise the test checks nothing
    done = certify(model, x, y, EPS, method="crown", pgd_steps=20, bab_timeout=5.0)
    assert done.bab["attempted"] == plain.counts["unknown"]
    # at this eps most unknowns are robust and small enough to prove (9 of 11 here, each in ~1 s): the attack
    # below must have something to attack
    assert done.bab["verified"] > 0, done.bab
    before = {s["index"]: s for s in plain.samples}
    for s in done.samples:
        b = before[s["index"]]
        if b["status"] != "unknown":
            assert s["status"] == b["status"] and s["bab"] is None
        else:
            assert s["bab"] in ("unsat", "sat", "timeout", "unknown", "error")
            assert s["status"] == {"unsat": "verified", "sat": "falsified"}.get(s["bab"], "unknown")
    assert done.counts["verified"] == plain.counts["verified"] + done.bab["verified"]
    assert done.pgd_acc == plain.pgd_acc  # a BaB counterexample does not change the PGD accuracy
    # every BaB-verified sample withstands a much stronger attack
    idx = [s["index"] for s in done.samples if s["bab"] == "unsat"]
    assert len(idx) == done.bab["verified"]
    _, fooled = pgd_attack(model, x[idx], y[idx], EPS, steps=200, restarts=5, seed=1)
    assert not bool(fooled.any())


def _assert_real_counterexample(model, x, label: int, eps: float, out: dict) -> None:
    """out["counterexample"] (x [n_in], y [n_out]) lies in the certify box of x [1, *in_shape] and the model, run
    again here, really puts some class j != label at or above the label."""
    assert out["bab"] == "sat" and out["status"] == "falsified", out
    cx = torch.tensor(out["counterexample"][0], dtype=torch.float32).reshape(x.shape)
    xl, xu = input_box(x, eps)
    assert bool((cx >= xl - 1e-7).all() and (cx <= xu + 1e-7).all())
    with torch.no_grad():
        logits = model(cx)[0]
    others = torch.cat([logits[:label], logits[label + 1 :]])
    assert float(others.max()) >= float(logits[label])


@pytest.mark.bab
def test_bab_counterexample_is_real(trained):
    model, x, y, _ = trained

    def decide(i: int, timeout: float) -> dict:
        return decide_sample(model, x[i], int(y[i]), EPS_CEX, in_shape=x.shape[1:], num_outputs=10, timeout=timeout)

    # a misclassified sample violates its property at the centre of the box: a counterexample must come back
    with torch.no_grad():
        wrong = (model(x).argmax(1) != y).nonzero().flatten().tolist()
    assert wrong, "the digits MLP classifies every sample right: no sure counterexample"
    _assert_real_counterexample(model, x[wrong[0] : wrong[0] + 1], int(y[wrong[0]]), EPS_CEX, decide(wrong[0], 10.0))
    # the samples certify leaves unknown at this eps: some are falsified (the first one here, by the attack in
    # under 0.1 s), and only "sat" ever carries a counterexample
    plain = certify(model, x, y, EPS_CEX, method="crown", pgd_steps=20)
    unknown = [s["index"] for s in plain.samples if s["status"] == "unknown"]
    found = 0
    for i in unknown[:12]:
        out = decide(i, 5.0)
        if out["bab"] != "sat":
            assert out["counterexample"] is None and out["status"] != "falsified", out
            continue
        found += 1
        _assert_real_counterexample(model, x[i : i + 1], int(y[i]), EPS_CEX, out)
        break
    assert found, f"no counterexample on the first 12 of {len(unknown)} unknown samples at eps {EPS_CEX}"


def test_bab_rejects_l2_and_negative_timeout(trained):
    model, x, y, _ = trained
    with pytest.raises(UsageError, match="norm inf"):
        certify(model, x[:2], y[:2], 0.1, norm="2", bab_timeout=1.0)
    with pytest.raises(UsageError, match=">= 0"):
        certify(model, x[:2], y[:2], 0.1, bab_timeout=-1.0)


@pytest.mark.bab
def test_cli_bab_timeout(trained, tmp_path):
    *_, path = trained
    args = ["certify", str(path), "-n", "30", "--eps", str(EPS), "--pgd-steps", "10", "--bab-timeout", "3"]
    res = CliRunner().invoke(cli, [*args, "--json", str(tmp_path / "r.json"), "--csv", str(tmp_path / "r.csv")])
    assert res.exit_code == 0, res.output
    assert "branch and bound (3 s per sample)" in res.output
    r = json.loads((tmp_path / "r.json").read_text())
    bab = r["bab"]
    assert r["config"]["bab_timeout"] == 3.0 and bab["timeout_per_sample_s"] == 3.0
    # every sample CROWN left unknown was attempted (there are some at this eps), and only those
    attempted = [s for s in r["samples"] if s["bab"] is not None]
    assert bab["attempted"] == len(attempted) > 0, bab
    assert bab["attempted"] == bab["verified"] + bab["falsified"] + bab["undecided"]
    assert r["counts"]["unknown"] == bab["undecided"]
    for s in attempted:
        assert s["status"] == {"unsat": "verified", "sat": "falsified"}.get(s["bab"], "unknown"), s
    assert sum(s["status"] == "verified" for s in attempted) == bab["verified"]
    assert "bab" in (tmp_path / "r.csv").read_text().splitlines()[0]
    res = CliRunner().invoke(cli, [*args, "--norm", "2"])
    assert res.exit_code == 2 and "--norm inf only" in res.output and "Traceback" not in res.output
