"""Run lingraft's complete verifier on the VNN-COMP subset in ../shared/vnncomp and compare with the consensus.

    python benchmarks/vnncomp.py [--benchmarks test mnist_fc verivital] [--out-dir vnncomp_results] [--resume]
                                 [--timeout S] [--limit N]

Per benchmark it prints verified / falsified / unknown / timeout / error / wrong (answers contradicting
expected.csv) and the median wall time, next to alpha-beta-CROWN's competition numbers from expected.csv
(raw times include about 6.7 s of its start-up). test/ has no expected.csv: its verdicts are the ones the
benchmark README states (test_sat: sat, everything else: unsat). Exit status 1 if any answer is wrong.
``--timeout S`` caps each instance's timeout at S seconds (the CSV's own timeout where it is smaller) and
``--limit N`` runs only the first N instances of each benchmark: a quick assessment of the big folders
(mnist_fc_deep, sri_resnet_a, cifar_biasfield); ``--known-only`` skips the instances without a consensus verdict
(40 of sri_resnet_a's 72). Other benchmark folders of ../shared/vnncomp work too.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from lingraft.verify.core import verify_property  # noqa: E402
from lingraft.verify.runner import (  # noqa: E402
    expected_verdict,
    is_wrong,
    load_expected,
    summarize,
    verify_instances,
)

SHARED = REPO.parent / "shared" / "vnncomp"
TEST_EXPECTED = {
    "test_nano.onnx": "unsat",
    "test_tiny.onnx": "unsat",
    "test_small.onnx": "unsat",
    "test_sat.onnx": "sat",
    "test_unsat.onnx": "unsat",
}


def abcrown_median(folder: Path) -> float | None:
    p = folder / "expected.csv"
    if not p.is_file():
        return None
    with open(p, newline="") as f:
        times = [float(r["abcrown_runtime_s_raw"]) for r in csv.DictReader(f) if r.get("abcrown_runtime_s_raw")]
    return statistics.median(times) if times else None


def capped_runner(timeout: float | None, limit: int | None, known_only: bool = False):
    """An InstanceRunner for verify_instances: runs here, one after another, only the first ``limit`` instances
    of the CSV (all when None), each with its timeout capped at ``timeout`` seconds (as given when None);
    known_only: only the instances with a consensus verdict (sat / unsat) in expected.csv."""

    def run(folder, instances, finish, verify_kw):
        expected = load_expected(folder) if known_only else {}
        for inst in instances:
            if limit is not None and inst.n > limit:
                continue
            if known_only and expected_verdict(expected, inst.onnx, inst.vnnlib) not in ("sat", "unsat"):
                continue
            if timeout is not None and inst.timeout > timeout:
                inst = dataclasses.replace(inst, timeout=float(timeout))
            finish(inst, verify_property(folder / inst.onnx, folder / inst.vnnlib, timeout=inst.timeout, **verify_kw))

    return run


def positive(kind):
    def parse(s: str):
        v = kind(s)
        if not v > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {s}")
        return v

    return parse


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=str(SHARED), help="folder holding the benchmark folders")
    ap.add_argument("--benchmarks", nargs="+", default=["test", "mnist_fc", "verivital"])
    ap.add_argument("--out-dir", default="vnncomp_results", help="JSONL records per benchmark go here")
    ap.add_argument("--resume", action="store_true", help="keep finished instances from an earlier run")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--timeout", type=positive(float), help="cap each instance's timeout at this many seconds")
    ap.add_argument("--limit", type=positive(int), help="run only the first N instances of each benchmark")
    ap.add_argument(
        "--known-only", action="store_true", help="run only the instances expected.csv gives a verdict (sat/unsat)"
    )
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = Path(args.root)
    if not root.is_dir():
        print(f"skipped: {root} is absent")
        return 0
    table = []
    wrong_total = 0
    for bench in args.benchmarks:
        folder = root / bench
        if not (folder / "instances.csv").is_file():
            print(f"skipped {bench}: {folder / 'instances.csv'} is absent")
            continue
        recs = verify_instances(
            folder / "instances.csv",
            out=Path(args.out_dir) / f"{bench}.jsonl",
            resume=args.resume,
            verbose=args.verbose,
            runner=capped_runner(args.timeout, args.limit, args.known_only),
        )
        if bench == "test":
            for r in recs:
                r["expected"] = TEST_EXPECTED.get(Path(r["onnx"]).name)
                r["wrong"] = is_wrong(r["status"], r["expected"])
        s = summarize(recs)
        missed = sum(r["status"] != r["expected"] for r in recs if r.get("expected"))
        wrong_total += s["wrong"]
        table.append((bench, s, missed, abcrown_median(folder)))
    print()
    print(
        f"{'benchmark':<15} {'n':>3} {'verified':>8} {'falsified':>9} {'unknown':>7} {'timeout':>7} {'error':>5} "
        f"{'wrong':>5} {'missed':>6} {'median s':>8} {'abcrown median s (raw)':>23}"
    )
    for bench, s, missed, ab in table:
        print(
            f"{bench:<15} {s['instances']:>3} {s['verified']:>8} {s['falsified']:>9} {s['unknown']:>7} "
            f"{s['timeout']:>7} {s['error']:>5} {s['wrong']:>5} {missed:>6} {s['median_time_s']:>8.2f} "
            f"{'' if ab is None else f'{ab:.2f}':>23}"
        )
    return 1 if wrong_total else 0


if __name__ == "__main__":
    sys.exit(main())
