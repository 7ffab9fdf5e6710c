"""``lingraft certify --ray``: the samples are certified in batches, one Ray task per batch.

The batches, their seeds (``seed`` + the batch's first position) and the state file are those of
:func:`lingraft.certify.state.certify_resumable`, so the statuses and bounds equal the local run's and a state file
written by one resumes in the other. The model travels to the workers once, through the object store, as a state
dict plus a weightless skeleton of the module (:class:`ModelPayload`): no shared file system is needed. Each task
certifies its batch with :func:`lingraft.certify.pipeline.certify` and returns the batch report as a dict; only the
driver writes (one state line per finished batch, in the order batches finish). A task whose worker died is
retried by Ray; a batch that still fails is named in one LingraftError raised after every other batch was saved,
so a rerun of the same command redoes that batch only.
"""

from __future__ import annotations

import copy
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from lingraft.certify.pipeline import CertifyReport, CertifySettings
from lingraft.certify.state import _open_state, merge_reports
from lingraft.distributed.ray_backend import UnitOutcome, run_units
from lingraft.errors import LingraftError
from lingraft.io.resumable import ResumableLog
from lingraft.signals import critical, interrupted

#: driver-side callables that cannot run on a worker, and the driver's traced network (each worker traces its own)
_DRIVER_ONLY = ("bab_progress", "net", "device")


@dataclass
class ModelPayload:
    """A module as it travels to the workers: ``skeleton`` (the module with its parameters and buffers on the
    meta device, so without data) plus ``state`` (its state dict on the CPU); or, for a module with non-persistent
    buffers (which a state dict leaves out), the whole module in ``module``. ``key`` lets a worker reuse the
    module (and its traced network) it rebuilt for an earlier batch of the same run."""

    key: str
    skeleton: nn.Module | None = None
    state: dict | None = None
    module: nn.Module | None = None

    @classmethod
    def of(cls, model: nn.Module) -> ModelPayload:
        key = uuid.uuid4().hex
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        if set(dict(model.named_buffers())) - set(state):  # non-persistent buffers: ship the module itself
            return cls(key, module=copy.deepcopy(model).cpu().eval())
        return cls(key, skeleton=copy.deepcopy(model).to("meta"), state=state)

    def build(self, device: str = "cpu") -> nn.Module:
        """The module, on ``device``, in eval mode."""
        if self.module is not None:
            return self.module.to(device).eval()
        assert self.skeleton is not None and self.state is not None
        m = copy.deepcopy(self.skeleton).to_empty(device=device)
        m.load_state_dict(self.state, strict=True)
        return m.eval()


_WORKER_CACHE: dict[str, tuple] = {}  # in a worker process: payload key -> (module, BoundedNetwork)


def _certify_batch(payload: ModelPayload, x: Tensor, y: Tensor, eps: float, kw: dict, deadline, device: str):
    """Runs in a Ray worker: certify one batch, return its report as a dict."""
    from lingraft.bounds import BoundedNetwork
    from lingraft.certify.pipeline import certify

    if payload.key not in _WORKER_CACHE:
        _WORKER_CACHE.clear()  # one run's model at a time
        model = payload.build(device)
        net = BoundedNetwork(model, tuple(kw.get("in_shape") or x.shape[1:]), device=device)
        _WORKER_CACHE[payload.key] = (model, net)
    model, net = _WORKER_CACHE[payload.key]
    left = None if deadline is None else max(deadline - time.time(), 1e-9)
    return certify(model, x, y, eps, net=net, device=device, timeout=left, **kw).to_dict()


