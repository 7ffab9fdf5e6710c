"""Progress off a TTY (CliRunner's stderr is not one): periodic one-line records (done/total, rate, ETA) and a
one-line estimate for every long phase of certify, graft, train and run; -q silences them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from lingraft.cli import progress
from lingraft.cli.main import cli

torch.set_num_threads(1)
RECORD = re.compile(r"^(?P<desc>.+): (?P<n>\d+)/(?P<total>\d+) (?P<unit>\w+) \(\d+%\), [\d.e+-]+ \w+/s, ETA .+$")
ESTIMATE = re.compile(r"^(?P<desc>.+): (?P<total>\d+) (?P<unit>\w+), ~[\d.]+ (s|min|h) at the measured rate$")


@pytest.fixture
def every_step(monkeypatch):
    """A record after every step and an estimate for every phase."""
    monkeypatch.setattr(progress, "INTERVAL_S", 0.0)
    monkeypatch.setattr(progress, "ESTIMATE_MIN_S", 0.0)


def invoke(*args) -> tuple[int, str, str]:
    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert "Traceback" not in res.output, res.output
    return res.exit_code, res.stdout, res.stderr


def records(stderr: str) -> list[re.Match]:
    return [m for m in map(RECORD.match, stderr.splitlines()) if m]


def estimates(stderr: str) -> list[re.Match]:
    return [m for m in map(ESTIMATE.match, stderr.splitlines()) if m]


CERTIFY = ["-n", "20", "--batch-size", "5", "--eps", "0.02", "--pgd-steps", "3", "--device", "cpu"]


def test_certify_prints_records_and_an_estimate(digits_mlp_pt, every_step):
    rc, _, err = invoke("certify", digits_mlp_pt, *CERTIFY)
    assert rc == 0, err
    recs = records(err)
    assert [(m["desc"], int(m["n"]), int(m["total"]), m["unit"]) for m in recs] == [
        ("certify", n, 20, "images") for n in (5, 10, 15, 20)
    ]
    assert [(m["desc"], m["total"]) for m in estimates(err)] == [("certify", "20")]


def test_certify_state_resumed_batches_count(digits_mlp_pt, tmp_path, every_step):
    state = tmp_path / "s.state"
    assert invoke("certify", digits_mlp_pt, *CERTIFY, "-q", "--state", state)[0] == 0
    rc, _, err = invoke("certify", digits_mlp_pt, *CERTIFY, "--state", state)
    assert rc == 0, err
    assert int(records(err)[-1]["n"]) == 20


@pytest.mark.parametrize("flag", ["-q", "--no-progress"])
def test_quiet_silences_progress(digits_mlp_pt, every_step, flag):
    rc, _, err = invoke("certify", digits_mlp_pt, *CERTIFY, flag)
    assert rc == 0 and err == ""


def test_default_interval_prints_nothing_for_a_short_run(digits_mlp_pt):
    rc, _, err = invoke("certify", digits_mlp_pt, *CERTIFY)
    assert rc == 0 and records(err) == [] and estimates(err) == []


def test_graft_shows_every_phase(digits_mlp_pt, tmp_path, every_step):
    args = ["graft", digits_mlp_pt, "--ratio", "0.3", "--eps", "0.02", "--epochs", "2", "--num-train", "100"]
    args += ["--score-images", "60", "-n", "10", "--methods", "ibp", "--out", tmp_path / "g.pt", "--device", "cpu"]
    rc, _, err = invoke(*args)
    assert rc == 0, err
    phases = {(m["desc"], int(m["total"])) for m in records(err)}
    assert phases == {
        ("scoring", 60),
        ("fine-tuning (2 epoch(s) x 100 images)", 200),
        ("certifying before with ibp", 10),
        ("certifying after with ibp", 10),
    }
    # an estimate after the first step of each phase with more than one step (certify's 10 images are one batch)
    assert {m["desc"] for m in estimates(err)} == {"scoring", "fine-tuning (2 epoch(s) x 100 images)"}
    assert all(int(m["n"]) <= int(m["total"]) for m in records(err))
    rc, _, err = invoke(*args, "-q")
    assert rc == 0 and err == ""


def test_train_shows_batches_per_epoch(tmp_path, every_step):
    args = ["train", "--arch", "mlp", "--dataset", "digits", "--epochs", "2", "--num-train", "64", "--batch-size", "16"]
    args += ["--val-size", "50", "--method", "ce", "--device", "cpu"]
    rc, _, err = invoke(*args, "--out", tmp_path / "m.pt")
    assert rc == 0, err
    got = [(m["desc"], int(m["n"]), int(m["total"]), m["unit"]) for m in records(err)]
    assert got == [(f"epoch {e}/2", n, 4, "batches") for e in (1, 2) for n in (1, 2, 3, 4)]
    assert "loss" in records(err)[0].group(0)  # the running loss rides along
    rc, _, err = invoke(*args, "--out", tmp_path / "q.pt", "-q")
    assert rc == 0 and err == ""


def test_run_shows_jobs(digits_mlp_pt, tmp_path, every_step):
    sweep = tmp_path / "sweep.yaml"
    body = {"models": [str(digits_mlp_pt)], "methods": ["ibp"], "eps": [0.01, 0.02], "options": {"num-samples": 10}}
    sweep.write_text(json.dumps(body))
    rc, _, err = invoke("run", sweep, "--device", "cpu")
    assert rc == 0, err
    assert [(m["desc"], int(m["n"]), int(m["total"]), m["unit"]) for m in records(err)] == [
        ("run", 1, 2, "jobs"),
        ("run", 2, 2, "jobs"),
    ]
    assert err.count("interrupted") == 0
    Path(tmp_path / "results.jsonl").unlink()
    rc, _, err = invoke("run", sweep, "--device", "cpu", "-q")
    assert rc == 0 and err == ""


def test_format_duration():
    assert progress.format_duration(42) == "42 s"
    assert progress.format_duration(150) == "2.5 min"
    assert progress.format_duration(7200) == "2.0 h"
