"""Resumable certification: ``lingraft certify --state FILE``.

The samples are certified in chunks (one bound batch each); after every chunk its report is appended to FILE as
one JSON line (single write + fsync, see :class:`lingraft.io.resumable.ResumableLog`). The first line holds the
hash of the settings the results depend on. A rerun with the same settings skips the finished chunks, so an
interrupted run (Ctrl-C or SIGTERM, a killed CI job) loses at most the chunk in flight; a rerun with other settings
is refused instead of mixing results. The merged report equals the one of an uninterrupted run, except for the
wall-clock times.
A run killed in the middle of an append leaves a torn last line; the rerun truncates it away (that batch reruns)
before appending, via :func:`lingraft.io.read_jsonl` with ``repair=True``. A damaged line elsewhere is an error.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from torch import Tensor, nn

from lingraft.bounds import BoundedNetwork
from lingraft.certify.pipeline import CertifyReport, certify, summarize_samples
from lingraft.clock import Stopwatch
from lingraft.errors import LingraftError
from lingraft.io.files import JsonlError
from lingraft.io.resumable import ResumableLog
from lingraft.signals import critical, interrupted

STATE_FORMAT = "lingraft-certify-state"


def certify_resumable(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    *,
    state_path,
    settings_hash: str,
    indices=None,
    batch_size: int = 32,
    seed: int = 0,
    timeout: float | None = None,
    progress=None,
    log=None,
    progress_skip=None,
    **kw,
) -> CertifyReport:
    """:func:`lingraft.certify.certify` over x [N, *in_shape], y [N], chunk by chunk, recording each chunk in
    ``state_path``. ``settings_hash`` identifies everything the results depend on (model, data, eps, method...).
    Chunk k gets seed + its first sample's position, as inside one certify call, so a resumed run attacks with
    the same seeds. ``timeout``: seconds for this invocation. ``kw`` goes to certify. ``progress(n)`` is called per
    certified batch, ``progress_skip(n)`` (default: ``progress``) per batch already in the state file. An interrupt
    raises :class:`lingraft.signals.Interrupted` (finished batches are saved). Returns the merged report."""
    watch = Stopwatch()
    path = Path(state_path)
    state = ResumableLog(
        path, what="certify state file", fix="delete that line (its batch reruns) or remove the file to start over"
    )
    done = _open_state(state, settings_hash, log)
    N = x.shape[0]
    indices = list(range(N)) if indices is None else list(indices)
    if kw.get("net") is None:  # trace the model once, not once per chunk
        kw["net"] = BoundedNetwork(model.eval(), tuple(kw.get("in_shape") or x.shape[1:]), device=kw.get("device"))
    n_batches = (N + batch_size - 1) // batch_size
    if done and log:
        log(f"resuming from {path}: {len(done)} of {n_batches} batches done")
    skip = progress_skip or progress
    parts: list[dict] = []
    saved = len(done)
    try:
        for s in range(0, N, batch_size):
            if s in done:
                parts.append(done[s])
                if skip:
                    skip(min(batch_size, N - s))
                continue
            left = None if timeout is None else max(timeout - watch.elapsed(), 1e-9)
            sub = dict(kw, indices=indices[s : s + batch_size], batch_size=batch_size, seed=seed + s, timeout=left)
            d = certify(model, x[s : s + batch_size], y[s : s + batch_size], eps, progress=progress, **sub).to_dict()
            if any(smp["status"] == "timeout" for smp in d["samples"]):
                parts.append(d)  # ran out of time: report it, but do not record it as finished
                continue
            with critical():  # a SIGINT/SIGTERM waits until the line is complete
                state.append({"start": s, "report": d})
                parts.append(d)
                saved += 1
    except KeyboardInterrupt as e:
        msg = f"interrupted: {saved} of {n_batches} batches saved in {path}; rerun the same command to resume"
        raise interrupted(msg, log) from e
    return merge_reports(parts)


def _open_state(state: ResumableLog, settings_hash: str, log) -> dict[int, dict]:
    """The finished chunks recorded in the state file (``{first sample position: report dict}``), after making it
    safe to append to; a missing or empty file (or one holding only a torn header) is started with the header.
    Refuses (LingraftError) a file of other settings or one that is not a state file."""
    path = state.path
    not_state = LingraftError(f"{path} is not a lingraft certify state file; remove it or pick another --state")
    try:
        # a torn last line (a run killed mid-append) is skipped here and truncated below, once the file is known
        # to be ours: appending after the fragment would make the whole file unreadable
        records = state.read()
    except JsonlError as e:
        if _starts_like_state(path):
            raise LingraftError(str(e)) from None  # ours, damaged in the middle: say where
        raise not_state from None
    except (ValueError, UnicodeDecodeError):
        raise not_state from None
    except OSError as e:
        raise LingraftError(f"cannot read the state file {path} ({e.strerror or e}); check its permissions") from None
    header = {"format": STATE_FORMAT, "settings_hash": settings_hash}
    if records:
        head = records[0]
        if (
            not isinstance(head, dict)
            or head.get("format") != STATE_FORMAT
            or not all(isinstance(r, dict) for r in records)
        ):
            raise not_state
        if head.get("settings_hash") != settings_hash:
            raise LingraftError(
                f"{path} holds results for other settings (hash {head.get('settings_hash')}, now "
                f"{settings_hash}); remove it to start over or pick another --state"
            )
        state.resume(log=log)  # ours: drop a torn last line before appending
    else:
        if path.exists() and path.stat().st_size > 0:
            if not _is_torn_header(path):
                raise not_state  # never overwrite a file that is not ours
            if log:
                log(f"{path} holds only a torn first line (a run killed as it started); starting over")
        state.start(header)
    return {int(r["start"]): r["report"] for r in records[1:] if "start" in r}


def _head_prefix() -> bytes:
    """The bytes every state file starts with (json.dumps of the header up to its settings hash)."""
    return json.dumps({"format": STATE_FORMAT, "settings_hash": ""}).encode()[:-2]


def _is_torn_header(path: Path) -> bool:
    """True when ``path`` holds nothing but a prefix of a state header without its newline: a run killed while
    writing its first line (no batch was recorded, so starting over loses nothing)."""
    data = path.read_bytes()
    if b"\n" in data:
        return False
    pre = _head_prefix()
    n = min(len(data), len(pre))
    return data[:n] == pre[:n] and re.fullmatch(rb'[0-9a-f]*"?', data[len(pre) :]) is not None


def _starts_like_state(path: Path) -> bool:
    """Whether the file's first bytes are those of a state header (so damage further down is reported as such)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(_head_prefix())) == _head_prefix()
    except OSError:
        return False


