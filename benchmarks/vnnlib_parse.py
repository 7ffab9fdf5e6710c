#!/usr/bin/env python
"""VNN-LIB parsing speed: lingraft's parser on generated properties of growing size (and on given files).

Prints one table: per property, its size (inputs, output disjuncts, characters) and the best and median wall
time of ``parse_vnnlib`` over --repeats runs. A generated property is one input box (two bounds per input)
with an output disjunction ``Y_j >= Y_3`` over the other outputs, the shape of a VNN-COMP image property.

    python benchmarks/vnnlib_parse.py                                   # 784, 3072 and 12288 inputs
    python benchmarks/vnnlib_parse.py --inputs 3072 --repeats 20
    python benchmarks/vnnlib_parse.py --file ../shared/vnncomp/mnist_fc/vnnlib/prop_0_0.03.vnnlib.gz
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from _table import markdown_table  # benchmarks/_table.py (the script's folder is on sys.path)


def generated_property(n_inputs: int, n_outputs: int = 10, target: int = 3) -> str:
    """VNN-LIB text: X_i in [-i * 1e-4, 0.5 + i * 1e-4]; unsafe iff some Y_j (j != target) >= Y_target."""
    lines = [f"(declare-const X_{i} Real)" for i in range(n_inputs)]
    lines += [f"(declare-const Y_{j} Real)" for j in range(n_outputs)]
    lines += [f"(assert (<= X_{i} {0.5 + i * 1e-4}))\n(assert (>= X_{i} {-i * 1e-4}))" for i in range(n_inputs)]
    lines.append(
        "(assert (or " + " ".join(f"(and (>= Y_{j} Y_{target}))" for j in range(n_outputs) if j != target) + "))"
    )
    return "\n".join(lines)


def time_parse(source, repeats: int) -> tuple[list[float], object]:
    """Seconds of each of ``repeats`` parses of source (text or path), and the last parse result."""
    from lingraft.spec.vnnlib import parse_vnnlib

    times, prop = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        prop = parse_vnnlib(source)
        times.append(time.perf_counter() - t0)
    return times, prop


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inputs", type=int, action="append", help="generated property sizes (default 784 3072 12288)")
    ap.add_argument("--file", action="append", default=[], help="also time these VNN-LIB files (plain or .gz)")
    ap.add_argument("--repeats", type=int, default=10, help="parses per property (default 10)")
    args = ap.parse_args()
    cases = [(f"generated {n}", generated_property(n)) for n in (args.inputs or [784, 3072, 12288])]
    cases += [(Path(f).name, f) for f in args.file]
    rows = []
    for name, source in cases:
        times, prop = time_parse(source, max(1, args.repeats))
        chars = len(source) if name.startswith("generated") else Path(source).stat().st_size
        disjuncts = sum(len(r.outputs) for r in prop.regions)
        rows.append([name, prop.num_inputs, disjuncts, chars, 1000 * min(times), 1000 * statistics.median(times)])
    print(
        markdown_table(
            ["property", "inputs", "output disjuncts", "chars (bytes for files)", "best ms", "median ms"], rows
        )
    )


if __name__ == "__main__":
    main()
