"""Running a VNN-COMP benchmark folder and writing competition result files.

A benchmark folder holds ``instances.csv`` (``onnx,vnnlib,timeout_seconds``, paths relative to the folder) and
optionally ``expected.csv`` (``onnx,vnnlib,consensus,...``; consensus ``sat``/``unsat``). Every finished
instance is appended to a JSONL file as one line (atomic append), so an interrupted run resumes where it
stopped.
"""

from __future__ import annotations

import csv
import statistics
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from lingraft.errors import LingraftError
from lingraft.io.resumable import ResumableLog, latest_by
from lingraft.spec.vnnlib import write_counterexample
from lingraft.verify.core import VerifyResult, verify_property


def write_result(path, result: VerifyResult) -> None:
    """VNN-COMP result file: ``sat`` with the counterexample, or the bare status line."""
    if result.status == "sat" and result.counterexample is not None:
        write_counterexample(path, result.counterexample[0], result.counterexample[1], "sat")
    else:
        write_counterexample(path, None, None, result.status if result.status != "sat" else "unknown")


def _base(name: str) -> str:
    """File name without folders and without a trailing .gz (expected.csv names the plain files)."""
    n = Path(name).name
    return n[:-3] if n.endswith(".gz") else n


def load_instances(csv_path) -> list[tuple[str, str, float]]:
    """Rows (onnx, vnnlib, timeout) of an instances.csv (paths as written, relative to its folder)."""
    p = Path(csv_path)
    if not p.is_file():
        raise LingraftError(f"instances file not found: {p}; give the benchmark's instances.csv")
    rows = []
    with open(p, newline="") as f:
        for i, row in enumerate(csv.reader(f), 1):
            if not row or not "".join(row).strip() or row[0].strip().startswith("#"):
                continue
            if len(row) < 3:
                raise LingraftError(f"{p}:{i}: expected 'onnx,vnnlib,timeout' (got {len(row)} fields)")
            try:
                t = float(row[2])
            except ValueError:
                if i == 1:
                    continue  # a header line
                raise LingraftError(f"{p}:{i}: timeout {row[2]!r} is not a number") from None
            rows.append((row[0].strip(), row[1].strip(), t))
    return rows


def load_expected(folder) -> dict[tuple[str, str], str]:
    """{(onnx file name, vnnlib file name without .gz): consensus} from the folder's expected.csv ({} if none)."""
    p = Path(folder) / "expected.csv"
    if not p.is_file():
        return {}
    out = {}
    with open(p, newline="") as f:
        for row in csv.DictReader(f):
            out[(_base(row["onnx"]), _base(row["vnnlib"]))] = row.get("consensus", "").strip()
    return out


def is_wrong(status: str, expected: str | None) -> bool:
    """A definite answer that contradicts the expected verdict."""
    return status in ("sat", "unsat") and expected in ("sat", "unsat") and status != expected


def summarize(records: list[dict]) -> dict:
    """Counts per status plus wrong answers and the median time."""
    s: dict[str, float] = {"instances": len(records)}
    for st, key in (
        ("unsat", "verified"),
        ("sat", "falsified"),
        ("unknown", "unknown"),
        ("timeout", "timeout"),
        ("error", "error"),
    ):
        s[key] = sum(r["status"] == st for r in records)
    s["wrong"] = sum(is_wrong(r["status"], r.get("expected")) for r in records)
    s["median_time_s"] = statistics.median([r["time_s"] for r in records]) if records else 0.0
    return s


def open_results(csv_path, out, resume: bool):
    """-> (folder, rows, expected, results log, {(onnx, vnnlib): finished record}) of a benchmark run: the
    instances, the expected verdicts and the JSONL results file made ready to append (resumed or cleared)."""
    csv_path = Path(csv_path)
    folder = csv_path.parent
    rows = load_instances(csv_path)
    expected = load_expected(folder)
    out = Path(out) if out is not None else Path.cwd() / "vnncomp_results" / f"{folder.name}.jsonl"
    results = ResumableLog(out, what="results file", fix="delete that line (its instance reruns) and rerun")
    done = {}
    if resume:
        # resume() drops a line torn by a killed run before appending (it would glue onto the fragment)
        finished = results.resume()
        for i, r in enumerate(finished, 1):
            if not isinstance(r, dict):
                raise LingraftError(
                    f"results file {out}: record {i} is not a JSON object (a lingraft verify "
                    "record); move the file away or pick another --out"
                )
        done = latest_by(finished, lambda r: (r.get("onnx"), r.get("vnnlib")))
    else:
        results.clear()
    return folder, rows, expected, results, done


def instance_tag(folder: Path, n: int, total: int, onnx: str, vnnlib: str) -> str:
    """The progress prefix of instance ``n`` of ``total``."""
    return f"[{n}/{total}] {folder.name} {Path(onnx).name} {Path(vnnlib).name}"


def expected_verdict(expected: dict, onnx: str, vnnlib: str) -> str | None:
    """The consensus of instance (onnx, vnnlib) in ``expected`` (from :func:`load_expected`; paths may hold folders
    and a .gz suffix), or None when expected.csv does not list it."""
    return expected.get((_base(onnx), _base(vnnlib)))


