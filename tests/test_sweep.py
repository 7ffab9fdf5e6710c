"""Tests for lingraft.experiments.sweep: loading, job expansion, resume after interruption (incl. real signals)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import default_signals

from lingraft.errors import LingraftError, UsageError
from lingraft.experiments.sweep import (
    SweepSpec,
    expand_jobs,
    load_sweep,
    read_results,
    run_sweep,
)
from lingraft.experiments.sweep_summary import SUMMARY_KEYS, summary_columns, summary_csv, summary_rows

REPO = Path(__file__).resolve().parents[1]


def _spec(**kw) -> SweepSpec:
    base = dict(models=["m1", "m2"], eps=[0.1, 0.2], methods=["ibp", "crown"], ratios=[0.0])
    base.update(kw)
    return SweepSpec(**base)


def _fake_job(job: dict) -> dict:
    """Deterministic stand-in for a verification run."""
    score = len(job["model"]) * 10 + len(job["method"]) - job["eps"] * 100 + job["ratio"]
    return {"verified": int(score) % 7, "total": 7, "score": score}


def _strip(records):
    """Records without the fields that legitimately differ between runs."""
    return [{k: v for k, v in r.items() if k not in ("finished_at", "elapsed_s")} for r in records]


def _lines(path: Path) -> list[str]:
    return [ln for ln in path.read_text().splitlines() if ln.strip()]


def _silent(_msg: str) -> None:
    pass


# ------------------------------------------------------------------------------------------------ loading


def test_load_sweep_full(tmp_path):
    p = tmp_path / "sub" / "sweep.yaml"
    p.parent.mkdir()
    p.write_text(
        textwrap.dedent("""\
        models: [fc-8x200, ckpt/a.pt]
        methods: [ibp, crown]
        ratios: [0, 0.5]
        eps: [0.01, 2/255]
        results: out/res.jsonl
        options: {batch-size: 64, pgd: {steps: 10}}
    """)
    )
    spec = load_sweep(p)
    assert spec.models == ["fc-8x200", "ckpt/a.pt"]
    assert spec.eps == [0.01, 2 / 255]
    assert spec.ratios == [0.0, 0.5]
    assert spec.extra == {"batch_size": 64, "pgd": {"steps": 10}}
    assert spec.results == str(p.parent.resolve() / "out" / "res.jsonl")
    jobs = expand_jobs(spec)
    assert len(jobs) == 2 * 2 * 2 * 2
    # a zoo name stays a name; a relative checkpoint path resolves against the sweep file's folder
    assert jobs[0]["model"] == "fc-8x200"
    assert jobs[-1]["model"] == str(p.parent.resolve() / "ckpt" / "a.pt")
    assert jobs[0]["options"] == {"batch_size": 64, "pgd": {"steps": 10}}


def test_load_sweep_defaults_and_scalars(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("models: fc-8x200\nmethods: crown\neps: 0.1\n")
    spec = load_sweep(p)
    assert (spec.models, spec.methods, spec.eps, spec.ratios, spec.extra) == (["fc-8x200"], ["crown"], [0.1], [0.0], {})
    assert spec.results == str(tmp_path.resolve() / "results.jsonl")


@pytest.mark.parametrize(
    "text, exc, pattern",
    [
        (
            "model: [a]\nmethods: [ibp]\neps: [0.1]\n",
            UsageError,
            r"unknown key 'model' in .*s\.yaml \(did you mean 'models'\?\)",
        ),
        ("models: [a]\nmethods: [ibp]\n", UsageError, r"has no 'eps' list"),
        ("models: [a]\nmethods: [ibp]\neps: []\n", UsageError, r"'eps' in .* is empty"),
        ("models: [a]\nmethods: [ibp]\neps: [fast]\n", UsageError, r"'eps' in .* is 'fast', not a number"),
        ("models: [a]\nmethods: [ibp]\neps: [-0.1]\n", UsageError, r"must be >= 0"),
        ("models: [a]\nmethods: [ibp]\neps: [.nan]\n", UsageError, r"finite"),
        ("models: [a]\nmethods: [ibp]\neps: [0.1]\nratios: [1.5]\n", UsageError, r"\[0, 1\]"),
        ("models: [a, a]\nmethods: [ibp]\neps: [0.1]\n", UsageError, r"lists 'a' twice"),
        ("models: [3]\nmethods: [ibp]\neps: [0.1]\n", UsageError, r"'models' in .* has 3"),
        ("models: [a]\nmethods: [ibp]\neps: [0.1]\noptions: [1]\n", UsageError, r"'options' .* must be a mapping"),
        ("models: [a]\nmethods: [ibp]\neps: [0.1]\noptions: {when: 2024-01-01}\n", UsageError, r"quote it"),
        ("models: [a]\nmethods: [ibp]\neps: [0.1]\nresults: [x]\n", UsageError, r"'results'"),
        ("models: [a\nmethods: [ibp]\n", LingraftError, r"malformed YAML at .*s\.yaml:2:"),
    ],
)
def test_load_sweep_errors(tmp_path, text, exc, pattern):
    p = tmp_path / "s.yaml"
    p.write_text(text)
    with pytest.raises(exc, match=pattern) as ei:
        load_sweep(p)
    assert "\n" not in str(ei.value)
    assert ei.value.exit_code == (2 if exc is UsageError else 1)


def test_load_sweep_allowed_methods_and_options(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("models: [a]\nmethods: [crwn]\neps: [0.1]\n")
    with pytest.raises(UsageError, match=r"unknown method 'crwn' .*did you mean 'crown'"):
        load_sweep(p, allowed_methods={"ibp", "crown", "alpha-crown"})
    p.write_text("models: [a]\nmethods: [crown]\neps: [0.1]\noptions: {batch-sise: 3}\n")
    with pytest.raises(UsageError, match=r"unknown key 'batch-sise' .*did you mean 'batch-size'"):
        load_sweep(p, allowed_options={"batch_size"})


# -------------------------------------------------------------------------------------------------- jobs


def test_expand_jobs_order_and_ids():
    spec = _spec(ratios=[0.0, 0.5])
    jobs = expand_jobs(spec)
    assert len(jobs) == 2 * 2 * 2 * 2
    assert [(j["model"], j["method"], j["ratio"], j["eps"]) for j in jobs[:3]] == [
        ("m1", "ibp", 0.0, 0.1),
        ("m1", "ibp", 0.0, 0.2),
        ("m1", "ibp", 0.5, 0.1),
    ]
    ids = [j["job_id"] for j in jobs]
    assert len(set(ids)) == len(ids)
    assert ids == [j["job_id"] for j in expand_jobs(_spec(ratios=[0.0, 0.5]))]  # deterministic
    # the id depends on the job's own parameters only, not on the rest of the grid
    other = expand_jobs(_spec(models=["m1"], eps=[0.1], methods=["ibp"], ratios=[0.0]))
    assert other[0]["job_id"] == ids[0]
    # options are part of the id
    assert expand_jobs(_spec(extra={"k": 1}))[0]["job_id"] != ids[0]


def test_job_id_ignores_base_dir(tmp_path):
    a = expand_jobs(_spec(models=["ck/a.pt"], base_dir=str(tmp_path / "x")))
    b = expand_jobs(_spec(models=["ck/a.pt"], base_dir=str(tmp_path / "y")))
    assert a[0]["job_id"] == b[0]["job_id"]
    assert a[0]["model"] != b[0]["model"]


# --------------------------------------------------------------------------------------------- running


def test_run_sweep_writes_one_line_per_job(tmp_path):
    out = tmp_path / "r.jsonl"
    recs = run_sweep(_spec(), _fake_job, results_path=out, log=_silent)
    assert len(recs) == 8 and len(_lines(out)) == 8
    first = json.loads(_lines(out)[0])
    assert set(first) >= {"job_id", "job", "result", "finished_at", "status"}
    assert first["status"] == "ok" and first["result"] == _fake_job(first["job"])
    assert "job_id" not in first["job"]


def test_resume_after_keyboard_interrupt(tmp_path):
    ref = run_sweep(_spec(), _fake_job, results_path=tmp_path / "ref.jsonl", log=_silent)
    out = tmp_path / "r.jsonl"
    calls = []

    def flaky(job):
        calls.append(job["job_id"])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return _fake_job(job)

    messages: list[str] = []
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(_spec(), flaky, results_path=out, log=messages.append)
    assert len(_lines(out)) == 2
    assert any("interrupted: 2 of 8" in m for m in messages)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # handlers restored

    seen = []
    recs = run_sweep(_spec(), lambda j: (seen.append(j["job_id"]), _fake_job(j))[1], results_path=out, log=_silent)
    assert len(seen) == 6 and seen[0] == calls[2]  # resumes with the interrupted job
    assert _strip(recs) == _strip(ref)
    assert _strip(read_results(out)) == _strip(read_results(tmp_path / "ref.jsonl"))
    # a third run does nothing
    assert run_sweep(_spec(), lambda j: pytest.fail("should not run"), results_path=out, log=_silent)


def test_errors_recorded_not_retried_unless_asked(tmp_path):
    out = tmp_path / "r.jsonl"

    def failing(job):
        if job["method"] == "crown" and job["eps"] == 0.2:
            raise ValueError("bound blew up\nsecond line")
        return _fake_job(job)

    recs = run_sweep(_spec(), failing, results_path=out, log=_silent)
    errs = [r for r in recs if r["status"] == "error"]
    assert len(recs) == 8 and len(errs) == 2
    assert errs[0]["error"] == "ValueError: bound blew up second line" and errs[0]["result"] is None

    ran = []
    run_sweep(_spec(), lambda j: ran.append(j) or _fake_job(j), results_path=out, log=_silent)
    assert ran == []
    recs = run_sweep(_spec(), lambda j: ran.append(j) or _fake_job(j), results_path=out, log=_silent, retry_errors=True)
    assert len(ran) == 2 and all(r["status"] == "ok" for r in recs)
    assert len(_lines(out)) == 10  # old error lines stay; the newest record per job wins
    rows = summary_rows(read_results(out))
    assert len(rows) == 8 and all(r["status"] == "ok" and r["error"] is None for r in rows)


def test_bad_job_results_recorded_as_errors(tmp_path):
    recs = run_sweep(
        _spec(models=["m1"], methods=["ibp"]), lambda j: [1, 2], results_path=tmp_path / "a.jsonl", log=_silent
    )
    assert recs[0]["status"] == "error" and "expected a dict" in recs[0]["error"]
    recs = run_sweep(
        _spec(models=["m1"], methods=["ibp"]), lambda j: {"x": object()}, results_path=tmp_path / "b.jsonl", log=_silent
    )
    assert recs[0]["status"] == "error" and "not JSON serializable" in recs[0]["error"]
    assert all(json.loads(ln) for ln in _lines(tmp_path / "b.jsonl"))


def test_torn_last_line_tolerated_and_repaired(tmp_path):
    spec = _spec()
    ref = run_sweep(spec, _fake_job, results_path=tmp_path / "ref.jsonl", log=_silent)
    out = tmp_path / "r.jsonl"
    full = (tmp_path / "ref.jsonl").read_text().splitlines(keepends=True)
    out.write_text("".join(full[:3]) + full[3][: len(full[3]) // 2])  # crash in the middle of line 4
    assert len(read_results(out)) == 3
    ran = []
    recs = run_sweep(spec, lambda j: ran.append(j) or _fake_job(j), results_path=out, log=_silent)
    assert len(ran) == 5
    assert _strip(recs) == _strip(ref)
    assert len(_lines(out)) == 8 and all(json.loads(ln) for ln in _lines(out))  # no glued line


def test_complete_last_line_without_newline(tmp_path):
    spec = _spec()
    run_sweep(spec, _fake_job, results_path=tmp_path / "ref.jsonl", log=_silent)
    out = tmp_path / "r.jsonl"
    out.write_text("".join((tmp_path / "ref.jsonl").read_text().splitlines(keepends=True)[:2]).rstrip("\n"))
    ran = []
    run_sweep(spec, lambda j: ran.append(j) or _fake_job(j), results_path=out, log=_silent)
    assert len(ran) == 6 and len(_lines(out)) == 8


def test_corrupt_middle_line_is_a_clear_error(tmp_path):
    out = tmp_path / "r.jsonl"
    run_sweep(_spec(), _fake_job, results_path=out, log=_silent)
    lines = out.read_text().splitlines()
    lines[2] = "garbage"
    out.write_text("\n".join(lines) + "\n")
    with pytest.raises(LingraftError, match=r"line 3 is not valid JSON"):
        run_sweep(_spec(), _fake_job, results_path=out, log=_silent)


def test_signal_during_write_is_deferred(tmp_path, monkeypatch):
    import lingraft.io.resumable as resumable_mod

    real_append = resumable_mod.append_jsonl
    n = []

    def append_then_signal(path, obj):
        n.append(1)
        if len(n) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives while the record is being written
            time.sleep(0.01)  # let the handler run inside the critical section
        real_append(path, obj)

    monkeypatch.setattr(resumable_mod, "append_jsonl", append_then_signal)
    out = tmp_path / "r.jsonl"
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(_spec(), _fake_job, results_path=out, log=_silent)
    assert len(_lines(out)) == 2  # the write in progress completed, nothing after it
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is restored


def test_summary_rows_and_table():
    recs = [
        {
            "job_id": "a",
            "job": {"model": "ck/m.pt", "method": "ibp", "ratio": 0.0, "eps": 0.1},
            "status": "error",
            "result": None,
            "error": "ValueError: x",
            "elapsed_s": 1.0,
        },
        {
            "job_id": "b",
            "job": {"model": "ck/m.pt", "method": "crown", "ratio": 0.5, "eps": 0.1},
            "status": "ok",
            "result": {
                "clean_acc": 0.9,
                "pgd_acc": 0.8,
                "certified_acc": 0.5,
                "time_per_sample_s": 0.00125,
                "graft": {"grafted_neurons": 10, "relu_neurons": 40},
                "per_sample": [1, 0],
            },
            "error": None,
            "elapsed_s": 2.0,
        },
        {
            "job_id": "a",
            "job": {"model": "ck/m.pt", "method": "ibp", "ratio": 0.0, "eps": 0.1},
            "status": "ok",
            "result": {"clean_acc": 1.0},
            "error": None,
            "elapsed_s": 0.5,
        },
    ]
    rows = summary_rows(recs)  # the latest record per job, in first-seen order
    assert rows == [
        {
            "model": "ck/m.pt",
            "method": "ibp",
            "ratio": 0.0,
            "eps": 0.1,
            "status": "ok",
            "clean_acc": 1.0,
            "pgd_acc": None,
            "certified_acc": None,
            "grafted_neurons": None,
            "relu_neurons": None,
            "time_per_sample_s": None,
            "elapsed_s": 0.5,
            "error": None,
        },
        {
            "model": "ck/m.pt",
            "method": "crown",
            "ratio": 0.5,
            "eps": 0.1,
            "status": "ok",
            "clean_acc": 0.9,
            "pgd_acc": 0.8,
            "certified_acc": 0.5,
            "grafted_neurons": 10,
            "relu_neurons": 40,
            "time_per_sample_s": 0.00125,
            "elapsed_s": 2.0,
            "error": None,
        },
    ]
    header, body = summary_columns(rows)
    assert header == [
        "model",
        "method",
        "ratio",
        "eps",
        "status",
        "clean",
        "PGD",
        "certified",
        "grafted",
        "ms/img",
        "s",
    ]
    assert body == [
        ["m.pt", "ibp", 0.0, 0.1, "ok", "100.0%", "-", "-", "-", "-", "0.5"],
        ["m.pt", "crown", 0.5, 0.1, "ok", "90.0%", "80.0%", "50.0%", "10/40", "1.25", "2.0"],
    ]
    lines = summary_csv(rows).splitlines()
    assert lines[0].split(",") == SUMMARY_KEYS and len(lines) == 3
    assert summary_columns([]) == (header, [])


def test_second_concurrent_sweep_refused(tmp_path):
    out = tmp_path / "r.jsonl"
    spec = _spec(models=["m1"], methods=["ibp"], eps=[0.1])

    def nested(job):
        with pytest.raises(LingraftError, match="another sweep is writing"):
            run_sweep(spec, _fake_job, results_path=out, log=_silent)
        return _fake_job(job)

    assert run_sweep(spec, nested, results_path=out, log=_silent)[0]["status"] == "ok"


# ------------------------------------------------------------------------------------- real signals

_CHILD = """
import sys, time
from lingraft.experiments.sweep import SweepSpec, run_sweep
sys.path.insert(0, {tests!r})
from test_sweep import _fake_job

