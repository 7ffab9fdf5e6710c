"""The summary of a sweep's results (``lingraft run``): one row per job, as a text table's cells or as CSV.

A row is a plain dict with the keys :data:`SUMMARY_KEYS` (numbers stay numbers, missing ones None); it is what
``lingraft run --json`` reports and ``--csv`` writes. :func:`summary_columns` turns rows into the header and
the formatted cells of the terminal table.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from pathlib import Path

from lingraft.experiments.sweep import latest_records

SUMMARY_KEYS = [
    "model",
    "method",
    "ratio",
    "eps",
    "status",
    "clean_acc",
    "pgd_acc",
    "certified_acc",
    "grafted_neurons",
    "relu_neurons",
    "time_per_sample_s",
    "elapsed_s",
    "error",
]
SUMMARY_HEADER = ["model", "method", "ratio", "eps", "status", "clean", "PGD", "certified", "grafted", "ms/img", "s"]


def summary_rows(records: Iterable[dict]) -> list[dict]:
    """One row per job (the latest record per ``job_id``, in first-seen order), keys :data:`SUMMARY_KEYS`."""
    rows = []
    for rec in latest_records(records).values():
        job = rec.get("job") or {}
        res = rec.get("result") or {}
        g = res.get("graft") or {}
        rows.append(
            {
                "model": job.get("model"),
                "method": job.get("method"),
                "ratio": job.get("ratio"),
                "eps": job.get("eps"),
                "status": rec.get("status"),
                "clean_acc": res.get("clean_acc"),
                "pgd_acc": res.get("pgd_acc"),
                "certified_acc": res.get("certified_acc"),
                "grafted_neurons": g.get("grafted_neurons"),
                "relu_neurons": g.get("relu_neurons"),
                "time_per_sample_s": res.get("time_per_sample_s"),
                "elapsed_s": rec.get("elapsed_s"),
                "error": rec.get("error"),
            }
        )
    return rows


def model_label(model: str) -> str:
    """How tables name a model: its file name (checkpoint folders differ between machines)."""
    return Path(model).name


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def summary_cells(row: dict) -> list:
    """The terminal-table cells of one :func:`summary_rows` row (columns :data:`SUMMARY_HEADER`)."""
    grafted = "-" if row["grafted_neurons"] is None else f"{row['grafted_neurons']}/{row['relu_neurons']}"
    ms = row["time_per_sample_s"]
    return [
        model_label(str(row["model"])),
        row["method"],
        row["ratio"],
        row["eps"],
        row["status"],
        _pct(row["clean_acc"]),
        _pct(row["pgd_acc"]),
        _pct(row["certified_acc"]),
        grafted,
        "-" if ms is None else f"{1000 * ms:.2f}",
        f"{row['elapsed_s'] or 0.0:.1f}",
    ]


def summary_columns(rows: list[dict]) -> tuple[list[str], list[list]]:
    """Header and cells of the terminal summary table of :func:`summary_rows` rows."""
    return SUMMARY_HEADER, [summary_cells(r) for r in rows]


def summary_csv(rows: list[dict]) -> str:
    """The rows as CSV text (columns :data:`SUMMARY_KEYS`, unformatted numbers)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=SUMMARY_KEYS)
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()
