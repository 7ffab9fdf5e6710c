"""The click options the commands share (sqlite-utils style: one decorator per repeated group), the eps type, and
:class:`CommonArgs` / :class:`RayArgs`, the objects the shared groups reach a command as. Helpers for the commands'
bodies are in :mod:`lingraft.cli._shared`; errors are handled once, in :class:`lingraft.cli.main.LingraftGroup`."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, fields
from typing import NamedTuple

import click

from lingraft.cli._shared import emit_json, ray_cluster


@dataclass(frozen=True)
class CommonArgs:
    """The options every command has (:func:`common_options`), passed to it as one ``common`` argument."""

    json_out: str | None
    verbose: int
    quiet: bool
    seed: int
    no_progress: bool
    device: str

    @property
    def bars_off(self) -> bool:
        """No progress bars or records (``--no-progress`` or ``-q``)."""
        return self.no_progress or self.quiet

    @property
    def show(self) -> bool:
        """Print the human-readable output on stdout (not with ``-q``, nor when ``--json -`` owns stdout)."""
        return not self.quiet and self.json_out != "-"

    def log(self, msg: str) -> None:
        """A progress/log line on stderr, unless ``-q``."""
        if not self.quiet:
            click.echo(msg, err=True)

    def emit(self, obj) -> None:
        """Write ``obj`` as the command's JSON result where ``--json`` asks for it (nothing without --json)."""
        if self.json_out:
            emit_json(obj, self.json_out)


class RayArgs(NamedTuple):
    """``--ray ADDRESS --worker-cpus N --worker-gpus G`` (:func:`ray_options`)."""

    address: str
    worker_cpus: int
    worker_gpus: float

    def session(self):
        return ray_cluster(self.address)


def _packed(fn, names: tuple[str, ...], key: str, build):
    """``fn`` called with the click parameters ``names`` replaced by one ``key=build(**their values)``."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        kwargs[key] = build(**{n: kwargs.pop(n) for n in names})
        return fn(*args, **kwargs)

    return wrapper


def _check_out_file(ctx, param, value):
    """Reject output paths that are directories before any work is done."""
    if value and value != "-" and os.path.isdir(value):
        from lingraft.errors import UsageError

        raise UsageError(f"{param.opts[0]} {value} is a directory; give a file name like result.json")
    return value


_COMMON = (
    click.option(
        "--json",
        "json_out",
        metavar="FILE|-",
        default=None,
        callback=_check_out_file,
        help="Also write the full result as JSON to FILE ('-' = stdout instead of the table).",
    ),
    click.option("-v", "--verbose", count=True, show_default=False, help="More detail (repeatable)."),
    click.option("-q", "--quiet", is_flag=True, help="Print only errors (and --json output)."),
    click.option("--seed", type=int, default=0, help="Random seed (attacks, sampling, training)."),
    click.option("--no-progress", is_flag=True, help="No progress bars or periodic progress lines."),
    click.option("--device", default="auto", help="cpu, cuda, or auto (CUDA when present)."),
)


def common_options(fn):
    """--json, -v/-q, --seed, --no-progress, --device, passed to the command as ``common`` (:class:`CommonArgs`)."""
    fn = _packed(fn, tuple(f.name for f in fields(CommonArgs)), "common", CommonArgs)
    return _with_options(fn, _COMMON)


def _ray_args(ray_address, worker_cpus, worker_gpus) -> RayArgs | None:
    return None if ray_address is None else RayArgs(ray_address, worker_cpus, worker_gpus)


_RAY = (
    click.option(
        "--ray",
        "ray_address",
        is_flag=False,
        flag_value="local",
        default=None,
        metavar="[ADDRESS]",
        help="Run on Ray: no value starts a local cluster, 'auto' joins the running one, or give its address "
        "(needs pip install 'lingraft[ray]'). Results and resume files are written by this process only.",
    ),
    click.option(
        "--worker-cpus",
        type=click.IntRange(min=1),
        default=1,
        help="CPUs per Ray task, and torch threads in it (with --ray).",
    ),
    click.option("--worker-gpus", type=click.FloatRange(min=0), default=0, help="GPUs per Ray task (with --ray)."),
)


def ray_options(fn):
    """--ray [ADDRESS], --worker-cpus, --worker-gpus: run the work units as Ray tasks (lingraft[ray]); passed to
    the command as ``ray``: a :class:`RayArgs`, or None without --ray."""
    fn = _packed(fn, ("ray_address", "worker_cpus", "worker_gpus"), "ray", _ray_args)
    return _with_options(fn, _RAY)


def _with_options(fn, options):
    """``fn`` with the click ``options`` added, listed in --help in the order given."""
    for option in reversed(options):  # click lists the last one applied first
        fn = option(fn)
    return fn


def examples(*lines: str, intro: str = "") -> str:
    """A command's epilog: ``intro``, then "Examples:" and one indented command line each (kept as written)."""
    return intro + "Examples:\n\n\b\n" + "\n".join("  " + line for line in lines)


def file_option(*param_decls: str, **kwargs):
    """An option naming a file (click refuses a directory); None when not given (unless required)."""
    return _path_option(click.Path(dir_okay=False), param_decls, kwargs)


def dir_option(*param_decls: str, **kwargs):
    """An option naming a folder (click refuses a file); None when not given (unless required)."""
    return _path_option(click.Path(file_okay=False), param_decls, kwargs)


def _path_option(path_type: click.Path, param_decls, kwargs: dict):
    if not kwargs.get("required"):
        kwargs.setdefault("default", None)
    return click.option(*param_decls, type=path_type, **kwargs)


# MODEL: a .pt checkpoint or an .onnx file, optional (the shipped model), checked by check_input_file
model_argument = click.argument("model", required=False, type=click.Path())


data_dir_option = dir_option("--data-dir", help="Folder with MNIST/CIFAR-10 files.")


def data_options(dataset_default: str | None = None):
    """--dataset and --data-dir. Without ``dataset_default`` the dataset defaults to the checkpoint's."""
    help_ = "mnist, cifar10 or digits" + ("." if dataset_default else " (default: the checkpoint's dataset).")
    dataset = click.option("--dataset", default=dataset_default, help=help_)
    return lambda fn: dataset(data_dir_option(fn))


def csv_option(help: str):
    """--csv FILE (the ``csv_out`` parameter)."""
    return file_option("--csv", "csv_out", help=help)


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
