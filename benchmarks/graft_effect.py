#!/usr/bin/env python
"""Effect of linearity grafting on certification: how much `lingraft graft` tightens certification.

For each model and eps: the FGSM-trained baseline and LG-grafted versions at each ratio (grafted at that eps and
fine-tuned with the paper's recipe), certified on the same first N MNIST test images with CROWN and alpha-CROWN.
Prints (and with --md writes) one Markdown table: clean acc, PGD acc, CROWN / alpha-CROWN certified acc, unstable
neurons per image (sum over layers, CROWN bounds), bound time per image. Results are cached in --out-dir
(results.jsonl, grafted checkpoints), so an interrupted run resumes.

    python benchmarks/graft_effect.py --model models/mnist-cnn-b-fgsm.pt --model runs/mnist-fc-8x200-fgsm.pt \
        --eps 0.05 --eps 0.1 -n 1000 --md docs/graft_effect.md
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import torch
from _table import markdown_table  # benchmarks/_table.py (the script's folder is on sys.path)

from lingraft.certify.pipeline import certify
from lingraft.data.datasets import load_dataset, subset
from lingraft.graft.pipeline import run_graft
from lingraft.io.files import append_jsonl, atomic_write_text, read_jsonl
from lingraft.io.loader import load_model


def key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", required=True)
    ap.add_argument("--eps", action="append", type=float, required=True)
    ap.add_argument("--ratio", action="append", type=float, default=None)
    ap.add_argument("-n", "--num-samples", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--num-train", type=int, default=10000)
    ap.add_argument("--alpha-iterations", type=int, default=20)
    ap.add_argument("--out-dir", default="runs/graft_effect")
    ap.add_argument("--md", default=None, help="also write the table to this Markdown file")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ratios = args.ratio or [0.25, 0.5, 0.75]
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    res_path = out / "results.jsonl"
    done = {r["key"]: r for r in read_jsonl(res_path)}
    rows = []
    for mpath in args.model:
        lm = load_model(mpath)
        x, y = subset(*load_dataset(lm.dataset, "test"), args.num_samples)
        x = x.reshape(-1, *lm.in_shape)
        for eps in args.eps:
            for ratio in [0.0] + ratios:
                k = key(mpath, eps, ratio, args.num_samples, args.epochs, args.num_train, args.alpha_iterations)
                if k not in done:
                    path = mpath
                    graft_time = 0.0
                    if ratio > 0:
                        path = str(out / f"{Path(mpath).stem}_eps{eps}_r{ratio}.pt")
                        if not Path(path).exists():
                            t0 = time.perf_counter()
                            run_graft(
                                mpath,
                                out_path=path,
                                ratio=ratio,
                                eps=eps,
                                epochs=args.epochs,
                                num_train=args.num_train,
                                num_samples=0,
                                log=lambda s: print("  " + s),
                            )
                            graft_time = time.perf_counter() - t0
                    m = load_model(path).model.eval()
                    rec = {
                        "key": k,
                        "model": mpath,
                        "arch": lm.arch,
                        "eps": eps,
                        "ratio": ratio,
                        "graft_time_s": graft_time,
                    }
                    for meth in ("crown", "alpha-crown"):
                        rep = certify(
                            m, x, y, eps, in_shape=lm.in_shape, method=meth, alpha_iterations=args.alpha_iterations
                        )
                        rec[meth] = {
                            "clean": rep.clean_acc,
                            "pgd": rep.pgd_acc,
                            "cert": rep.certified_acc,
                            "unstable": sum(rep.unstable_per_layer.values()),
                            "ms_per_img": 1000 * rep.time_per_sample_s,
                        }
                    append_jsonl(res_path, rec)
                    done[k] = rec
                r = done[k]
                rows.append(r)
                print(
                    f"{lm.arch:9s} eps {eps:<6g} ratio {ratio:<5g} clean {r['crown']['clean']:.3f} "
                    f"pgd {r['crown']['pgd']:.3f} crown {r['crown']['cert']:.3f} "
                    f"alpha {r['alpha-crown']['cert']:.3f} unstable {r['crown']['unstable']:.1f} "
                    f"{r['crown']['ms_per_img']:.1f}/{r['alpha-crown']['ms_per_img']:.1f} ms",
                    flush=True,
                )
    hdr = [
        "model",
        "eps",
        "graft ratio",
        "clean",
        "PGD",
        "CROWN cert",
        "alpha-CROWN cert",
        "unstable/img",
        "CROWN ms/img",
        "alpha-CROWN ms/img",
    ]
    body = []
    for r in rows:
        c, a = r["crown"], r["alpha-crown"]
        body.append(
            [r["arch"], f"{r['eps']:g}", f"{r['ratio']:g}"]
            + [
                f"{v:.1f}"
                for v in (
                    100 * c["clean"],
                    100 * c["pgd"],
                    100 * c["cert"],
                    100 * a["cert"],
                    c["unstable"],
                    c["ms_per_img"],
                    a["ms_per_img"],
                )
            ]
        )
    table = markdown_table(hdr, body)
    print(table)
    if args.md:
        cmd = "python benchmarks/graft_effect.py " + " ".join(
            [f"--model {m}" for m in args.model]
            + [f"--eps {e:g}" for e in args.eps]
            + [f"-n {args.num_samples}", f"--epochs {args.epochs}", f"--num-train {args.num_train}"]
        )
        atomic_write_text(args.md, f"# Effect of linearity grafting (MNIST)\n\nCommand: `{cmd}`\n\n{table}\n")


if __name__ == "__main__":
    main()
