#!/usr/bin/env python
"""Scale-out on Ray: certify N MNIST test images of the shipped CNN-B locally and on 1, 2, ... Ray workers.

Prints one Markdown table: per configuration the wall time, images/s, the speed-up over 1 Ray worker, the per-task
overhead and whether every sample's status equals the local run's. Every configuration uses 1 torch thread per
process (the local run too, so its row is the 1-core baseline). Each Ray configuration starts its own local
cluster with exactly that many CPUs (``ray.init(num_cpus=W)``, one task per CPU) and warms its workers up on
W batches first, so the timed run measures certification, not process start-up.

Per-task overhead = (wall x workers - sum of the tasks' certify times) / tasks: the time a worker spends per task
on anything but certifying (scheduling, shipping the batch and the model, rebuilding the model, idle at the end).

    python benchmarks/scale_out.py                  # 512 images, local + 1 and 2 workers
    python benchmarks/scale_out.py -n 128 --workers 1,2,4
"""

from __future__ import annotations

import argparse
import time

from _table import markdown_table  # benchmarks/_table.py (the script's folder is on sys.path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint or ONNX file; default: the shipped CNN-B")
    ap.add_argument("-n", "--num-samples", type=int, default=512)
    ap.add_argument("--eps", type=float, default=None, help="default: the checkpoint's certify eps")
    ap.add_argument("--method", default="crown")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", default="1,2", help="comma-separated Ray worker counts (default 1,2)")
    ap.add_argument("--no-local", action="store_true", help="skip the local (no Ray) run")
    args = ap.parse_args()
    workers = [int(w) for w in args.workers.split(",") if w.strip()]

    import torch

    from lingraft.certify.pipeline import certify, default_eps
    from lingraft.data.datasets import load_dataset, subset
    from lingraft.io.loader import load_model

    torch.set_num_threads(1)
    lm = load_model(args.model)
    eps = args.eps if args.eps is not None else default_eps(lm.meta)
    x, y = subset(*load_dataset(lm.dataset, "test"), args.num_samples)
    x = x.reshape(-1, *lm.in_shape)
    kw = dict(method=args.method, batch_size=args.batch_size, in_shape=lm.in_shape)
    n_tasks = (x.shape[0] + args.batch_size - 1) // args.batch_size
    runs = []  # (config, workers, wall, sum of task certify times, statuses)
    if not args.no_local:
        t0 = time.perf_counter()
        rep = certify(lm.model, x, y, eps, **kw)
        runs.append(("local (no Ray)", 1, time.perf_counter() - t0, rep.total_time_s, _statuses(rep)))
    for w in workers:
        runs.append(_ray_run(lm, x, y, eps, w, kw))
    ref = runs[0][4]
    one = next((r[2] for r in runs if r[0].startswith("Ray") and r[1] == 1), None)
    rows = []
    for name, w, wall, busy, st in runs:
        rows.append(
            [
                name,
                x.shape[0],
                wall,
                x.shape[0] / wall,
                f"{one / wall:.2f}x" if one and name.startswith("Ray") else "-",
                (wall * w - busy) / n_tasks,
                "yes" if st == ref else "no",
            ]
        )
    print(
        f"model {lm.path}  eps {eps:g}  method {args.method}  batch {args.batch_size}  "
        f"({n_tasks} tasks per Ray run)  torch threads 1 per process\n"
    )
    header = ["config", "images", "wall s", "images/s", "speed-up vs 1 worker", "overhead s/task", "statuses equal"]
    print(markdown_table(header, rows))


def _statuses(rep) -> list:
    return [(s["index"], s["status"]) for s in rep.samples]


def _ray_run(lm, x, y, eps, w, kw):
    """Certify on a fresh local Ray cluster of ``w`` CPUs (1 per worker); the workers are warmed up first."""
    import ray

    from lingraft.distributed.certify_ray import certify_on_ray
    from lingraft.distributed.ray_backend import ray_session

    with ray_session(None, num_cpus=w):
        warm = min(x.shape[0], w * kw["batch_size"])
        certify_on_ray(lm.model, x[:warm], y[:warm], eps, worker_cpus=1, **kw)  # start and warm the workers
        t0 = time.perf_counter()
        rep = certify_on_ray(lm.model, x, y, eps, worker_cpus=1, **kw)
        wall = time.perf_counter() - t0
    assert not ray.is_initialized()
    return (f"Ray, {w} worker{'s' if w > 1 else ''}", w, wall, rep.total_time_s, _statuses(rep))


if __name__ == "__main__":
    main()
