"""Command-line setup shared by the benchmarks that compare lingraft with auto_LiRPA on MNIST checkpoints."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import torch

from lingraft.compat import auto_lirpa
from lingraft.data.datasets import load_dataset, subset
from lingraft.io.loader import LoadedModel, default_model_path, load_model


def model_args(ap: argparse.ArgumentParser, num_samples: int, eps: float | None, batch_size: int) -> None:
    """--model (repeatable), -n, --eps, --batch-size, --threads."""
    ap.add_argument("--model", action="append", help="checkpoint(s); default: the shipped model")
    ap.add_argument("-n", "--num-samples", type=int, default=num_samples)
    eps_help = "default: the checkpoint's training eps" if eps is None else None
    ap.add_argument("--eps", type=float, default=eps, help=eps_help)
    ap.add_argument("--batch-size", type=int, default=batch_size)
    ap.add_argument("--threads", type=int, default=None)


def models_and_images(args) -> Iterator[tuple[str, LoadedModel, torch.Tensor, torch.Tensor]]:
    """Apply --threads, require auto_LiRPA, then yield (path, model, x [N, *in_shape], y [N]) per --model."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if not auto_lirpa.available():
        raise SystemExit(f"auto_LiRPA unavailable: {auto_lirpa.import_error()}")
    for path in args.model or [str(default_model_path())]:
        lm = load_model(path)
        x, y = subset(*load_dataset(lm.dataset, "test"), args.num_samples)
        yield path, lm, x.reshape(-1, *lm.in_shape), y