def certify_on_ray(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    settings: CertifySettings | None = None,
    *,
    state_path=None,
    settings_hash: str | None = None,
    indices=None,
    batch_size: int | None = None,
    seed: int | None = None,
    timeout: float | None = None,
    worker_cpus: int = 1,
    worker_gpus: float = 0,
    max_retries: int = 2,
    progress: Callable[[int], Any] | None = None,
    progress_skip: Callable[[int], Any] | None = None,
    log: Callable[[str], Any] | None = None,
    **kw,
) -> CertifyReport:
    """:func:`lingraft.certify.state.certify_resumable` with one Ray task per batch (Ray must be initialised, see
    :func:`lingraft.distributed.ray_backend.ray_session`). ``settings`` and ``kw`` as for certify (kw wins);
    ``in_shape`` goes to the workers, ``device``/``net``/``bab_progress`` stay in the driver (a worker uses
    CUDA when ``worker_gpus`` > 0, else the CPU). ``state_path`` (with ``settings_hash``): the state file of
    ``certify --state``, written by this driver only; finished batches are skipped. ``timeout``: seconds for this
    invocation (a batch still running then reports its samples as timeout and is not saved). ``progress(n)`` is
    called per finished batch, ``progress_skip(n)`` (default ``progress``) per batch already in the state file.
    A batch whose task failed after ``max_retries`` raises LingraftError (naming it) once every other batch is
    saved; an interrupt raises :class:`lingraft.signals.Interrupted`. Returns the merged report."""
    opts = {**(vars(settings) if settings is not None else {}), **kw}
    batch_size = int(batch_size if batch_size is not None else opts.get("batch_size", 32))
    seed = int(seed if seed is not None else opts.get("seed", 0))
    timeout = timeout if timeout is not None else opts.get("timeout")
    for k in ("batch_size", "seed", "timeout", *_DRIVER_ONLY):
        opts.pop(k, None)
    N = x.shape[0]
    indices = list(range(N)) if indices is None else list(indices)
    state, done = _open(state_path, settings_hash, log)
    starts = list(range(0, N, batch_size))
    if done and log:
        log(f"resuming from {state_path}: {len(done)} of {len(starts)} batches done")
    skip = progress_skip or progress
    for s in starts:
        if s in done and skip:
            skip(min(batch_size, N - s))
    # wall-clock time, not lingraft.clock: workers on other machines compare it with their own clocks
    deadline = None if timeout is None else time.time() + float(timeout)
    device = "cuda" if worker_gpus else "cpu"
    batch = _unit_kw(opts, indices, batch_size, seed)
    units = [
        (s, (x[s : s + batch_size].clone(), y[s : s + batch_size].clone(), float(eps), batch(s), deadline, device))
        for s in starts
        if s not in done
    ]
    col = _Collector(state, dict(done), progress)
    try:
        run_units(
            _certify_batch,
            units,
            shared=(ModelPayload.of(model),),
            worker_cpus=worker_cpus,
            worker_gpus=worker_gpus,
            max_retries=max_retries,
            on_done=col,
        )
    except KeyboardInterrupt as e:
        if state is None:
            raise
        msg = (
            f"interrupted: {col.saved} of {len(starts)} batches saved in {state_path}; rerun the same command to resume"
        )
        raise interrupted(msg, log) from e
    if col.failed:
        raise LingraftError(_failure_line(col.failed, batch_size, N, len(starts), state_path))
    return merge_reports([col.parts[s] for s in starts])


class _Collector:
    """The driver's ``on_done``: keeps each batch report, appends finished batches to the state file (the only
    writer), counts progress; remembers the batches whose task failed."""

    def __init__(self, state: ResumableLog | None, done: dict[int, dict], progress) -> None:
        self.state, self.parts, self.progress = state, done, progress
        self.saved = len(done)
        self.failed: dict[int, str] = {}

    def __call__(self, out: UnitOutcome) -> None:
        s = out.key
        if out.error is not None:
            self.failed[s] = out.error
            return
        d = out.result
        self.parts[s] = d
        if self.state is not None and not any(smp["status"] == "timeout" for smp in d["samples"]):
            with critical():  # a SIGINT/SIGTERM waits until the line is complete
                self.state.append({"start": s, "report": d})
                self.saved += 1
        if self.progress:
            self.progress(len(d["samples"]))


def _open(state_path, settings_hash: str | None, log) -> tuple[ResumableLog | None, dict[int, dict]]:
    """The state file (None without ``state_path``) and its finished batches, as in certify_resumable."""
    if state_path is None:
        return None, {}
    if settings_hash is None:
        raise LingraftError("certify_on_ray: a state_path needs the settings_hash of the run")
    fix = "delete that line (its batch reruns) or remove the file to start over"
    state = ResumableLog(Path(state_path), what="certify state file", fix=fix)
    return state, _open_state(state, settings_hash, log)


def _unit_kw(opts: dict, indices: list, batch_size: int, seed: int) -> Callable[[int], dict]:
    """The certify keyword arguments of the batch starting at position s (as in certify_resumable)."""
    return lambda s: dict(opts, indices=indices[s : s + batch_size], batch_size=batch_size, seed=seed + s)


def _failure_line(failed: dict[int, str], batch_size: int, N: int, n_batches: int, state_path) -> str:
    s = min(failed)
    what = f"batch of samples {s}..{min(s + batch_size, N) - 1}"
    more = f" (and {len(failed) - 1} more batches)" if len(failed) > 1 else ""
    saved = n_batches - len(failed)
    tail = (
        f"the other {saved} batches are saved in {state_path}; rerun the same command to redo only the failed ones"
        if state_path is not None
        else "rerun with --state FILE to keep the finished batches"
    )
    return f"the Ray task for the {what}{more} failed: {failed[s]}; {tail}"