def merge_reports(parts: list[dict]) -> CertifyReport:
    """One report from the reports (``to_dict()`` form) of consecutive chunks of the same run."""
    if not parts:
        raise LingraftError("nothing to merge: no samples were certified")
    samples = [smp for p in parts for smp in p["samples"]]
    counts, clean, pgd, cert = summarize_samples(samples)

    def bounded(p):
        return sum(1 for smp in p["samples"] if smp["margin_lower"] is not None)

    nb = sum(bounded(p) for p in parts)
    unstable: dict = {}
    for p in parts:
        for k, v in p["unstable_per_layer"].items():
            unstable[k] = unstable.get(k, 0.0) + v * bounded(p)
    neurons = next((p["neurons_per_layer"] for p in parts if p["neurons_per_layer"]), {})
    bab = None
    if any(p.get("bab") for p in parts):
        keys = ("attempted", "verified", "falsified", "undecided", "time_s")
        bab = {k: sum((p.get("bab") or {}).get(k, 0) for p in parts) for k in keys}
        bab["timeout_per_sample_s"] = next(p["bab"]["timeout_per_sample_s"] for p in parts if p.get("bab"))
    first = parts[0]
    return CertifyReport(
        method=first["method"],
        eps=first["eps"],
        norm=first["norm"],
        num_samples=len(samples),
        clean_acc=clean,
        pgd_acc=pgd,
        certified_acc=cert,
        counts=counts,
        unstable_per_layer={k: v / max(nb, 1) for k, v in unstable.items()},
        neurons_per_layer=neurons,
        time_per_sample_s=sum(p["time_per_sample_s"] * bounded(p) for p in parts) / max(nb, 1),
        total_time_s=sum(p["total_time_s"] for p in parts),
        samples=samples,
        bab=bab,
    )
