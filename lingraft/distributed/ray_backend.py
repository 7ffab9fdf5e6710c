"""The Ray engine under ``--ray``: connect to (or start) a cluster and run independent work units as Ray tasks.

The driver keeps every guarantee of a local run: units are submitted as tasks, each task's result comes back to
the driver, and only the driver writes result files (in the order units finish, through the same resumable logs
as the local code). A task whose worker dies is retried by Ray (``max_retries``); after that the unit is
reported to the driver as an error with its reason, never dropped.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from lingraft.errors import LingraftError, UsageError
from lingraft.signals import keep_handlers

INSTALL_HINT = "pip install 'lingraft[ray]'"


def require_ray():
    """The ray module, or a one-line LingraftError naming the extra to install."""
    try:
        import ray
    except ImportError:
        raise LingraftError(f"--ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


@contextlib.contextmanager
def ray_session(address: str | None, *, num_cpus: int | None = None) -> Iterator[Any]:
    """Connect for the duration of the block: ``address`` None or "" starts a local cluster (``num_cpus`` CPUs,
    default all), "auto" joins the running one, anything else is a cluster address ("ray://host:10001" or
    "host:6379"). Shuts Ray down afterwards only when this block started it."""
    ray = require_ray()
    if ray.is_initialized():  # a session is already up: join it, and leave it up
        yield ray
        return
    # ray.init installs its own SIGTERM handler: keep lingraft's (save state, one line, exit 130) in force
    with keep_handlers() as restore_handlers:
        kw: dict = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
        try:
            if address:
                ray.init(address=address, **kw)
            else:
                ray.init(num_cpus=num_cpus, **kw)
        except ConnectionError as e:
            raise UsageError(
                f"cannot reach the Ray cluster at {address!r} ({e}); start one with "
                "'ray start --head' or leave the address out to start a local one"
            ) from None
        restore_handlers()
        try:
            yield ray
        finally:
            ray.shutdown()


@dataclass
class UnitOutcome:
    """What the driver learns of one unit: its key, the task's return value, or the error that ended it."""

    key: Any
    result: Any = None
    error: str | None = None


def _set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(max(1, int(n)))


def run_units(
    fn: Callable,
    units: Sequence[tuple[Any, tuple]],
    *,
    shared: Sequence[Any] = (),
    worker_cpus: int = 1,
    worker_gpus: float = 0,
    max_retries: int = 2,
    on_done: Callable[[UnitOutcome], None],
) -> None:
    """Run ``fn(*shared, *args)`` for every ``(key, args)`` in ``units`` as Ray tasks; call ``on_done`` in the
    driver as each unit finishes (in completion order). ``shared`` values go to the object store once
    (``ray.put``) and reach every task by reference (the model travels this way, not as a path). Each task
    gets ``worker_cpus`` CPUs (torch uses as many threads) and ``worker_gpus`` GPUs. A worker that dies is
    retried ``max_retries`` times by Ray; an exception inside ``fn`` is not retried (it would fail again) and
    comes back as ``UnitOutcome.error``."""
    ray = require_ray()
    refs = [ray.put(v) for v in shared]

    def lingraft_unit(threads, *args):  # the name shows in the worker's process title: ray::lingraft_unit
        _set_threads(threads)
        return fn(*args)

    remote = ray.remote(lingraft_unit).options(
        num_cpus=worker_cpus, num_gpus=worker_gpus, max_retries=max_retries, retry_exceptions=False
    )
    pending = {remote.remote(worker_cpus, *refs, *args): key for key, args in units}
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            ref = done[0]
            key = pending.pop(ref)
            try:
                out = UnitOutcome(key, result=ray.get(ref))
            except ray.exceptions.RayError as e:
                out = UnitOutcome(key, error=_reason(e))
            on_done(out)
    finally:
        for ref in pending:  # the driver stops early (interrupt, error in on_done): drop the units left
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=False)


def _reason(e: BaseException) -> str:
    """One line for an error that ended a task (the worker's exception, or a dead worker after its retries)."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, LingraftError):
        return str(cause)
    text = str(cause or e).strip().splitlines()
    first = next((ln for ln in reversed(text) if ln.strip()), type(e).__name__)
    return f"{type(cause or e).__name__}: {first}" if cause is None or not isinstance(cause, Exception) else first


def worker_pids(ray, *, busy: bool = False) -> list[int]:
    """PIDs of the cluster's live worker processes (``busy``: only those running a unit of :func:`run_units`), for
    tests that kill one. Uses Ray's state API when the dashboard runs (``ray[default]``), else the process titles
    (``ray::IDLE``, ``ray::lingraft_unit``) of this machine's workers: the children of this driver's raylet when
    the driver started the cluster (so that other clusters on the machine are left alone), else all of them."""
    me = os.getpid()
    try:
        from ray.util.state import list_tasks, list_workers

        if busy:
            tasks = list_tasks(filters=[("state", "=", "RUNNING")])
            return sorted({t.worker_pid for t in tasks if t.name == "lingraft_unit" and t.worker_pid})
        workers = list_workers(filters=[("is_alive", "=", True)])
        return [w.pid for w in workers if w.worker_type == "WORKER" and w.pid != me]
    except Exception:  # no dashboard (plain 'pip install ray'): the state API is unavailable
        titles = ("ray::lingraft_unit",) if busy else ("ray::lingraft_unit", "ray::IDLE")
        raylet = _raylet_pid(ray)
        return [pid for pid, ppid in _titled_pids(titles) if pid != me and raylet in (None, ppid)]


def _raylet_pid(ray) -> int | None:
    """The PID of the raylet this driver started (ray.init without an address), else None."""
    try:
        procs = ray._private.worker._global_node.all_processes["raylet"]
        return int(procs[0].process.pid)
    except (AttributeError, KeyError, IndexError, TypeError):
        return None


def _titled_pids(titles: tuple[str, ...]) -> list[tuple[int, int]]:
    """(pid, parent pid) of this machine's processes whose title (command line's first word) is one of ``titles``."""
    from pathlib import Path

    out = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            argv0 = (d / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace").split(" ")[0]
            if argv0 in titles:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                out.append((int(d.name), ppid))
        except (OSError, ValueError, IndexError):
            continue
    return sorted(out)
