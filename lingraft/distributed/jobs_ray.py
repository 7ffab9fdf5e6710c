"""``verify --instances``, ``lingraft run`` and ``lingraft compare`` on Ray: one instance / sweep job / compare
entry per task.

The driver writes every record, through the same resumable JSONL files and the same record-building code as the
local runs (:mod:`lingraft.verify.runner`, :func:`lingraft.experiments.sweep.run_sweep`), in the order the tasks
finish; a resumed run skips what the file already holds. A unit whose task failed after its retries (a worker
that kept dying) is written as an error record with the reason, like a local unit that raised.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lingraft.distributed.ray_backend import UnitOutcome, require_ray, run_units
from lingraft.errors import LingraftError
from lingraft.experiments.compare import plan_compare, run_entry
from lingraft.experiments.compare_config import CompareSpec
from lingraft.experiments.compare_report import build_result, write_outputs
from lingraft.experiments.sweep import SweepSpec, error_record, job_record, run_sweep
from lingraft.verify.core import VerifyResult
from lingraft.verify.runner import Instance, verify_instances

__all__ = ["SweepJobFn", "run_compare_on_ray", "run_sweep_on_ray", "verify_instances_on_ray"]

# ---------------------------------------------------------------------------------------- verify --instances


def _local_name(rel: str) -> Path:
    """Where a benchmark file named ``rel`` (relative to its folder) goes in a worker's scratch folder: the same
    relative path when it stays inside, else its bare name."""
    p = Path(rel)
    return p if not p.is_absolute() and ".." not in p.parts else Path(p.name)


def _verify_task(onnx_blob, onnx: str, vnnlib_blob, vnnlib: str, tmo: float, folder: str, verify_kw: dict):
    """Worker side: write the instance's files (sent through the object store) into a scratch folder, verify it,
    and name the benchmark folder instead of the scratch folder in any message. A file the driver could not read
    is opened by its path (so the error is the one a local run gives)."""
    from lingraft.verify.core import verify_property

    tmp = tempfile.mkdtemp(prefix="lingraft-vnn-")
    try:
        paths = []
        for blob, rel in ((onnx_blob, onnx), (vnnlib_blob, vnnlib)):
            if blob is None:
                paths.append(Path(folder) / rel)
                continue
            p = Path(tmp) / _local_name(rel)
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(blob)
            paths.append(p)
        res = verify_property(paths[0], paths[1], timeout=tmo, **verify_kw)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if "error" in res.stats:
        res.stats["error"] = str(res.stats["error"]).replace(tmp, folder)
    res.note = res.note.replace(tmp, folder)
    return res


def verify_instances_on_ray(
    csv_path, *, worker_cpus: int = 1, worker_gpus: float = 0, max_retries: int = 2, **kw
) -> list[dict]:
    """:func:`lingraft.verify.runner.verify_instances` (``kw``: its arguments) with one instance per Ray task (Ray
    must be initialized, e.g. inside :func:`~lingraft.distributed.ray_backend.ray_session`). The ONNX and VNN-LIB
    files travel through the object store (each file once), so workers need no shared file system. Same ``out``
    file, same records (in instance order), same progress and summary lines; an instance whose task failed after
    ``max_retries`` gets status ``error`` with the reason."""
    ray = require_ray()

    def on_ray(folder: Path, instances: Iterable[Instance], finish, verify_kw: dict) -> None:
        blobs: dict[str, Any] = {}

        def blob(rel: str):
            if rel not in blobs:
                p = folder / rel
                blobs[rel] = ray.put(p.read_bytes()) if p.is_file() else None
            return blobs[rel]

        # every resumed instance is reported here, before any task runs
        left: dict[int, Instance] = {}
        units = []
        for inst in instances:
            left[inst.n] = inst
            args = (blob(inst.onnx), inst.onnx, blob(inst.vnnlib), inst.vnnlib, inst.timeout, str(folder))
            units.append((inst.n, (*args, dict(verify_kw))))

        def on_done(o: UnitOutcome) -> None:
            res = o.result
            if o.error is not None:
                res = VerifyResult("error", stats={"branches": 0, "method": "", "error": o.error})
            finish(left[o.key], res)

        run_units(
            _verify_task,
            units,
            worker_cpus=worker_cpus,
            worker_gpus=worker_gpus,
            max_retries=max_retries,
            on_done=on_done,
        )

    return verify_instances(csv_path, runner=on_ray, **kw)


# ------------------------------------------------------------------------------------------------ sweeps


@dataclass
class SweepJobFn:
    """The job function of ``lingraft run`` in a form that travels to Ray workers: the settings of a
    :class:`~lingraft.experiments.jobs.JobRunner` (built once per worker process, so consecutive jobs on one
    model reuse the loaded network). ``models``: ``{job_id: model file}`` for jobs whose model entry was resolved
    by the driver (shipped-model names); ``device``: a device name for :func:`lingraft.env.pick_device`."""

    options: dict
    work_dir: str
    where: str = "the sweep file"
    device: str | None = None
    models: dict = field(default_factory=dict)

    def __call__(self, job: dict) -> dict:
        return _worker_runner(self)(dict(job, model=self.models.get(job["job_id"], job["model"])))


_RUNNER: list = []  # [(settings key, JobRunner)] of this worker process


def _worker_runner(fn: SweepJobFn):
    from lingraft.config import config_hash
    from lingraft.env import pick_device
    from lingraft.experiments.jobs import JobRunner

    key = config_hash({"options": fn.options, "work_dir": fn.work_dir, "where": fn.where, "device": fn.device})
    if not _RUNNER or _RUNNER[0][0] != key:
        runner = JobRunner(fn.options, work_dir=fn.work_dir, device=pick_device(fn.device), where=fn.where)
        _RUNNER[:] = [(key, runner)]
    return _RUNNER[0][1]


def _job_task(job_fn: Callable[[dict], dict], job: dict) -> dict:
    """Worker side: the results record of one job (built exactly as a local run builds it)."""
    return job_record(job, job_fn)


def run_sweep_on_ray(
    spec: SweepSpec,
    job_fn: Callable[[dict], dict],
    *,
    worker_cpus: int = 1,
    worker_gpus: float = 0,
    max_retries: int = 2,
    on_record: Callable[[dict], Any] | None = None,
    **sweep_kw: Any,
) -> list[dict]:
    """:func:`lingraft.experiments.sweep.run_sweep` (``sweep_kw``: its results_path, log, retry_errors) with one job
    per Ray task (Ray must be initialized). ``job_fn`` must pickle (a :class:`SweepJobFn` for ``lingraft run``); it
    goes to the object store once. The driver holds the results file's lock and appends each record as its task
    finishes; a job whose task failed after ``max_retries`` is recorded as an error, like a local job that raised.
    ``on_record(record)`` is called after each record is written (progress)."""
    require_ray()

    def runner(todo: list[dict], fn: Callable[[dict], dict], write: Callable[[dict], None]) -> None:
        by_id = {j["job_id"]: j for j in todo}

        def on_done(o: UnitOutcome) -> None:
            rec = o.result if o.error is None else error_record(by_id[o.key], o.error, 0.0)
            write(rec)
            if on_record is not None:
                on_record(rec)

        run_units(
            _job_task,
            [(j["job_id"], (j,)) for j in todo],
            shared=(fn,),
            worker_cpus=worker_cpus,
            worker_gpus=worker_gpus,
            max_retries=max_retries,
            on_done=on_done,
        )

    return run_sweep(spec, job_fn, runner=runner, **sweep_kw)


# ------------------------------------------------------------------------------------------------ compare


def _entry_task(spec: CompareSpec, x_all, y_all, name: str, out: str, hashes: dict, units, seed: int, device):
    """Worker side: one compare entry's steps; returns (its results records, its log lines) for the driver."""
    records: list[dict] = []
    lines: list[str] = []
    run_entry(
        spec, name, Path(out), hashes, units, x_all, y_all, seed=seed, device=device,
        write=records.append, log=lines.append,
    )  # fmt: skip
    return records, lines


