"""lingraft.io: torn JSONL tails are repaired before appending (shared by sweep, certify --state and verify
--instances), atomic writes clean up after killed writers and name the path and the real cause of a failure."""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

import pytest

from lingraft.errors import LingraftError
from lingraft.io.files import append_jsonl, atomic_write, atomic_write_text, read_jsonl

RECS = [{"k": i, "v": "x" * i} for i in range(4)]


def _write(path: Path, recs, torn: str | None = None) -> None:
    text = "".join(json.dumps(r) + "\n" for r in recs)
    path.write_text(text + (torn or ""))


# ---------------------------------------------------------------------------------------------------- JSONL


def test_torn_tail_is_skipped_and_repair_truncates_it(tmp_path):
    p = tmp_path / "r.jsonl"
    full = json.dumps(RECS[3])
    _write(p, RECS[:3], torn=full[: len(full) // 2])
    assert read_jsonl(p) == RECS[:3]
    before = p.read_bytes()
    assert read_jsonl(p) == RECS[:3] and p.read_bytes() == before  # a plain read never writes
    assert read_jsonl(p, repair=True) == RECS[:3]
    assert p.read_text() == "".join(json.dumps(r) + "\n" for r in RECS[:3])
    append_jsonl(p, RECS[3])
    assert read_jsonl(p) == RECS  # nothing glued onto a fragment


def test_complete_last_line_without_newline_gets_one(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text(json.dumps(RECS[0]) + "\n" + json.dumps(RECS[1]))
    assert read_jsonl(p, repair=True) == RECS[:2]
    append_jsonl(p, RECS[2])
    assert read_jsonl(p) == RECS[:3] and p.read_text().count("\n") == 3


def test_bad_line_in_the_middle_is_an_error_and_nothing_is_changed(tmp_path):
    p = tmp_path / "r.jsonl"
    lines = [json.dumps(r) for r in RECS]
    lines[1] = lines[1][:5]
    text = "\n".join(lines) + "\n" + '{"torn'
    p.write_text(text)
    for repair in (False, True):
        with pytest.raises(LingraftError, match=r"line 2 is not valid JSON") as e:
            read_jsonl(p, repair=repair)
        assert "\n" not in str(e.value) and str(p) in str(e.value)
        assert isinstance(e.value, ValueError)  # callers that caught the JSONDecodeError still do
    assert p.read_text() == text


def test_a_complete_but_unparseable_last_line_is_not_torn(tmp_path):
    """A torn append never ends in a newline (the line and its newline are one write): a newline-terminated bad
    last line is damage or a foreign file, reported and never truncated."""
    p = tmp_path / "notes.txt"
    p.write_text("my notes, not JSON\n")
    with pytest.raises(LingraftError, match="line 1 is not valid JSON"):
        read_jsonl(p, repair=True)
    assert p.read_text() == "my notes, not JSON\n"


def test_read_jsonl_missing_file_and_not_utf8(tmp_path):
    assert read_jsonl(tmp_path / "nope.jsonl", repair=True) == []
    assert not (tmp_path / "nope.jsonl").exists()
    p = tmp_path / "b.jsonl"
    p.write_bytes(b"\xff\xfe\x00garbage\n{}\n")
    with pytest.raises(LingraftError, match="not UTF-8"):
        read_jsonl(p, repair=True)


def test_verify_instances_resumes_after_a_torn_tail(tmp_path, monkeypatch):
    """``verify --instances --out`` killed mid-append: the rerun drops the fragment, reruns that instance only and
    leaves a valid file (it used to append after the fragment and crash with a JSONDecodeError next time)."""
    import lingraft.verify.runner as runner
    from lingraft.verify.core import VerifyResult

    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "instances.csv").write_text("".join(f"net.onnx,p{i}.vnnlib,10\n" for i in range(4)))
    ran = []

    def fake_verify(onnx, prop, **kw):
        ran.append(Path(prop).name)
        return VerifyResult("unsat", None, 0.01, {"branches": 1, "method": "crown"})

    monkeypatch.setattr(runner, "verify_property", fake_verify)
    out = tmp_path / "r.jsonl"
    runner.verify_instances(bench / "instances.csv", out=out, echo=lambda s: None)
    lines = out.read_text().splitlines()
    assert len(lines) == 4 and len(ran) == 4
    out.write_text("\n".join(lines[:2]) + "\n" + lines[2][:17])  # killed while appending instance 3
    ran.clear()
    recs = runner.verify_instances(bench / "instances.csv", out=out, echo=lambda s: None)
    assert ran == ["p2.vnnlib", "p3.vnnlib"] and [r["vnnlib"] for r in recs] == [f"p{i}.vnnlib" for i in range(4)]
    assert [json.loads(ln)["vnnlib"] for ln in out.read_text().splitlines()] == [f"p{i}.vnnlib" for i in range(4)]
    ran.clear()
    runner.verify_instances(bench / "instances.csv", out=out, echo=lambda s: None)
    assert ran == []  # everything resumed
    # damage in the middle: one line naming the file and the line, nothing appended
    damaged = "garbage\n" + out.read_text()
    out.write_text(damaged)
    with pytest.raises(LingraftError, match=r"line 1 is not valid JSON"):
        runner.verify_instances(bench / "instances.csv", out=out, echo=lambda s: None)
    assert out.read_text() == damaged
    out.write_text("[1, 2]\n")
    with pytest.raises(LingraftError, match=r"record 1 is not a JSON object"):
        runner.verify_instances(bench / "instances.csv", out=out, echo=lambda s: None)


# ---------------------------------------------------------------------------------------------- atomic write


def test_stale_temp_files_of_the_target_are_removed_on_the_next_write(tmp_path):
    target = tmp_path / "m.pt"
    old = time.time() - 3600
    stale = [
        tmp_path / ".m.pt.k3j2h1g0.tmp",  # a writer killed before this version
        tmp_path / f".m.pt.{_dead_pid()}-a1b2c3d4.tmp",  # a writer that is gone
        tmp_path / f".m.pt.{os.getpid()}-zz_zz_zz.tmp",
    ]  # an earlier process that had our pid
    keep = [
        tmp_path / ".m.pt.bak.k3j2h1g0.tmp",  # another target's temp file
        tmp_path / ".m.ptk3j2h1g0.tmp",
        tmp_path / "m.pt.k3j2h1g0.tmp",
        tmp_path / ".m.pt.k3j2h1g0.tmp.keep",
        tmp_path / ".m.pt.TOOLONGNAME.tmp",
        tmp_path / ".m.pt.q1w2e3r4.tmp",
    ]  # young: maybe being written right now
    for p in stale + keep:
        p.write_text("partial")
    for p in stale + keep[:-1]:
        os.utime(p, (old, old))
    (tmp_path / ".m.pt.dirdirdi.tmp").mkdir()  # not a file: left alone
    os.utime(tmp_path / ".m.pt.dirdirdi.tmp", (old, old))
    atomic_write_text(target, "ok")
    assert target.read_text() == "ok"
    assert not [p.name for p in stale if p.exists()]
    assert all(p.exists() for p in keep) and (tmp_path / ".m.pt.dirdirdi.tmp").is_dir()


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "m.txt"
    target.write_text("old")

    def boom(f):
        f.write("new")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_write(target, boom, mode="w")
    assert target.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["m.txt"]


def test_not_a_directory_is_named_as_such(tmp_path):
    f = tmp_path / "afile"
    f.write_text("a regular file")
    for target in (f / "x.pt", f / "sub" / "x.pt"):
        with pytest.raises(LingraftError) as e:
            atomic_write_text(target, "x")
        msg = str(e.value)
        assert "\n" not in msg and str(target) in msg and f"{f} is not a directory" in msg, msg
        assert "File exists" not in msg
        assert isinstance(e.value, OSError) and e.value.errno == errno.ENOTDIR
    assert f.read_text() == "a regular file"


def test_no_space_left_names_the_path(tmp_path):
    target = tmp_path / "out" / "m.json"

    def full(f):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(LingraftError) as e:
        atomic_write(target, full)
    msg = str(e.value)
    assert "\n" not in msg and str(target) in msg and "no space left on device" in msg.lower(), msg
    assert isinstance(e.value, OSError) and e.value.errno == errno.ENOSPC and e.value.filename == str(target)
    assert os.listdir(tmp_path / "out") == []


def test_target_is_a_directory(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(LingraftError, match="is a directory"):
        atomic_write_text(tmp_path / "d", "x")
    assert os.listdir(tmp_path / "d") == [] and os.listdir(tmp_path) == ["d"]


def _dead_pid() -> int:
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_append_jsonl_failure_names_the_file(tmp_path, monkeypatch):
    p = tmp_path / "r.jsonl"

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(LingraftError) as e:
        append_jsonl(p, {"a": 1})
    assert str(p) in str(e.value) and "no space left on device" in str(e.value)
