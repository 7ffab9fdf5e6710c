"""Shared click options and output helpers for every command (errors are handled once, in
:class:`lingraft.cli.main.LingraftGroup`)."""

from __future__ import annotations

import json
import math
import os
import sys

import click

from lingraft.env import pick_device, versions  # noqa: F401  (re-exported: the commands' --device and versions)
from lingraft.errors import EXIT_GATE


def common_options(fn):
    """-v/-q, --seed, --no-progress, --device."""
    fn = click.option("--device", default="auto", show_default=True, help="cpu, cuda, or auto (CUDA when present).")(fn)
    fn = click.option("--no-progress", is_flag=True, help="No progress bars or periodic progress lines.")(fn)
    fn = click.option(
        "--seed", type=int, default=0, show_default=True, help="Random seed (attacks, sampling, training)."
    )(fn)
    fn = click.option("-q", "--quiet", is_flag=True, help="Print only errors (and --json output).")(fn)
    fn = click.option("-v", "--verbose", count=True, help="More detail (repeatable).")(fn)
    return fn


def ray_options(fn):
    """--ray [ADDRESS], --worker-cpus, --worker-gpus: run the work units as Ray tasks (lingraft[ray])."""
    fn = click.option(
        "--worker-gpus",
        type=click.FloatRange(min=0),
        default=0,
        show_default=True,
        help="GPUs per Ray task (with --ray).",
    )(fn)
    fn = click.option(
        "--worker-cpus",
        type=click.IntRange(min=1),
        default=1,
        show_default=True,
        help="CPUs per Ray task, and torch threads in it (with --ray).",
    )(fn)
    fn = click.option(
        "--ray",
        "ray_address",
        is_flag=False,
        flag_value="local",
        default=None,
        metavar="[ADDRESS]",
        help="Run on Ray: no value starts a local cluster, 'auto' joins the running one, or give its address "
        "(needs pip install 'lingraft[ray]'). Results and resume files are written by this process only.",
    )(fn)
    return fn


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


def _check_out_file(ctx, param, value):
    """Reject output paths that are directories before any work is done."""
    if value and value != "-" and os.path.isdir(value):
        from lingraft.errors import UsageError

        raise UsageError(f"{param.opts[0]} {value} is a directory; give a file name like result.json")
    return value


class EpsType(click.ParamType):
    """An eps flag: a number or an ``A/B`` fraction (``2/255``) in [0, 1] pixel space, read by
    :func:`lingraft.config.parse_eps` (the same parser as config, sweep and compare files)."""

    name = "eps"

    def get_metavar(self, param, ctx=None):
        return "EPS"

    def convert(self, value, param, ctx):
        from lingraft.config import parse_eps
        from lingraft.errors import UsageError

        try:
            return parse_eps(value, "eps")
        except UsageError as e:
            self.fail(str(e), param, ctx)


EPS = EpsType()


def check_input_file(path, what: str, is_directory: str | None = None, fix: str = "") -> None:
    """Fail at once (before torch is imported) when an input ``path`` given by the user does not exist or is a
    directory; ``what`` names it in the message (e.g. ``"model file"``), ``fix`` is appended to the not-found
    one. ``None`` passes (a default is used)."""
    if path is None:
        return
    from lingraft.config import require_file

    require_file(path, what + " not found: {}" + fix, is_directory or "{} is a directory; pass a file")


def json_option(fn):
    return click.option(
        "--json",
        "json_out",
        metavar="FILE|-",
        default=None,
        callback=_check_out_file,
        help="Also write the full result as JSON to FILE ('-' = stdout instead of the table).",
    )(fn)


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
