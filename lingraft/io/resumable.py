"""Resumable runs: an append-only JSON-lines log holding one line per finished unit of work.

A resuming run reads the finished records (:meth:`ResumableLog.resume`, which first cuts away a last line torn by a
kill, so that the next append cannot glue onto the fragment), skips the units they name (:func:`latest_by`), runs
the rest and appends each result with one write + fsync (:meth:`ResumableLog.append`). An interrupted run thus
loses at most the unit in flight. Sweeps (``lingraft run``), ``lingraft compare``, ``certify --state`` and
``verify --instances --out`` all resume this way; each keeps its own record format.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Iterable
from pathlib import Path
from typing import Any

from lingraft.io.files import append_jsonl, ensure_parent, read_jsonl


class ResumableLog:
    """The JSON-lines file ``path`` of finished records.

    ``what`` names the kind of file and ``fix`` the remedy in the error raised for a damaged line (see
    :func:`lingraft.io.files.read_jsonl`).
    """

    def __init__(self, path: str | os.PathLike, *, what: str = "file", fix: str = "delete that line and rerun"):
        self.path = Path(path)
        self.what = what
        self.fix = fix

    def read(self) -> list:
        """Every record in file order ([] when the file does not exist); a torn last line is skipped and the file
        is left unchanged (use this to inspect a file before knowing that it is ours)."""
        return read_jsonl(self.path, what=self.what, fix=self.fix)

    def resume(self, log: Callable[[str], Any] | None = None) -> list:
        """Every record in file order, after making the file safe to append to: its folder is created, a torn last
        line is truncated away (``log`` is told) and a complete last line without its newline gets one."""
        ensure_parent(self.path)
        return read_jsonl(self.path, repair=True, what=self.what, fix=self.fix, log=log)

    def start(self, header: Any) -> None:
        """Begin the file anew with ``header`` as its first line (its folder is created, old contents dropped)."""
        ensure_parent(self.path)
        if self.path.exists():
            os.truncate(self.path, 0)  # in place: keeps the inode (and any lock held on it)
        self.append(header)

    def clear(self) -> None:
        """Start over: remove the file (creating its folder, so that appending works)."""
        ensure_parent(self.path)
        if self.path.exists():
            self.path.unlink()

    def append(self, record: Any) -> None:
        """Append ``record`` as one JSON line (single write + fsync: a kill leaves at most a torn last line)."""
        append_jsonl(self.path, record)


def latest_by(records: Iterable[Any], key: Callable[[Any], Hashable | None]) -> dict:
    """``{key(record): record}`` keeping the last record per key (a rerun unit supersedes its earlier line),
    in first-seen order; records whose key is None are left out."""
    out: dict = {}
    for rec in records:
        k = key(rec)
        if k is not None:
            out[k] = rec
    return out
