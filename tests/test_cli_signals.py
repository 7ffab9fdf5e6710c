"""A real SIGTERM (docker stop, Slurm, CI timeouts) is handled like Ctrl-C by every command: what was finished is
saved, one line says so, the exit code is 130, and rerunning the same command resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import default_signals

from lingraft.cli.main import cli

pytestmark = pytest.mark.subprocess
torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
RESUME = "rerun the same command to resume"


def _start(*args: str, cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.Popen(
        [sys.executable, "-m", "lingraft.cli.main", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=default_signals,
        cwd=str(cwd),
    )


def _term_when(proc: subprocess.Popen, ready, limit_s: float = 120.0) -> str:
    """Send SIGTERM once ``ready()`` holds (the command is inside its long work); returns stderr."""
    try:
        t0 = time.monotonic()
        while not ready() and proc.poll() is None and time.monotonic() - t0 < limit_s:
            time.sleep(0.02)
        assert proc.poll() is None, "finished before the signal: " + proc.communicate()[1]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return err


def _interrupt_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if "interrupted" in ln]


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_sigterm_train_saves_state_and_resumes(tmp_path):
    args = ["train", "--arch", "mlp", "--dataset", "digits", "--val-size", "200", "--batch-size", "8"]
    args += ["--epochs", "40", "--method", "ce", "--no-progress", "--device", "cpu"]
    out = tmp_path / "m.pt"
    state = tmp_path / "m.pt.state"
    proc = _start(*args, "--out", str(out), cwd=tmp_path)
    err = _term_when(proc, state.exists)  # the state appears after epoch 1, then more epochs follow
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    lines = _interrupt_lines(err)
    assert len(lines) == 1 and str(state) in lines[0] and RESUME in lines[0], err
    assert state.exists()
    # the rerun resumes from the state file and ends with the weights of an uninterrupted run
    res = CliRunner().invoke(cli, [*args, "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "resuming from" in res.output
    ref = tmp_path / "ref.pt"
    assert CliRunner().invoke(cli, [*args, "--out", str(ref)]).exit_code == 0
    a, b = torch.load(out, weights_only=False), torch.load(ref, weights_only=False)
    sa, sb = a["state_dict"], b["state_dict"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _certify_result(path: Path) -> dict:
    r = json.loads(path.read_text())
    keep = ("clean_acc", "pgd_acc", "certified_acc", "counts", "num_samples")
    out = {k: r[k] for k in keep}
    out["samples"] = [(s["index"], s["status"], s["margin_lower"]) for s in r["samples"]]
    return out


def test_sigterm_certify_state_keeps_batches_and_resumes(digits_mlp_pt, tmp_path):
    args = ["certify", str(digits_mlp_pt), "-n", "300", "--batch-size", "2", "--eps", "0.06"]
    args += ["--method", "alpha-crown", "--pgd-steps", "50", "--no-progress", "--device", "cpu"]
    state = tmp_path / "run.state"
    proc = _start(*args, "--state", str(state), cwd=tmp_path)
    err = _term_when(proc, lambda: _lines(state) >= 3)  # header + 2 finished batches
    assert proc.returncode == 130, err
    lines = _interrupt_lines(err)
    assert len(lines) == 1 and RESUME in lines[0] and str(state) in lines[0], err
    saved = _lines(state) - 1
    assert 2 <= saved < 150 and f"interrupted: {saved} of 150 batches saved" in lines[0]
    res = CliRunner().invoke(cli, [*args, "--state", str(state), "--json", str(tmp_path / "resumed.json")])
    assert res.exit_code == 0, res.output
    assert f"resuming from {state}: {saved} of 150 batches done" in res.output
    plain = CliRunner().invoke(cli, [*args, "--json", str(tmp_path / "plain.json")])
    assert plain.exit_code == 0, plain.output
    assert _certify_result(tmp_path / "resumed.json") == _certify_result(tmp_path / "plain.json")


def test_sigterm_graft_exits_130_with_one_line(digits_mlp_pt, tmp_path):
    out, mask = tmp_path / "g.pt", tmp_path / "mask.json"
    args = ["graft", str(digits_mlp_pt), "--ratio", "0.5", "--eps", "0.05", "--epochs", "200", "--num-train", "1000"]
    args += ["--batch-size", "8", "-n", "20", "--out", str(out), "--save-mask", str(mask), "--device", "cpu"]
    proc = _start(*args, cwd=tmp_path)
    err = _term_when(proc, mask.exists)  # the mask is written after scoring, before fine-tuning
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    lines = _interrupt_lines(err)
    assert len(lines) == 1 and lines[0].startswith("interrupted: graft keeps no resume state"), err
    assert not out.exists()  # nothing half-written


def test_interrupt_inside_exec_of_a_string_still_exits_130(tmp_path):
    """A signal handled inside ``exec`` of a string (dataclasses build their methods so, e.g. while torch lazily
    imports torch._dynamo when graft's optimizer is made) marks the KeyboardInterrupt as unhandled in CPython;
    under ``python -m`` the process then killed itself with SIGINT (-2) after printing its line and exiting 130."""
    (tmp_path / "exec_boom.py").write_text(
        "from lingraft.cli.main import cli\n\n"
        "@cli.command('boom')\n"
        "def boom():\n"
        "    exec('import os, signal\\nos.kill(os.getpid(), signal.SIGTERM)\\nfor _ in range(3): pass\\n')\n\n"
        "cli(['boom'], prog_name='lingraft')\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO)]))
    proc = subprocess.run(
        [sys.executable, "-m", "exec_boom"],
        capture_output=True,
        text=True,
        env=env,
        preexec_fn=default_signals,
        cwd=str(tmp_path),
        timeout=120,
    )
    assert proc.returncode == 130, (proc.returncode, proc.stderr)
    assert _interrupt_lines(proc.stderr) == ["interrupted"], proc.stderr


def test_sigterm_run_one_line_and_resumes(digits_mlp_pt, tmp_path):
    sweep = tmp_path / "sweep.yaml"
    body = {
        "models": [str(digits_mlp_pt)],
        "methods": ["alpha-crown"],
        "eps": [0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08],
        "results": "results.jsonl",
        "options": {"num-samples": 60, "pgd-steps": 20},
    }
    sweep.write_text(json.dumps(body))
    results = tmp_path / "results.jsonl"
    proc = _start("run", str(sweep), "--no-progress", "--device", "cpu", cwd=tmp_path)
    err = _term_when(proc, lambda: _lines(results) >= 1)
    assert proc.returncode == 130, err
    lines = _interrupt_lines(err)
    done = _lines(results)
    assert len(lines) == 1 and f"interrupted: {done} of 8 jobs done" in lines[0] and RESUME in lines[0], err
    res = CliRunner().invoke(cli, ["run", str(sweep), "--no-progress", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert f"{done} of 8 jobs already done" in res.output
    assert len({json.loads(ln)["job_id"] for ln in results.read_text().splitlines()}) == 8
