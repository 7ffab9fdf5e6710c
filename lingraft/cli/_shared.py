"""Helpers shared by the commands' bodies: input checks, JSON / table output, gates, progress, Ray sessions
(the shared click options are in :mod:`lingraft.cli.options`)."""

from __future__ import annotations

import json
import math
import os
import shlex
import sys

import click

from lingraft.env import pick_device, versions  # noqa: F401  (re-exported: the commands' --device and versions)
from lingraft.errors import EXIT_GATE


def command_line() -> str:
    """This process's command line as ``lingraft ARGS`` (shell-quoted), recorded in the files a command writes."""
    return "lingraft " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def ray_cluster(address: str):
    """The Ray session for a --ray value ('local' = start one here), failing in one line without the extra."""
    from lingraft.distributed.ray_backend import ray_session, require_ray
    from lingraft.errors import UsageError

    if address != "local" and os.path.exists(address):  # `--ray FILE`: the file was taken for the address
        raise UsageError(
            f"--ray took {address!r} as the cluster address; put --ray after the arguments, or "
            "write --ray=ADDRESS (no value starts a local cluster)"
        )
    require_ray()
    return ray_session(None if address == "local" else address)


def check_input_file(path, what: str, is_directory: str | None = None, fix: str = "") -> None:
    """Fail at once (before torch is imported) when an input ``path`` given by the user does not exist or is a
    directory; ``what`` names it in the message (e.g. ``"model file"``), ``fix`` is appended to the not-found
    one. ``None`` passes (a default is used)."""
    if path is None:
        return
    from lingraft.config import require_file

    require_file(path, what + " not found: {}" + fix, is_directory or "{} is a directory; pass a file")


def progress_bar(total: int, desc: str, disabled: bool, unit: str = "images"):
    """A :class:`lingraft.cli.progress.Progress`: a tqdm bar on a TTY, a periodic one-line record otherwise."""
    from lingraft.cli.progress import Progress

    return Progress(total, desc, disabled, unit=unit)


def emit_json(obj, dest: str | None):
    """Write obj as JSON to dest ('-' = stdout), atomically for files."""
    if dest is None:
        return
    text = json.dumps(_clean(obj), indent=2) + "\n"
    if dest == "-":
        click.echo(text, nl=False)
    else:
        from lingraft.io.files import atomic_write_text

        atomic_write_text(dest, text)  # a failure is one line naming dest and the real cause (FileWriteError)


def _clean(o):
    if isinstance(o, float) and (math.isnan(o) or math.isinf(o)):
        return None
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def table(rows: list[list], header: list[str]) -> str:
    """Plain aligned text table."""
    cells = [[str(h) for h in header]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(c):
    if isinstance(c, float):
        return f"{c:.4g}" if abs(c) < 1e4 else f"{c:.3e}"
    return str(c)


def gate_fail(*messages: str):
    """Report every failed gate (one ``gate failed:`` line each) and exit 3; no messages: return."""
    for message in messages:
        click.echo(f"gate failed: {message}", err=True)
    if messages:
        sys.exit(EXIT_GATE)
