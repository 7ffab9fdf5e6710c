#!/usr/bin/env python
"""CROWN speed and agreement: lingraft's engine vs auto_LiRPA 0.3 on the same model and images.

Prints one table: per model, total CROWN time over N MNIST test images (margin specification, batches of
--batch-size) for auto_LiRPA (patches mode), lingraft in auto_LiRPA-compatible mode (identical bounds), and
lingraft's default tight mode; the speed-up; the max bound difference of compat mode; the smallest (tight - auto_LiRPA)
lower-bound difference (>= 0: tight mode is never looser on these images); certified counts.
Both run in the same process, interleaved per batch, so machine noise hits both alike.

    python benchmarks/certify_speed.py                          # shipped cnn-b, 200 images
    python benchmarks/certify_speed.py --model runs/fc.pt -n 200 --eps 0.1
"""

from __future__ import annotations

import argparse
import time

import torch
from _setup import model_args, models_and_images  # benchmarks/_setup.py (the script's folder is on sys.path)
from _table import markdown_table

from lingraft.bounds import BoundedNetwork, input_box, margin_spec
from lingraft.compat import auto_lirpa


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_args(ap, num_samples=200, eps=None, batch_size=32)
    args = ap.parse_args()
    rows = []
    for path, lm, x, y in models_and_images(args):
        eps = args.eps if args.eps is not None else float(lm.meta.get("config", {}).get("eps", 0.1))
        model = lm.model.eval()
        compat = BoundedNetwork(model, lm.in_shape, mode="autolirpa")
        tight = BoundedNetwork(model, lm.in_shape)
        t = {"lirpa": 0.0, "compat": 0.0, "tight": 0.0}
        cert = {"lirpa": 0, "compat": 0, "tight": 0}
        maxdiff = 0.0
        tight_gain = float("inf")  # min over bounds of (tight lower - auto_LiRPA lower): >= 0 means never looser
        for s in range(0, x.shape[0], args.batch_size):
            xb, yb = x[s : s + args.batch_size], y[s : s + args.batch_size]
            xl, xu = input_box(xb, eps)
            C = margin_spec(yb, 10)
            t0 = time.perf_counter()
            la, _ = auto_lirpa.autolirpa_bounds(model, xl, xu, "crown", C)
            t["lirpa"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            rc = compat.compute_bounds(xl, xu, "crown", C)
            t["compat"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            rt = tight.compute_bounds(xl, xu, "crown", C)
            t["tight"] += time.perf_counter() - t0
            maxdiff = max(maxdiff, float((rc.lower - la).abs().max()))
            tight_gain = min(tight_gain, float((rt.lower - la).min()))
            for k, lo in (("lirpa", la), ("compat", rc.lower), ("tight", rt.lower)):
                cert[k] += int((lo.min(1).values > 0).sum())
        rows.append(
            [
                path,
                lm.arch,
                eps,
                x.shape[0],
                t["lirpa"],
                t["compat"],
                t["tight"],
                t["lirpa"] / t["compat"],
                t["lirpa"] / t["tight"],
                maxdiff,
                tight_gain,
                cert["lirpa"],
                cert["compat"],
                cert["tight"],
            ]
        )
    hdr = [
        "model",
        "arch",
        "eps",
        "n",
        "auto_LiRPA s",
        "lingraft(compat) s",
        "lingraft(tight) s",
        "speed-up compat",
        "speed-up tight",
        "max |lb diff| compat",
        "min (tight - auto_LiRPA) lb",
        "cert auto_LiRPA",
        "cert compat",
        "cert tight",
    ]
    print(markdown_table(hdr, rows))
    print(f"\ntorch threads: {torch.get_num_threads()}; batch size {args.batch_size}; bounds: CROWN, margin spec")


if __name__ == "__main__":
    main()
