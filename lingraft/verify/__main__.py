"""Command line: ``python -m lingraft.verify {run,prepare,instances} ...`` (used by vnncomp/*.sh).

run NET VNNLIB [--timeout T] [--result FILE] [--started-at EPOCH]: verify one instance, write the VNN-COMP
    result file, print one JSON line {status, time_s, branches, method}. ``--started-at`` (seconds since the
    epoch when the caller started) makes the timeout count from then, start-up included.
prepare NET VNNLIB: load and check the network and the property (nothing is cached between calls).
instances CSV [--out JSONL] [--results-dir DIR] [--no-resume]: run a benchmark folder.
run/instances take --threads N (default 1 or $LINGRAFT_THREADS): torch intra-op threads.
Exit status: 0 when an answer was produced (any verdict), 1 for an error, 2 for bad usage.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

from lingraft.errors import EXIT_ERROR, EXIT_OK, LingraftError

# a safety margin for writing the result and exiting after the search stops
EXIT_MARGIN_S = 1.0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lingraft.verify", description="complete verification of VNN-LIB "
                                "properties (attack + CROWN/alpha-CROWN + branch and bound)")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="verify one instance")
    r.add_argument("onnx")
    r.add_argument("vnnlib")
    r.add_argument("--timeout", type=float, default=60.0, help="wall-clock seconds (default 60)")
    r.add_argument("--result", help="VNN-COMP result file to write")
    r.add_argument("--started-at", type=float, default=None, help="epoch seconds the timeout counts from")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--split", choices=("auto", "input", "relu"), default="auto")
    r.add_argument("--device", default=None)
    r.add_argument("--threads", type=int, default=int(os.environ.get("LINGRAFT_THREADS", "1")),
                   help="torch intra-op threads (default 1, or $LINGRAFT_THREADS): the many small tensor ops of "
                        "branch and bound run fastest single-threaded")
    r.add_argument("-v", "--verbose", action="store_true")
    q = sub.add_parser("prepare", help="check that the network and property load")
    q.add_argument("onnx")
    q.add_argument("vnnlib")
    b = sub.add_parser("instances", help="run every instance of a benchmark's instances.csv")
    b.add_argument("csv")
    b.add_argument("--out", default=None, help="JSONL records (default vnncomp_results/<folder>.jsonl)")
    b.add_argument("--results-dir", default=None, help="also write one VNN-COMP result file per instance")
    b.add_argument("--timeout", type=float, default=None, help="override the per-instance timeouts")
    b.add_argument("--no-resume", action="store_true", help="start over instead of skipping finished instances")
    b.add_argument("--threads", type=int, default=int(os.environ.get("LINGRAFT_THREADS", "1")))
    b.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "run":
            import torch

            from lingraft.verify.core import VerifyResult, verify_property
            from lingraft.verify.runner import write_result

            if args.threads > 0:
                torch.set_num_threads(args.threads)

            budget = args.timeout
            if args.started_at is not None:
                budget -= max(0.0, time.time() - args.started_at)
            budget = max(0.0, budget - EXIT_MARGIN_S)
            if budget <= 0:
                res = VerifyResult("timeout", None, 0.0, {"branches": 0, "method": "none"})
            else:
                res = verify_property(args.onnx, args.vnnlib, timeout=budget, seed=args.seed, split=args.split,
                                      device=args.device, verbose=args.verbose)
            if args.result:
                write_result(args.result, res)
            line = {"status": res.status, "time_s": round(res.time_s, 3), "branches": res.stats.get("branches", 0),
                    "method": res.stats.get("method", "")}
            if res.note:
                line["note"] = res.note
            if "error" in res.stats:
                line["error"] = res.stats["error"]
                print(f"error: {res.stats['error']}", file=sys.stderr)
            print(json.dumps(line))
            return EXIT_ERROR if res.status == "error" else EXIT_OK
        if args.cmd == "prepare":
            import shutil

            from lingraft.spec.vnnlib import parse_vnnlib
            from lingraft.verify.core import load_model

            tmp: list = []
            try:
                model, shape, n_out, _ = load_model(args.onnx, None, tmp)
                parse_vnnlib(args.vnnlib, num_inputs=int(math.prod(shape)), num_outputs=n_out)
            finally:
                for d in tmp:
                    shutil.rmtree(d, ignore_errors=True)
            print(f"ok: {args.onnx} input {tuple(shape)} -> {n_out} outputs; {args.vnnlib} parsed")
            return EXIT_OK
        import torch

        from lingraft.verify.runner import verify_instances

        if args.threads > 0:
            torch.set_num_threads(args.threads)

        recs = verify_instances(args.csv, out=args.out, resume=not args.no_resume, results_dir=args.results_dir,
                                timeout=args.timeout, verbose=args.verbose)
        return EXIT_ERROR if any(r["status"] == "error" for r in recs) else EXIT_OK
    except LingraftError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
