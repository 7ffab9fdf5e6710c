#!/usr/bin/env python
"""alpha-CROWN: lingraft vs auto_LiRPA 0.3 on the same model, images, specification and iteration count.

Prints one table: per model and tool, the certified count (every margin lower bound > 0), the mean margin lower
bound over all (image, class) pairs, and the total time. Lower bounds only (bound_upper=False for both), margin
specification y_true - y_j, L-inf box clipped to [0, 1]. The tools run interleaved batch by batch in one
process, so machine noise hits them alike. Each uses its own default learning rate unless --lr is given.

    python benchmarks/alpha_crown.py                                   # shipped cnn-b, 100 images, eps 0.06
    python benchmarks/alpha_crown.py --model runs/fc8x200.pt --eps 0.06 -n 100

A fc-8x200 model for the second row: ``lingraft train --arch fc-8x200 --method fgsm --eps 0.1 --optimizer adam
--lr 1e-3 --epochs 2 --out runs/fc8x200.pt``.
"""

from __future__ import annotations

import argparse
import time

import torch
from _setup import model_args, models_and_images  # benchmarks/_setup.py (the script's folder is on sys.path)
from _table import markdown_table

from lingraft.bounds import BoundedNetwork, input_box, margin_spec
from lingraft.compat import auto_lirpa

AUTO_LIRPA_LR = 0.5  # auto_LiRPA 0.3's default lr_alpha


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_args(ap, num_samples=100, eps=0.06, batch_size=10)
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--lr", type=float, default=None, help="both tools' alpha learning rate (default: each its own)")
    ap.add_argument("--final-only", action="store_true", help="lingraft: optimise the final layer's slopes only")
    ap.add_argument(
        "--no-early-stop",
        action="store_true",
        help="lingraft: optimise every image for all iterations, as auto_LiRPA does (its mean then compares like "
        "for like; by default lingraft leaves images CROWN proves at CROWN's bound and stops an image once proved)",
    )
    args = ap.parse_args()
    rows = []
    for path, lm, x, y in models_and_images(args):
        model = lm.model.eval()
        net = BoundedNetwork(model, lm.in_shape)
        tools = ("auto_LiRPA 0.3", "lingraft")
        secs = dict.fromkeys(tools, 0.0)
        cert = dict.fromkeys(tools, 0)
        lbs: dict[str, list] = {t: [] for t in tools}
        for s in range(0, x.shape[0], args.batch_size):
            xb, yb = x[s : s + args.batch_size], y[s : s + args.batch_size]
            xl, xu = input_box(xb, args.eps)
            C = margin_spec(yb, 10)
            t0 = time.perf_counter()
            la, _ = auto_lirpa.autolirpa_bounds(
                model,
                xl,
                xu,
                "alpha-crown",
                C,
                alpha_iterations=args.iterations,
                alpha_lr=args.lr if args.lr is not None else AUTO_LIRPA_LR,
                bound_upper=False,
            )
            secs[tools[0]] += time.perf_counter() - t0
            t0 = time.perf_counter()
            kw = {} if args.lr is None else {"alpha_lr": args.lr}
            res = net.compute_bounds(
                xl,
                xu,
                "alpha-crown",
                C,
                bound_upper=False,
                alpha_iterations=args.iterations,
                alpha_intermediate=not args.final_only,
                alpha_early_stop=not args.no_early_stop,
                **kw,
            )
            secs[tools[1]] += time.perf_counter() - t0
            for t, lo in zip(tools, (la, res.lower)):
                m = lo.cpu()  # [B, 9] margins y - j
                lbs[t].append(m)
                cert[t] += int((m.min(1).values > 0).sum())
        # the images neither tool certifies: where tightness decides (early stopping does not touch them)
        open_imgs = torch.ones(x.shape[0], dtype=torch.bool)
        for t in tools:
            open_imgs &= torch.cat(lbs[t]).min(1).values <= 0
        for t in tools:
            allm = torch.cat(lbs[t])
            rows.append(
                [path, lm.arch, args.eps, x.shape[0], t, cert[t], float(allm.mean()), _mean(allm[open_imgs]), secs[t]]
            )
        gain = torch.cat(lbs[tools[1]]) - torch.cat(lbs[tools[0]])
        rows.append(
            [
                path,
                lm.arch,
                args.eps,
                x.shape[0],
                "lingraft - auto_LiRPA",
                "",
                float(gain.mean()),
                _mean(gain[open_imgs]),
                "",
            ]
        )
        print(f"{path}: lingraft lb - auto_LiRPA lb per margin: min {gain.min():.4g}, max {gain.max():.4g}", flush=True)
    hdr = [
        "model",
        "arch",
        "eps",
        "n",
        "tool",
        "certified",
        "mean margin lb",
        "mean lb, images neither certifies",
        "time s",
    ]
    print(markdown_table(hdr, rows))
    print(
        f"\ntorch threads: {torch.get_num_threads()}; batch size {args.batch_size}; {args.iterations} iterations; "
        f"lingraft {'final layer only' if args.final_only else 'all layers'}"
        f"{', no early stop' if args.no_early_stop else ''}; lower bounds only"
    )


def _mean(t: torch.Tensor):
    return float(t.mean()) if t.numel() else ""


if __name__ == "__main__":
    main()
