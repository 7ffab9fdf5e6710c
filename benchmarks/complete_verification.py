#!/usr/bin/env python
"""Complete verification with and without grafting: how many images branch and bound decides, and how fast.

For each model: `certify` the first N MNIST test images at eps with CROWN, then give every image left unknown
up to --bab-timeout seconds of branch and bound (lingraft.certify.complete, the pipeline of `lingraft verify`).
Prints one Markdown table: clean, PGD, CROWN certified, certified after branch and bound, falsified by branch and
bound, still undecided, and the mean branch-and-bound time per attempted image. Grafted neurons are linear, so a
grafted network has fewer neurons to split on: the Linearity Grafting paper's claim is that it is verified faster.

    python benchmarks/complete_verification.py --model models/mnist-cnn-b-fgsm.pt --model grafted.pt \
        --eps 0.06 -n 100 --bab-timeout 10
"""

from __future__ import annotations

import argparse
import time

import torch
from _table import markdown_table  # benchmarks/_table.py (the script's folder is on sys.path)

from lingraft.certify.pipeline import certify
from lingraft.data.datasets import load_dataset, subset
from lingraft.io.loader import load_model


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", required=True)
    ap.add_argument("--eps", type=float, required=True)
    ap.add_argument("-n", "--num-samples", type=int, default=100)
    ap.add_argument("--bab-timeout", type=float, default=10.0, help="seconds per unknown image")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    hdr = [
        "model",
        "eps",
        "n",
        "clean %",
        "PGD %",
        "CROWN cert %",
        "cert after BaB %",
        "falsified by BaB",
        "undecided",
        "unstable/img",
        "BaB s per attempted image",
        "total s",
    ]
    rows = []
    for path in args.model:
        lm = load_model(path)
        x, y = subset(*load_dataset(lm.dataset, "test"), args.num_samples)
        x = x.reshape(-1, *lm.in_shape)
        t0 = time.perf_counter()
        rep = certify(lm.model, x, y, args.eps, in_shape=lm.in_shape, method="crown", bab_timeout=args.bab_timeout)
        total = time.perf_counter() - t0
        b = rep.bab
        crown_cert = rep.counts["verified"] - b["verified"]
        n = rep.num_samples
        rows.append(
            [
                path,
                args.eps,
                n,
                100 * rep.clean_acc,
                100 * rep.pgd_acc,
                100 * crown_cert / n,
                100 * rep.certified_acc,
                b["falsified"],
                b["undecided"],
                sum(rep.unstable_per_layer.values()),
                b["time_s"] / max(b["attempted"], 1),
                total,
            ]
        )
        print(f"done {path}", flush=True)
    print(markdown_table(hdr, rows))
    print(f"\ntorch threads: {torch.get_num_threads()}; branch and bound: {args.bab_timeout:g} s per unknown image")


if __name__ == "__main__":
    main()
