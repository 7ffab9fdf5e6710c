"""VNN-COMP result / counterexample files: writing them (atomically) and reading their X and Y values."""

from __future__ import annotations

import os

import numpy as np

from lingraft.errors import LingraftError
from lingraft.io.files import atomic_write_text
from lingraft.spec import sexpr

_VERDICTS_WITH_CEX = {"sat", "violated"}


def write_counterexample(
    path: str | os.PathLike, x: np.ndarray | None, y: np.ndarray | None, verdict: str = "sat"
) -> None:
    """Write a VNN-COMP result file atomically.

    For ``sat`` (or the 2021 spelling ``violated``) the file is::

        sat
        ((X_0 0.5)
        (X_1 0.25)
        (Y_0 -1.0))

    x: [num_inputs] (flattened row-major), y: [num_outputs]. Values are written with ``repr`` so
    they round-trip exactly. Other verdicts (``unsat``, ``timeout``, ``unknown``, ``error``) write only
    the verdict line and ignore x, y.
    """
    verdict = verdict.strip()
    if not verdict or any(c.isspace() for c in verdict):
        raise LingraftError(f"invalid verdict {verdict!r} (use sat, unsat, timeout, unknown or error)")
    if verdict not in _VERDICTS_WITH_CEX:
        atomic_write_text(path, verdict + "\n")
        return
    if x is None or y is None:
        raise LingraftError("a 'sat' result needs the counterexample x and y (pass both arrays)")
    xs = np.asarray(x, dtype=np.float64).reshape(-1)
    ys = np.asarray(y, dtype=np.float64).reshape(-1)
    if not (np.all(np.isfinite(xs)) and np.all(np.isfinite(ys))):
        raise LingraftError("counterexample contains NaN or infinite values (only finite witnesses can be written)")
    lines = [f"(X_{i} {float(v)!r})" for i, v in enumerate(xs)]
    lines += [f"(Y_{j} {float(v)!r})" for j, v in enumerate(ys)]
    atomic_write_text(path, f"{verdict}\n(" + "\n".join(lines) + ")\n")


def read_counterexample(path: sexpr.PathOrText) -> tuple[np.ndarray, np.ndarray]:
    """Read the X and Y values of a counterexample / result file (plain or gzipped).

    Accepts the competition result format (``sat`` line, then ``((X_0 v) ... (Y_0 v))``) and the bare
    witness files without a verdict line (``(`` / ``(X_i v)`` lines / ``)``).
    Returns x: [num_inputs] float64 and y: [num_outputs] float64.
    """
    src, _ = sexpr.load_source(path)
    forms = sexpr.read_sexprs(src)
    if forms and isinstance(forms[0], sexpr.Sym):
        verdict = forms[0].text
        if verdict not in _VERDICTS_WITH_CEX:
            raise src.error(
                forms[0].pos, f"result is '{verdict}', not a counterexample (only sat results carry X/Y values)"
            )
        forms = forms[1:]
    # Either one outer list of pairs, or the pairs directly at top level.
    first = forms[0] if len(forms) == 1 else None
    if isinstance(first, sexpr.SexprList) and all(isinstance(f, sexpr.SexprList) for f in first) and first:
        pairs = list(first)
    else:
        pairs = forms
    if not pairs:
        raise src.error(sexpr.START, "no (X_i value) / (Y_j value) entries found (the file holds no counterexample)")
    values: dict[str, dict[int, float]] = {"X": {}, "Y": {}}
    pos_of: dict[tuple[str, int], int] = {}
    for pair in pairs:
        if not isinstance(pair, sexpr.SexprList) or len(pair) != 2 or not isinstance(pair[0], sexpr.Sym):
            raise src.error(pair.pos, "expected an entry like '(X_0 0.5)'")
        m = sexpr.VAR_RE.match(pair[0].text)
        if not m:
            raise src.error(pair[0].pos, f"unexpected name '{pair[0].text}' (entries are X_i or Y_j)")
        v = _cex_value(pair[1], src)
        kind, idx = m.group(1), int(m.group(2))
        if idx in values[kind]:
            raise src.error(pair.pos, f"{kind}_{idx} given twice (remove the duplicate)")
        values[kind][idx] = v
        pos_of[(kind, idx)] = pair.pos
    out = []
    for kind in ("X", "Y"):
        d = values[kind]
        n = len(d)
        if n == 0:
            raise src.error(sexpr.START, f"no {kind}_i values in the counterexample (it must list both X and Y)")
        if max(d) != n - 1:
            missing = next(i for i in range(n) if i not in d)
            raise src.error(pos_of[(kind, max(d))], f"{kind}_{missing} is missing (list {kind}_0..{kind}_{max(d)})")
        out.append(np.array([d[i] for i in range(n)], dtype=np.float64))
    return out[0], out[1]


def _cex_value(node: sexpr.Node, src: sexpr.Source) -> float:
    """A number, or ``(- number)`` as some tools write negative values."""
    if isinstance(node, sexpr.Sym):
        v = sexpr.parse_number(node.text)
        if v is not None:
            return v
    elif len(node) == 2 and isinstance(node[0], sexpr.Sym) and node[0].text == "-" and isinstance(node[1], sexpr.Sym):
        v = sexpr.parse_number(node[1].text)
        if v is not None:
            return -v
    raise src.error(node.pos, "expected a number value (e.g. '(X_0 0.5)')")
