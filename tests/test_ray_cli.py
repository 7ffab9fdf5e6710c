"""The ``--ray`` option of the commands: same report as the local run (CliRunner, in-process local cluster),
and the one-line errors when Ray is missing or the address swallowed an argument."""

from __future__ import annotations

import json
import sys

import pytest
from click.testing import CliRunner
from conftest import HAVE_SHARED, SHARED, without_keys

from lingraft.cli.main import cli

pytestmark = pytest.mark.ray

VOLATILE = {"elapsed_s", "finished_at", "total_time_s", "time_per_sample_s", "time_s", "wall_s", "versions"}


def _run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def _stable(o):
    return without_keys(o, VOLATILE)


@pytest.fixture(scope="module")
def cluster(ray_cluster):
    return ray_cluster


@pytest.mark.skipif(not HAVE_SHARED, reason="../shared/vnncomp is absent")
def test_verify_instances_with_ray_reports_what_the_local_run_reports(cluster, tmp_path):
    csv = str(SHARED / "test" / "instances.csv")
    local = _run("verify", "--instances", csv, "--out", str(tmp_path / "l.jsonl"), "--json", "-", "-q")
    remote = _run("verify", "--instances", csv, "--out", str(tmp_path / "r.jsonl"), "--ray", "--json", "-", "-q")
    assert local.exit_code == remote.exit_code == 0, remote.output
    a, b = json.loads(local.stdout), json.loads(remote.stdout)
    assert a["counts"] == b["counts"] and a["wrong"] == b["wrong"] == 0
    key = lambda r: (r["onnx"], r["vnnlib"])  # noqa: E731
    assert [(key(r), r["status"]) for r in sorted(a["instances"], key=key)] == [
        (key(r), r["status"]) for r in sorted(b["instances"], key=key)
    ]


def test_run_with_ray_gives_the_local_summary(cluster, digits_mlp_pt, tmp_path):
    body = {
        "models": [str(digits_mlp_pt)],
        "methods": ["ibp", "crown"],
        "eps": [0.01, 0.02],
        "options": {"num-samples": 20, "pgd-steps": 5},
    }
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(json.dumps(body))
    local = _run("run", str(sweep), "--results", str(tmp_path / "l.jsonl"), "--json", "-", "-q", "--device", "cpu")
    remote = _run(
        "run", str(sweep), "--results", str(tmp_path / "r.jsonl"), "--ray", "--json", "-", "-q", "--device", "cpu"
    )
    assert local.exit_code == remote.exit_code == 0, remote.output
    a, b = json.loads(local.stdout), json.loads(remote.stdout)
    drop = {"results", "config_hash", "config"}  # the results path differs
    assert _stable({k: v for k, v in a.items() if k not in drop}) == _stable(
        {k: v for k, v in b.items() if k not in drop}
    )


def test_ray_flag_without_ray_installed_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    (tmp_path / "i.csv").write_text("a.onnx,b.vnnlib,10\n")
    res = CliRunner().invoke(cli, ["verify", "--instances", str(tmp_path / "i.csv"), "--ray"])
    assert res.exit_code == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'lingraft[ray]'" in lines[0]


def test_ray_address_that_is_a_file_is_refused(tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("models: [default]\nmethods: [ibp]\neps: [0.01]\n")
    res = CliRunner().invoke(cli, ["run", str(sweep), "--ray", str(sweep)])
    assert res.exit_code == 2
    assert "--ray took" in res.stderr and "--ray=ADDRESS" in res.stderr


def test_certify_with_ray_gives_the_local_result(cluster, digits_mlp_pt, tmp_path):
    common = [str(digits_mlp_pt), "-n", "40", "--eps", "0.05", "--batch-size", "16", "-q", "--json", "-"]
    local = _run("certify", *common)
    remote = _run("certify", *common, "--ray", "--state", str(tmp_path / "s.jsonl"))
    assert local.exit_code == remote.exit_code == 0, remote.output
    a, b = json.loads(local.stdout), json.loads(remote.stdout)
    assert a["counts"] == b["counts"]
    for sa, sb in zip(a["samples"], b["samples"], strict=True):
        assert sa["status"] == sb["status"]
        assert (sa["margin_lower"] is None) == (sb["margin_lower"] is None)
        if sa["margin_lower"] is not None:
            assert abs(sa["margin_lower"] - sb["margin_lower"]) <= 1e-6
