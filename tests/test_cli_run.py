"""``lingraft run SWEEP.yaml``: grid, JSON lines, grafted-checkpoint reuse, resume (also after real signals),
dry run, summary outputs, failed jobs, --config and --seed."""

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
from lingraft.config import config_hash

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
VOLATILE = ("elapsed_s", "finished_at", "total_time_s", "time_per_sample_s", "time_s", "graft_time_s")


@pytest.fixture(scope="module")
def model_pt(digits_mlp_pt) -> Path:
    return digits_mlp_pt  # conftest: trained once per session


def write_sweep(folder: Path, model: Path, **extra) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    body = {
        "models": [str(model)],
        "methods": ["ibp", "crown"],
        "ratios": [0, 0.5],
        "eps": [0.01, 0.02],
        "results": "out/results.jsonl",
        "options": {"num-samples": 30, "pgd-steps": 5, "epochs": 1, "num-train": 200, "score-images": 50},
    }
    body.update(extra)
    p = folder / "sweep.yaml"
    p.write_text(json.dumps(body))  # JSON is YAML
    return p


def invoke(*args: str):
    res = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert "Traceback" not in res.output
    return res


def records(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def stable(recs: list[dict], folder: Path) -> list[dict]:
    """Records without timings, with the sweep folder replaced by a placeholder (so two folders compare)."""

    def strip(o):
        if isinstance(o, dict):
            return {k: strip(v) for k, v in o.items() if k not in VOLATILE}
        if isinstance(o, list):
            return [strip(v) for v in o]
        return o

    text = json.dumps([strip(r) for r in recs], sort_keys=True).replace(str(folder), "<DIR>")
    return sorted(json.loads(text), key=lambda r: r["job_id"])


@pytest.fixture(scope="module")
def reference(model_pt, tmp_path_factory):
    """One uninterrupted run of the standard sweep: (folder, CliRunner result, records)."""
    folder = tmp_path_factory.mktemp("ref")
    sweep = write_sweep(folder, model_pt)
    res = invoke("run", str(sweep), "--no-progress")
    return folder, res, records(folder / "out" / "results.jsonl")


def test_grid_results_and_graft_reuse(reference, model_pt):
    folder, res, recs = reference
    assert res.exit_code == 0, res.output
    assert len(recs) == 8 and all(r["status"] == "ok" for r in recs)
    assert len({r["job_id"] for r in recs}) == 8
    for r in recs:
        out = r["result"]
        assert out["schema_version"] == 1 and out["seed"] == 0
        assert out["config_hash"] == config_hash(out["config"])
        assert out["config"]["options"]["num_samples"] == 30 and out["num_samples"] == 30
        assert set(out["versions"]) >= {"lingraft", "torch", "numpy", "python"}
        assert len(out["samples"]) == 30
        assert {s["status"] for s in out["samples"]} <= {"verified", "falsified", "unknown", "misclassified"}
        assert out["certified_acc"] == sum(s["status"] == "verified" for s in out["samples"]) / 30
        assert all(s["margin_lower"] > 0 for s in out["samples"] if s["status"] == "verified")
        if r["job"]["ratio"] > 0:
            assert out["graft"]["grafted_neurons"] == 100 and out["graft"]["relu_neurons"] == 200
            assert Path(out["certified_model"]).parent == folder / "out" / "results.work"
        else:
            assert out["graft"] is None and out["certified_model"] == str(model_pt)
    # one grafted checkpoint per (ratio, eps), shared by both bound methods
    assert len(list((folder / "out" / "results.work").glob("*.pt"))) == 2
    by = {(r["job"]["method"], r["job"]["ratio"], r["job"]["eps"]): r["result"] for r in recs}
    assert by[("crown", 0.0, 0.01)]["clean_acc"] > 0.6  # the fixture model learned something
    assert by[("crown", 0.0, 0.01)]["certified_acc"] > 0.3
    # CROWN is at least as tight as IBP on this MLP; clean/PGD accuracy do not depend on the bound method
    for ratio in (0.0, 0.5):
        for eps in (0.01, 0.02):
            ibp, crown = by[("ibp", ratio, eps)], by[("crown", ratio, eps)]
            assert crown["certified_acc"] >= ibp["certified_acc"]
            assert crown["clean_acc"] == ibp["clean_acc"] and crown["pgd_acc"] == ibp["pgd_acc"]
    # the summary table
    assert "certified" in res.stdout and "100/200" in res.stdout
    assert "8 jobs, 0 failed" in res.stdout


def test_rerun_resumes_without_new_work(reference):
    folder, _, recs = reference
    sweep = folder / "sweep.yaml"
    res = invoke("run", str(sweep), "--no-progress")
    assert res.exit_code == 0
    assert "8 of 8 jobs already done" in res.stderr
    assert records(folder / "out" / "results.jsonl") == recs
    res = invoke("run", str(sweep), "--dry-run")
    assert res.exit_code == 0 and "0 of 8 jobs to run" in res.stdout and "todo" not in res.stdout
    # --seed changes every job id: nothing is reused
    res = invoke("run", str(sweep), "--dry-run", "--seed", "1")
    assert "8 of 8 jobs to run" in res.stdout


def test_json_and_csv_summary(reference, tmp_path):
    folder, _, _ = reference
    res = invoke("run", str(folder / "sweep.yaml"), "--json", "-", "--csv", str(tmp_path / "s.csv"))
    assert res.exit_code == 0
    summary = json.loads(res.stdout)
    assert summary["schema_version"] == 1 and summary["jobs"] == 8 and summary["failed"] == 0
    assert summary["config_hash"] == config_hash(summary["config"])
    assert len(summary["rows"]) == 8 and summary["rows"][0]["status"] == "ok"
    lines = (tmp_path / "s.csv").read_text().splitlines()
    assert lines[0].startswith("model,method,ratio,eps,status") and len(lines) == 9


def test_config_file_sets_run_options(model_pt, tmp_path):
    sweep = write_sweep(tmp_path / "s", model_pt, methods=["ibp"], ratios=[0], eps=[0.01])
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"results: {tmp_path / 'elsewhere.jsonl'}\nno-progress: true\n")
    res = invoke("run", str(sweep), "--config", str(cfg))
    assert res.exit_code == 0, res.output
    assert len(records(tmp_path / "elsewhere.jsonl")) == 1
    assert not (tmp_path / "s" / "out" / "results.jsonl").exists()
    # a flag beats the file
    res = invoke("run", str(sweep), "--config", str(cfg), "--results", str(tmp_path / "flag.jsonl"))
    assert res.exit_code == 0 and (tmp_path / "flag.jsonl").exists()
    cfg.write_text("retry-erors: true\n")
    res = CliRunner().invoke(cli, ["run", str(sweep), "--config", str(cfg)])
    assert res.exit_code == 2 and "did you mean 'retry-errors'" in res.output