def slow(job):
    time.sleep(0.3)
    return _fake_job(job)

spec = SweepSpec(models=["m1", "m2"], eps=[0.1, 0.2], methods=["ibp", "crown"], ratios=[0.0, 0.5])
try:
    run_sweep(spec, slow, results_path={out!r}, log=lambda m: print(m, flush=True))
except KeyboardInterrupt:
    sys.exit(130)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_real_signal_then_resume(tmp_path, sig):
    out = tmp_path / "r.jsonl"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    code = _CHILD.format(tests=str(REPO / "tests"), out=str(out))
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=default_signals,
    )
    try:
        # Wait until the child is inside the sweep (startup time varies on a loaded machine), then ~1 s more.
        deadline = time.monotonic() + 60
        while not (out.exists() and _lines(out)) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(0.7)
        assert proc.poll() is None, proc.communicate()[0]
        proc.send_signal(sig)
        output, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, output
    assert "interrupted:" in output
    partial = _lines(out)
    assert 1 <= len(partial) < 16
    assert all(json.loads(ln)["status"] == "ok" for ln in partial)  # every line complete

    spec = _spec(ratios=[0.0, 0.5])  # the child's grid: 16 jobs of 0.3 s, far more than the ~1 s before the signal
    ran = []
    recs = run_sweep(spec, lambda j: ran.append(j) or _fake_job(j), results_path=out, log=_silent)
    assert len(ran) == 16 - len(partial)
    ref = run_sweep(spec, _fake_job, results_path=tmp_path / "ref.jsonl", log=_silent)
    assert _strip(recs) == _strip(ref)
    assert _strip(read_results(out)) == _strip(ref)


