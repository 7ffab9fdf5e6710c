"""``verify --instances`` and sweeps on a local Ray cluster: the same records as the local run, also when a worker
is killed mid-run or the driver is interrupted and rerun; a unit whose worker keeps dying is an error record."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
from conftest import HAVE_SHARED, SHARED, without_keys

ray = pytest.importorskip("ray")

from lingraft.distributed.jobs_ray import SweepJobFn, run_sweep_on_ray, verify_instances_on_ray  # noqa: E402
from lingraft.distributed.ray_backend import worker_pids  # noqa: E402
from lingraft.experiments.jobs import resolve_options  # noqa: E402
from lingraft.experiments.sweep import load_sweep, run_sweep  # noqa: E402
from lingraft.verify.runner import verify_instances  # noqa: E402

pytestmark = pytest.mark.ray

#: what may differ between two runs of the same units (timings)
VOLATILE = (
    "elapsed_s",
    "finished_at",
    "total_time_s",
    "time_per_sample_s",
    "time_s",
    "graft_time_s",
    "ms_per_img",
    "train_s",
    "graft_s",
)


@pytest.fixture(scope="module")
def cluster(ray_cluster):
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    return ray_cluster


def _stable(o):
    return without_keys(o, VOLATILE)


def _verdicts(records: list[dict]) -> list[tuple]:
    return [(r["onnx"], r["vnnlib"], r["timeout"], r["status"], r["expected"], r["wrong"]) for r in records]


def _lines(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


# ---------------------------------------------------------------------------------------- verify --instances


@pytest.fixture(scope="module")
def bench() -> Path:
    if not HAVE_SHARED:
        pytest.skip("../shared/vnncomp is absent")
    return SHARED / "test" / "instances.csv"


@pytest.fixture(scope="module")
def local_records(bench, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("local") / "test.jsonl"
    recs = verify_instances(bench, out=out, echo=lambda s: None)
    assert len(recs) == 5
    return recs


def test_verify_on_ray_equals_local(cluster, bench, local_records, tmp_path):
    out = tmp_path / "ray.jsonl"
    lines: list[str] = []
    recs = verify_instances_on_ray(bench, out=out, results_dir=tmp_path / "res", echo=lines.append)
    assert _verdicts(recs) == _verdicts(local_records)
    assert sorted(_verdicts(_lines(out))) == sorted(_verdicts(local_records))  # one line per instance
    assert len(list((tmp_path / "res").iterdir())) == 5
    assert lines[-1].startswith("test: 5 instances:")


def test_verify_on_ray_survives_a_killed_worker(cluster, bench, local_records, tmp_path):
    out = tmp_path / "ray.jsonl"
    killed: list[int] = []

    def echo(line: str) -> None:
        if not killed and line.startswith("["):
            killed.extend(worker_pids(ray, busy=True) or worker_pids(ray))
            for pid in killed:
                os.kill(pid, signal.SIGKILL)  # the units they ran are retried

    recs = verify_instances_on_ray(bench, out=out, echo=echo, max_retries=3)
    assert killed
    assert _verdicts(recs) == _verdicts(local_records)
    assert sorted(_verdicts(_lines(out))) == sorted(_verdicts(local_records))


def test_verify_on_ray_resumes_after_an_interrupted_driver(cluster, bench, local_records, tmp_path):
    out = tmp_path / "ray.jsonl"
    seen: list[str] = []

    def echo(line: str) -> None:
        seen.append(line)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        verify_instances_on_ray(bench, out=out, echo=echo)
    assert len(_lines(out)) == 2
    again: list[str] = []
    recs = verify_instances_on_ray(bench, out=out, echo=again.append)
    assert sum(ln.endswith("(resumed)") for ln in again) == 2
    assert _verdicts(recs) == _verdicts(local_records)
    assert sorted(_verdicts(_lines(out))) == sorted(_verdicts(local_records))  # nothing counted twice


def _die(msg: str) -> None:
    os._exit(1)  # the worker process dies as soon as verification logs anything


def test_verify_instance_whose_worker_keeps_dying_is_an_error(cluster, bench, tmp_path):
    folder = tmp_path / "two"
    folder.mkdir()
    for name in ("test_nano.onnx", "test_nano.vnnlib", "test_tiny.onnx", "test_tiny.vnnlib"):
        shutil.copy(bench.parent / name, folder / name)
    (folder / "instances.csv").write_text("test_nano.onnx,test_nano.vnnlib,60\ntest_tiny.onnx,test_tiny.vnnlib,60\n")
    out = tmp_path / "two.jsonl"
    recs = verify_instances_on_ray(folder / "instances.csv", out=out, echo=lambda s: None, max_retries=1, log=_die)
    assert [r["status"] for r in recs] == ["error", "error"]
    assert all("WorkerCrashedError" in r["error"] for r in recs)  # the reason: the worker died
    assert len(_lines(out)) == 2


# ------------------------------------------------------------------------------------------------ sweeps


@pytest.fixture(scope="module")
def sweep_spec(digits_mlp_pt, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sweep")
    body = {
        "models": [str(digits_mlp_pt)],
        "methods": ["ibp", "crown"],
        "eps": [0.01, 0.02],
        "options": {"num-samples": 30, "pgd-steps": 5},
    }
    p = folder / "sweep.yaml"
    p.write_text(json.dumps(body))  # JSON is YAML
    spec = load_sweep(p)
    opts = resolve_options(spec.extra, str(p), spec.base_dir)
    return spec, SweepJobFn(opts, work_dir=str(folder / "work"), where=str(p), device="cpu")


def test_sweep_on_ray_equals_local(cluster, sweep_spec, tmp_path):
    spec, fn = sweep_spec
    local = run_sweep(spec, fn, results_path=tmp_path / "local.jsonl", log=lambda s: None)
    seen: list[dict] = []
    remote = run_sweep_on_ray(spec, fn, results_path=tmp_path / "ray.jsonl", log=lambda s: None, on_record=seen.append)
    assert len(local) == 4 and all(r["status"] == "ok" for r in local)
    assert _stable(remote) == _stable(local)
    assert len(seen) == 4
    by_id = lambda recs: sorted(_stable(recs), key=lambda r: r["job_id"])  # noqa: E731
    assert by_id(_lines(tmp_path / "ray.jsonl")) == by_id(local)


def test_sweep_on_ray_resumes_after_an_interrupted_driver(cluster, sweep_spec, tmp_path):
    from lingraft.signals import Interrupted

    spec, fn = sweep_spec
    local = run_sweep(spec, fn, results_path=tmp_path / "local.jsonl", log=lambda s: None)
    out = tmp_path / "ray.jsonl"

    def log(msg: str) -> None:
        if msg.startswith("[2/4]"):
            raise KeyboardInterrupt

    with pytest.raises(Interrupted):
        run_sweep_on_ray(spec, fn, results_path=out, log=log)
    assert len(_lines(out)) == 2
    said: list[str] = []
    again = run_sweep_on_ray(spec, fn, results_path=out, log=said.append)
    assert "resuming" in said[0] and "2 of 4 jobs already done" in said[0]
    assert _stable(again) == _stable(local)
    assert len(_lines(out)) == 4  # nothing counted twice


class _DieOnEps:
    """A job function whose worker dies on one eps value (every try)."""

    def __call__(self, job: dict) -> dict:
        if job["eps"] == 0.02:
            os._exit(1)
        return {"eps": job["eps"]}


def test_sweep_job_whose_worker_keeps_dying_is_an_error_record(cluster, sweep_spec, tmp_path):
    spec, _ = sweep_spec
    out = tmp_path / "ray.jsonl"
    recs = run_sweep_on_ray(spec, _DieOnEps(), results_path=out, log=lambda s: None, max_retries=1)
    assert len(recs) == 4
    for r in recs:
        assert r["status"] == ("error" if r["job"]["eps"] == 0.02 else "ok"), r
        assert (r["error"] is None) == (r["job"]["eps"] != 0.02)
        assert r["error"] is None or "WorkerCrashedError" in r["error"]
        assert set(r) == {"job_id", "job", "status", "result", "error", "elapsed_s", "finished_at"}
    again = run_sweep_on_ray(spec, _DieOnEps(), results_path=out, log=lambda s: None, max_retries=1)
    assert again == recs  # errors are not rerun without retry_errors
    assert len(_lines(out)) == 4


# ------------------------------------------------------------------------------------------------ compare


def _compare_spec(tmp_path: Path):
    import yaml

    from lingraft.experiments.compare_config import load_compare

    cfg = {
        "dataset": "digits",
        "eps": 0.05,
        "eps_grid": [0.02, 0.05],
        "train": {"epochs": 1, "batch_size": 32, "optimizer": "adam", "lr": 0.01, "num_train": 320, "val_size": 200},
        "graft": {"ratio": 0.5, "epochs": 1, "num_train": 160, "score_images": 16, "batch_size": 32},
        "certify": {"num_samples": 20, "methods": ["crown"], "pgd_steps": 5},
        "entries": [
            {"name": "ce", "arch": "mlp", "method": "ce"},
            {"name": "fgsm", "arch": "mlp", "method": "fgsm", "train_eps": 0.05},
            {"name": "kd", "arch": "mlp", "loss": "kd", "teacher": "fgsm"},  # a student: trained in a later wave
        ],
    }
    p = tmp_path / "cmp.yaml"
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return load_compare(p)


def test_compare_on_ray_equals_local(cluster, tmp_path):
    pytest.importorskip("sklearn")
    import torch

    from lingraft.distributed.jobs_ray import run_compare_on_ray
    from lingraft.experiments.compare import run_compare

    spec = _compare_spec(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as on a worker (worker_cpus=1): the same arithmetic, the same models
    try:
        local = run_compare(spec, tmp_path / "local", device="cpu", log=lambda s: None, plot=False)
    finally:
        torch.set_num_threads(threads)
    lines: list[str] = []
    remote = run_compare_on_ray(spec, tmp_path / "ray", device="cpu", log=lines.append, plot=False)
    assert _stable(remote["rows"]) == _stable(local["rows"])
    by_unit = lambda recs: sorted(_stable(recs), key=lambda r: r["unit"])  # noqa: E731
    assert by_unit(_lines(tmp_path / "ray" / "results.jsonl")) == by_unit(_lines(tmp_path / "local" / "results.jsonl"))
    assert any(ln.startswith("[kd] training") for ln in lines)  # the workers' log lines reach the driver
    again = run_compare_on_ray(spec, tmp_path / "ray", device="cpu", log=lines.append, plot=False)
    assert _stable(again["rows"]) == _stable(local["rows"])  # a rerun reuses everything and adds no line
    assert len(_lines(tmp_path / "ray" / "results.jsonl")) == len(_lines(tmp_path / "local" / "results.jsonl"))