def test_failed_job_is_recorded_and_retried(model_pt, tmp_path):
    sweep = write_sweep(tmp_path, model_pt, methods=["crown"], ratios=[0, 0.5], eps=[0.01])
    work = tmp_path / "out" / "results.work"
    work.parent.mkdir(parents=True)
    work.write_text("a file where the work folder should be")  # grafting cannot write its checkpoint
    res = CliRunner().invoke(cli, ["run", str(sweep), "--no-progress"])
    assert res.exit_code == 1, res.output
    assert "1 of 2 jobs failed" in res.stderr and "--retry-errors" in res.stderr
    recs = records(tmp_path / "out" / "results.jsonl")
    assert [r["status"] for r in recs] == ["ok", "error"]
    work.unlink()
    res = invoke("run", str(sweep), "--no-progress")  # errors are not retried unless asked
    assert res.exit_code == 1
    res = invoke("run", str(sweep), "--no-progress", "--retry-errors")
    assert res.exit_code == 0, res.output
    assert [r["status"] for r in records(tmp_path / "out" / "results.jsonl")] == ["ok", "error", "ok"]


def _start(sweep: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.Popen(
        [sys.executable, "-m", "lingraft.cli.main", "run", str(sweep), "--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=default_signals,
        cwd=str(REPO),
    )


def _kill_after(proc: subprocess.Popen, results: Path, n_lines: int, sig: int, limit_s: float = 60.0) -> str:
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit_s:
        if results.exists() and len(results.read_text().splitlines()) >= n_lines:
            break
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    return err


def test_kill_and_resume_equals_uninterrupted_run(reference, model_pt, tmp_path):
    ref_folder, _, ref_recs = reference
    sweep = write_sweep(tmp_path, model_pt)
    results = tmp_path / "out" / "results.jsonl"
    # Ctrl-C (SIGINT) after the first graft: exit 130, every line complete
    proc = _start(sweep)
    err = _kill_after(proc, results, 3, signal.SIGINT)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    first = records(results)
    assert 3 <= len(first) < 8
    # SIGKILL (no chance to clean up) during the next jobs
    proc = _start(sweep)
    _kill_after(proc, results, len(first) + 1, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    # the rerun finishes the rest; together they equal the uninterrupted run
    res = invoke("run", str(sweep), "--no-progress")
    assert res.exit_code == 0, res.output
    final = records(results)
    assert len({r["job_id"] for r in final}) == 8
    latest = list({r["job_id"]: r for r in final}.values())
    assert stable(latest, tmp_path) == stable(ref_recs, ref_folder)
    assert len(list((tmp_path / "out" / "results.work").glob("*.pt"))) == 2


def test_torn_and_corrupt_results_file(model_pt, tmp_path):
    sweep = write_sweep(tmp_path, model_pt, methods=["ibp"], ratios=[0], eps=[0.01, 0.02])
    results = tmp_path / "out" / "results.jsonl"
    assert invoke("run", str(sweep), "--no-progress").exit_code == 0
    good = results.read_text()
    first, second = good.splitlines()
    # a hard kill mid-append leaves a torn last line: it is dropped and that job reruns
    results.write_text(first + "\n" + second[: len(second) // 2])
    res = invoke("run", str(sweep), "--no-progress")
    assert res.exit_code == 0 and "torn last line" in res.stderr
    again = records(results)
    assert [r["job_id"] for r in again] == [json.loads(first)["job_id"], json.loads(second)["job_id"]]
    assert stable(again, tmp_path) == stable([json.loads(first), json.loads(second)], tmp_path)  # same numbers
    # damage in the middle is not guessed at: one line naming the line and the fix, nothing appended
    results.write_text(first[:20] + "\n" + second + "\n")
    res = CliRunner().invoke(cli, ["run", str(sweep), "--no-progress"])
    assert res.exit_code == 1 and "line 1 is not valid JSON" in res.stderr and "Traceback" not in res.output
    assert results.read_text() == first[:20] + "\n" + second + "\n"


def test_sweep_option_bab_timeout(model_pt, tmp_path):
    """options: {bab-timeout: S} runs branch and bound on each job's unknown samples; L2 + bab is rejected."""
    sweep = write_sweep(
        tmp_path,
        model_pt,
        methods=["ibp"],
        ratios=[0],
        eps=[0.05],
        options={"num-samples": 20, "pgd-steps": 5, "bab-timeout": 2},
    )
    res = invoke("run", str(sweep), "--no-progress")
    assert res.exit_code == 0, res.output
    (rec,) = records(tmp_path / "out" / "results.jsonl")
    out = rec["result"]
    assert out["config"]["options"]["bab_timeout"] == 2.0
    assert out["bab"]["attempted"] == out["bab"]["verified"] + out["bab"]["falsified"] + out["bab"]["undecided"]
    bad = write_sweep(tmp_path / "l2", model_pt, options={"norm": 2, "bab-timeout": 1})
    res = invoke("run", str(bad), "--no-progress")
    assert res.exit_code == 2 and "norm inf only" in res.output
