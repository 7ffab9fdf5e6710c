"""Branch and bound inside certify (lingraft.certify.complete, certify --bab-timeout): it only ever decides samples the
bounds left unknown, its "verified" survives a strong attack, and its counterexamples are real."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from lingraft.train.attack import pgd_attack
from lingraft.bounds import input_box
from lingraft.certify.pipeline import certify
from lingraft.cli.main import cli
from lingraft.certify.complete import decide_sample
from lingraft.data.datasets import load_dataset, subset
from lingraft.errors import UsageError
from lingraft.spec.benchmark import robustness_property

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


def test_bab_only_moves_unknown_samples_and_is_sound(trained):
    model, x, y, _ = trained
    plain = certify(model, x, y, EPS, method="crown", pgd_steps=20)
    assert plain.counts["unknown"] > 0, plain.counts  # otherwise the test checks nothing
    done = certify(model, x, y, EPS, method="crown", pgd_steps=20, bab_timeout=5.0)
    assert done.bab["attempted"] == plain.counts["unknown"]
    assert done.bab["verified"] + done.bab["falsified"] > 0, done.bab  # BaB decides some on this tiny net
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
    if idx:
        _, fooled = pgd_attack(model, x[idx], y[idx], EPS, steps=200, restarts=5, seed=1)
        assert not bool(fooled.any())


def test_bab_counterexample_is_real(trained):
    model, x, y, _ = trained
    plain = certify(model, x, y, EPS_CEX, method="crown", pgd_steps=20)
    unknown = [s["index"] for s in plain.samples if s["status"] == "unknown"]
    found = 0
    for i in unknown[:12]:
        out = decide_sample(model, x[i], int(y[i]), EPS_CEX, in_shape=x.shape[1:], num_outputs=10, timeout=2.0)
        if out["bab"] != "sat":
            assert out["counterexample"] is None
            continue
        found += 1
        cx = torch.tensor(out["counterexample"][0], dtype=torch.float32).reshape(1, *x.shape[1:])
        xl, xu = input_box(x[i:i + 1], EPS_CEX)
        assert bool((cx >= xl - 1e-7).all() and (cx <= xu + 1e-7).all())
        with torch.no_grad():
            logits = model(cx)[0]
        others = torch.cat([logits[:int(y[i])], logits[int(y[i]) + 1:]])
        assert float(others.max()) >= float(logits[int(y[i])])
        break
    if not found:
        pytest.skip("branch and bound found no counterexample on these samples")


def test_bab_rejects_l2_and_negative_timeout(trained):
    model, x, y, _ = trained
    with pytest.raises(UsageError, match="norm inf"):
        certify(model, x[:2], y[:2], 0.1, norm="2", bab_timeout=1.0)
    with pytest.raises(UsageError, match=">= 0"):
        certify(model, x[:2], y[:2], 0.1, bab_timeout=-1.0)


def test_cli_bab_timeout(trained, tmp_path):
    *_, path = trained
    args = ["certify", str(path), "-n", "30", "--eps", str(EPS), "--pgd-steps", "10", "--bab-timeout", "3"]
    res = CliRunner().invoke(cli, [*args, "--json", str(tmp_path / "r.json"), "--csv", str(tmp_path / "r.csv")])
    assert res.exit_code == 0, res.output
    assert "branch and bound (3 s per sample)" in res.output
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["config"]["bab_timeout"] == 3.0 and r["bab"]["attempted"] >= 0
    assert "bab" in (tmp_path / "r.csv").read_text().splitlines()[0]
    res = CliRunner().invoke(cli, [*args, "--norm", "2"])
    assert res.exit_code == 2 and "--norm inf only" in res.output and "Traceback" not in res.output