def run_compare_on_ray(
    spec: CompareSpec,
    out_dir,
    *,
    only: list[str] | None = None,
    seed: int = 0,
    device: str | None = None,
    log: Callable[[str], None] = print,
    plot: bool = True,
    worker_cpus: int = 1,
    worker_gpus: float = 0,
    max_retries: int = 2,
) -> dict:
    """:func:`lingraft.experiments.compare.run_compare` with one entry per Ray task (Ray must be initialized):
    entries whose teacher is trained run at once, students in a later wave. Workers train and graft into
    ``out_dir`` (which must be on a file system every worker sees, like the teachers' checkpoints); the driver
    alone appends the certification records to results.jsonl and writes the tables. A failed entry stops the run
    with a LingraftError naming it (a rerun reuses every finished step)."""
    require_ray()
    p = plan_compare(spec, out_dir, only=only, seed=seed)
    dev = None if device is None else str(device)

    def on_done(o: UnitOutcome) -> None:
        if o.error is not None:
            raise LingraftError(f"compare entry {o.key} failed on Ray: {o.error}; fix it and rerun to resume")
        records, lines = o.result
        for line in lines:
            log(line)
        for rec in records:
            p.results.append(rec)
            p.have.add(rec["unit"])
        if records:
            write_outputs(build_result(spec, p.out, p.hashes, seed), p.out, log=lambda s: None, plot=False)

    trained: set[str] = set()
    todo = [e for e in spec.entries if e.name in p.need]
    while todo:
        wave = [e for e in todo if not e.teacher_entry or e.teacher in trained]
        if not wave:  # pragma: no cover - load_compare orders teachers first and rejects cycles
            raise LingraftError(f"compare entries {[e.name for e in todo]} wait on teachers that never train")
        todo = [e for e in todo if e not in wave]
        units = [
            (e.name, (e.name, str(p.out), p.hashes, p.units(e.name) if e.name in p.selected else None, seed, dev))
            for e in wave
        ]
        run_units(
            _entry_task,
            units,
            shared=(spec, p.x_all, p.y_all),
            worker_cpus=worker_cpus,
            worker_gpus=worker_gpus,
            max_retries=max_retries,
            on_done=on_done,
        )
        trained.update(e.name for e in wave)
    return p.finish(log, plot)