def test_load_sweep_reports_every_invalid_entry_at_once(tmp_path):
    """Issue 14.7: every bad entry (eps, ratios, methods, duplicates, options) in one one-line message."""
    p = tmp_path / "s.yaml"
    p.write_text(
        "models: [a, a]\nmethods: [ibp, crwn]\neps: [fast, 8, 2/255]\nratios: [1.5]\noptions: {num-sample: 3}\n"
    )
    with pytest.raises(UsageError) as ei:
        load_sweep(p, allowed_methods=["ibp", "crown"], allowed_options=["num_samples"])
    msg = str(ei.value)
    assert "\n" not in msg and ei.value.exit_code == 2
    assert msg.startswith(f"6 invalid entries in {p}: (1) ")
    for part in (
        "unknown method 'crwn'",
        "'fast', not a number",
        "eps' in " + str(p) + " 8 exceeds the input range [0, 1]",
        "write 8/255",
        "'ratios' in",
        "lists 'a' twice",
        "did you mean 'num-samples'",
    ):
        assert part in msg, (part, msg)


def test_load_sweep_eps_uses_the_shared_fraction_parser(tmp_path):
    from lingraft.config import parse_eps

    p = tmp_path / "s.yaml"
    p.write_text("models: [a]\nmethods: [ibp]\neps: [2/255, ' 8 / 255', 0.1]\n")
    assert load_sweep(p).eps == [parse_eps("2/255"), parse_eps("8/255"), 0.1]