def instance_record(folder: Path, onnx: str, vnnlib: str, tmo: float, res: VerifyResult, expected: dict) -> dict:
    """The results-file record of one verified instance."""
    exp = expected_verdict(expected, onnx, vnnlib)
    rec = {
        "benchmark": folder.name,
        "onnx": onnx,
        "vnnlib": vnnlib,
        "timeout": tmo,
        "status": res.status,
        "time_s": round(res.time_s, 4),
        "branches": res.stats.get("branches", 0),
        "method": res.stats.get("method", ""),
        "expected": exp,
        "wrong": is_wrong(res.status, exp),
    }
    if "error" in res.stats:
        rec["error"] = res.stats["error"]
    if res.note:
        rec["note"] = res.note  # e.g. a counterexample checked to float32 precision
    return rec


def record_instance(rec: dict, res: VerifyResult, results: ResumableLog, results_dir, echo, tag: str) -> None:
    """Write one finished instance: its VNN-COMP result file (when ``results_dir``), its line in the results file,
    then its progress line."""
    onnx, vnnlib = rec["onnx"], rec["vnnlib"]
    if results_dir is not None:
        write_result(Path(results_dir) / f"{Path(_base(onnx)).stem}_{Path(_base(vnnlib)).stem}.txt", res)
    results.append(rec)
    exp = rec["expected"]
    extra = f", expected {exp}" if exp else ""
    flag = "  WRONG" if rec["wrong"] else ""
    echo(
        f"{tag}: {res.status} ({res.time_s:.2f} s, {rec['branches']} branches, {rec['method']}{extra}){flag}"
        + (f" [{rec['error']}]" if "error" in rec else "")
    )


def echo_summary(folder: Path, records: list[dict], echo) -> None:
    """The closing line of a benchmark run."""
    s = summarize(records)
    echo(
        f"{folder.name}: {s['instances']} instances: {s['verified']} verified, {s['falsified']} falsified, "
        f"{s['unknown']} unknown, {s['timeout']} timeout, {s['error']} error, {s['wrong']} wrong; "
        f"median {s['median_time_s']:.2f} s"
    )


@dataclass(frozen=True)
class Instance:
    """One instance left to verify: its position ``n`` in instances.csv (from 1), its files (relative to the
    benchmark folder) and its timeout in seconds."""

    n: int
    onnx: str
    vnnlib: str
    timeout: float


#: ``runner(folder, instances, finish, verify_kw)`` verifies the instances left (``verify_kw``: keywords for
#: :func:`verify_property`) and calls ``finish(instance, result)`` in this process as each one is done
InstanceRunner = Callable[[Path, Iterable[Instance], Callable[[Instance, VerifyResult], None], dict], None]


def verify_instances(
    csv_path,
    *,
    out=None,
    resume: bool = True,
    results_dir=None,
    timeout: float | None = None,
    verbose: bool = False,
    echo: Callable[[str], None] = print,
    runner: InstanceRunner | None = None,
    **verify_kw,
) -> list[dict]:
    """Verify every instance of a benchmark's instances.csv; returns one record per instance.

    out: JSONL file of records (default ``vnncomp_results/<folder name>.jsonl`` in the working directory);
    resume: skip instances already in ``out``; results_dir: also write a VNN-COMP result file per instance;
    timeout: overrides the per-instance timeouts. Extra keywords go to :func:`verify_property`.
    Record: {benchmark, onnx, vnnlib, timeout, status, time_s, branches, method, expected, wrong}.
    runner: how the instances left run (default: here, one after another;
    :func:`lingraft.distributed.jobs_ray.verify_instances_on_ray` passes one that runs them as Ray tasks).
    """
    folder, rows, expected, results, done = open_results(csv_path, out, resume)
    records: dict[int, dict] = {}

    def left() -> Iterator[Instance]:
        # lazy: a runner that verifies each instance as it gets it reports them all in file order, resumed included
        for n, (onnx, vnnlib, t) in enumerate(rows, 1):
            if (onnx, vnnlib) in done:
                records[n] = done[(onnx, vnnlib)]
                echo(f"{instance_tag(folder, n, len(rows), onnx, vnnlib)}: {records[n]['status']} (resumed)")
                continue
            yield Instance(n, onnx, vnnlib, float(timeout) if timeout is not None else t)

    def finish(inst: Instance, res: VerifyResult) -> None:
        rec = instance_record(folder, inst.onnx, inst.vnnlib, inst.timeout, res, expected)
        tag = instance_tag(folder, inst.n, len(rows), inst.onnx, inst.vnnlib)
        record_instance(rec, res, results, results_dir, echo, tag)
        records[inst.n] = rec

    (runner or _verify_here)(folder, left(), finish, dict(verify_kw, verbose=verbose))
    ordered = [records[n] for n in sorted(records)]
    echo_summary(folder, ordered, echo)
    return ordered


def _verify_here(
    folder: Path, instances: Iterable[Instance], finish: Callable[[Instance, VerifyResult], None], verify_kw: dict
) -> None:
    """The default :data:`InstanceRunner`: every instance in this process, one after another."""
    for inst in instances:
        finish(inst, verify_property(folder / inst.onnx, folder / inst.vnnlib, timeout=inst.timeout, **verify_kw))
