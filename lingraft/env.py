"""The runtime environment: which device to compute on, and the versions every result records."""

from __future__ import annotations

import sys

from lingraft.errors import UsageError


def pick_device(device: str | None = "auto"):
    """'auto' (or None) -> cuda if available else cpu; 'cpu'; 'cuda' / 'cuda:N' (UsageError when CUDA is absent
    or N is out of range). Returns a torch.device."""
    import torch

    spec = str(device or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or (spec.startswith("cuda:") and spec[5:].isdigit()):
        if not torch.cuda.is_available():
            raise UsageError(f"device {device!r} requested but no CUDA device is available; use --device cpu or auto")
        if ":" in spec and int(spec[5:]) >= torch.cuda.device_count():
            raise UsageError(
                f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} CUDA "
                "device(s); use cuda:0 or auto"
            )
        return torch.device(spec)
    raise UsageError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")


def versions() -> dict:
    """Versions that results and checkpoints record: lingraft, torch, numpy, python."""
    import numpy
    import torch

    from lingraft import __version__

    return {
        "lingraft": __version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": sys.version.split()[0],
    }
