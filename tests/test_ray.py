"""Certify on a local Ray cluster (lingraft.distributed): equal to the local run, survives a killed worker, resumes
after an interrupted driver, names the failed batch; without Ray the one-line install hint."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import sys

import pytest

from lingraft.certify.pipeline import certify
from lingraft.errors import LingraftError

pytestmark = pytest.mark.ray

HAVE_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAVE_RAY, reason="ray not installed: pip install 'lingraft[ray]'")

EPS = 0.05
BATCH = 16  # 64 images: 4 batches, 4 Ray tasks


@pytest.fixture(scope="module")
def mnist64():
    """The shipped CNN-B, 64 MNIST test images and the local certify report (crown, batches of 16)."""
    from lingraft.data.datasets import load_dataset, subset
    from lingraft.io.loader import load_model

    lm = load_model("models/mnist-cnn-b-fgsm.pt")
    x, y = subset(*load_dataset("mnist", "test"), 64)
    x = x.reshape(-1, *lm.in_shape)
    local = certify(lm.model, x, y, EPS, method="crown", batch_size=BATCH, in_shape=lm.in_shape)
    return lm, x, y, local


def _assert_equal(rep, local):
    assert [s["index"] for s in rep.samples] == [s["index"] for s in local.samples]
    assert [s["status"] for s in rep.samples] == [s["status"] for s in local.samples]
    assert rep.counts == local.counts
    for a, b in zip(rep.samples, local.samples, strict=True):
        if b["margin_lower"] is None:
            assert a["margin_lower"] is None
        else:
            assert abs(a["margin_lower"] - b["margin_lower"]) <= 1e-6


def _on_ray(lm, x, y, **kw):
    from lingraft.distributed.certify_ray import certify_on_ray

    return certify_on_ray(lm.model, x, y, EPS, method="crown", batch_size=BATCH, in_shape=lm.in_shape, **kw)


@needs_ray
def test_ray_equals_local(ray_cluster, mnist64):
    lm, x, y, local = mnist64
    seen = []
    rep = _on_ray(lm, x, y, progress=seen.append)
    _assert_equal(rep, local)
    assert sorted(seen) == [BATCH] * 4  # one progress call per finished batch
    assert (rep.clean_acc, rep.pgd_acc, rep.certified_acc) == (local.clean_acc, local.pgd_acc, local.certified_acc)


@needs_ray
def test_killed_worker_is_retried(ray_cluster, mnist64):
    from lingraft.distributed.ray_backend import worker_pids

    lm, x, y, local = mnist64
    killed: list[int] = []

    def progress(n):
        if not killed:  # the first batch finished: kill a worker that runs another one
            pids = worker_pids(ray_cluster, busy=True)  # the other batches are still running
            assert pids, "no Ray worker process running a batch"
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

    rep = _on_ray(lm, x, y, progress=progress, max_retries=3)
    assert killed
    _assert_equal(rep, local)


@needs_ray
def test_interrupted_driver_resumes(ray_cluster, mnist64, tmp_path):
    lm, x, y, local = mnist64
    state = tmp_path / "state.jsonl"

    def stop(n):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt, match="1 of 4 batches saved"):
        _on_ray(lm, x, y, state_path=state, settings_hash="h", progress=stop)
    lines = state.read_text().splitlines()
    assert len(lines) == 2  # header + the one finished batch
    first = json.loads(lines[1])["start"]
    ran, skipped = [], []
    rep = _on_ray(lm, x, y, state_path=state, settings_hash="h", progress=ran.append, progress_skip=skipped.append)
    _assert_equal(rep, local)
    starts = [json.loads(ln)["start"] for ln in state.read_text().splitlines()[1:]]
    assert sorted(starts) == [0, 16, 32, 48] and starts[0] == first  # every batch once: none counted twice
    assert (sum(ran), sum(skipped)) == (48, 16)


@needs_ray
def test_failed_batch_named_after_the_others_are_saved(ray_cluster, mnist64, tmp_path):
    lm, x, y, local = mnist64
    state = tmp_path / "state.jsonl"
    bad = y.clone()
    bad[20] = 99  # no such class: the task for batch 16..31 raises
    with pytest.raises(LingraftError) as e:
        _on_ray(lm, x, bad, state_path=state, settings_hash="h")
    msg = str(e.value)
    assert "samples 16..31" in msg and "rerun" in msg and "\n" not in msg
    starts = sorted(json.loads(ln)["start"] for ln in state.read_text().splitlines()[1:])
    assert starts == [0, 32, 48]
    ran, skipped = [], []
    rep = _on_ray(lm, x, y, state_path=state, settings_hash="h", progress=ran.append, progress_skip=skipped.append)
    assert (ran, skipped) == ([BATCH], [BATCH] * 3)  # only the failed batch reruns
    _assert_equal(rep, local)


def test_require_ray_without_ray_names_the_extra(monkeypatch):
    from lingraft.distributed.ray_backend import require_ray

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(LingraftError) as e:
        require_ray()
    assert "pip install 'lingraft[ray]'" in str(e.value) and "\n" not in str(e.value)


def test_ray_is_a_tier(request):
    import conftest

    assert "ray" in conftest.TIERS and request.node.get_closest_marker("ray") is not None
