"""certify --state: an interrupted certification resumes where it stopped and ends with the same result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from lingraft.cli.main import cli

torch.set_num_threads(1)
ARGS = ["-n", "50", "--batch-size", "10", "--eps", "0.06", "--pgd-steps", "5"]


@pytest.fixture(scope="module")
def model_pt(digits_mlp_pt) -> Path:
    return digits_mlp_pt  # conftest: trained once per session


def run(*args):
    res = CliRunner().invoke(cli, ["certify", *map(str, args)])
    assert "Traceback" not in res.output, res.output
    return res


def result(path: Path) -> dict:
    r = json.loads(path.read_text())
    keep = ("clean_acc", "pgd_acc", "certified_acc", "counts", "unstable_per_layer", "num_samples")
    out = {k: r[k] for k in keep}
    out["samples"] = [
        (s["index"], s["status"], None if s["margin_lower"] is None else round(s["margin_lower"], 5))
        for s in r["samples"]
    ]
    return out


def test_state_run_equals_plain_run_and_resumes(model_pt, tmp_path):
    assert run(model_pt, *ARGS, "--json", tmp_path / "plain.json").exit_code == 0
    state = tmp_path / "run.state"
    assert run(model_pt, *ARGS, "--state", state, "--json", tmp_path / "full.json").exit_code == 0
    assert result(tmp_path / "full.json") == result(tmp_path / "plain.json")
    lines = state.read_text().splitlines()
    assert len(lines) == 1 + 5  # header + one line per batch of 10
    # simulate a run killed during batch 3: header, two finished batches and a torn line
    state.write_text("\n".join(lines[:3]) + "\n" + lines[3][: len(lines[3]) // 2])
    res = run(model_pt, *ARGS, "--state", state, "--json", tmp_path / "resumed.json")
    assert res.exit_code == 0, res.output
    assert "resuming from" in res.output and "2 of 5 batches done" in res.output
    assert result(tmp_path / "resumed.json") == result(tmp_path / "plain.json")
    # the torn fragment was dropped, not glued onto: every line is whole and a further resume finds all 5 batches
    after = state.read_text()
    assert after.endswith("\n") and [json.loads(ln) for ln in after.splitlines()][:3] == [
        json.loads(ln) for ln in lines[:3]
    ]
    assert len(after.splitlines()) == 1 + 5
    res = run(model_pt, *ARGS, "--state", state, "--json", tmp_path / "again.json")
    assert res.exit_code == 0, res.output
    assert "5 of 5 batches done" in res.output
    assert result(tmp_path / "again.json") == result(tmp_path / "plain.json")


def test_state_torn_header_starts_over(model_pt, tmp_path):
    """Killed while writing the very first line: nothing was certified yet, so the run starts over."""
    state = tmp_path / "run.state"
    assert run(model_pt, *ARGS, "--state", state).exit_code == 0
    header = state.read_text().splitlines()[0]
    for cut in (1, 12, len(header) - 1):
        state.write_text(header[:cut])
        res = run(model_pt, *ARGS, "--state", state)
        assert res.exit_code == 0, res.output
        assert state.read_text().splitlines()[0] == header and len(state.read_text().splitlines()) == 6
    # a file that merely lacks a newline but is not the start of a state header is still refused
    state.write_text("notes")
    res = run(model_pt, *ARGS, "--state", state)
    assert res.exit_code == 1 and "not a lingraft certify state file" in res.output
    assert state.read_text() == "notes"


def test_state_damaged_middle_line_is_refused_not_repaired(model_pt, tmp_path):
    state = tmp_path / "run.state"
    assert run(model_pt, *ARGS, "--state", state).exit_code == 0
    lines = state.read_text().splitlines()
    damaged = "\n".join(lines[:2] + [lines[2][:30]] + lines[3:]) + "\n"
    state.write_text(damaged)
    res = run(model_pt, *ARGS, "--state", state)
    assert res.exit_code == 1 and "line 3" in res.output
    assert state.read_text() == damaged


def test_state_refuses_other_settings_and_foreign_files(model_pt, tmp_path):
    state = tmp_path / "run.state"
    assert run(model_pt, *ARGS, "--state", state).exit_code == 0
    res = run(model_pt, *ARGS, "--state", state, "--eps", "0.05")
    assert res.exit_code == 1 and "other settings" in res.output
    foreign = tmp_path / "notes.txt"
    foreign.write_text("my notes, not a state file\n")
    res = run(model_pt, *ARGS, "--state", foreign)
    assert res.exit_code == 1 and "not a lingraft certify state file" in res.output
    assert foreign.read_text() == "my notes, not a state file\n"  # never overwritten
    binary = tmp_path / "b.state"
    binary.write_bytes(b"\xff\xfe\x00garbage\n{}\n")
    res = run(model_pt, *ARGS, "--state", binary)
    assert res.exit_code == 1 and "not a lingraft certify state file" in res.output
