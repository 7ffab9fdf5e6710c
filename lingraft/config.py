"""YAML config files: loading, key validation, hashing, and feeding values into click as defaults.

Precedence everywhere is: command-line flag > config file > built-in default. Config keys may be written
with dashes or underscores (``batch-size`` == ``batch_size``); they are normalized to underscores, which is
what click uses as parameter names.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable
from fractions import Fraction
from pathlib import Path
from typing import Any

import yaml

from lingraft.errors import LingraftError, UsageError

__all__ = [
    "load_config",
    "normalize_key",
    "normalize_keys",
    "validate_keys",
    "config_hash",
    "canonical_json",
    "click_default_map",
    "config_option",
    "parse_number",
    "parse_eps",
]


class _StrictSafeLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys (plain safe_load silently keeps the last one)."""


def _construct_mapping_no_dups(loader: _StrictSafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # '<<' merge keys are allowed to repeat
            continue
        key = loader.construct_object(key_node, deep=deep)
        try:
            hash(key)
        except TypeError:
            continue  # let the base constructor raise its own (clear) error for unhashable keys
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate key {key!r} (first defined on line {seen[key].start_mark.line + 1})",
                key_node.start_mark,
            )
        seen[key] = key_node
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictSafeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping_no_dups)


def require_file(path: str | os.PathLike, not_found: str, is_directory: str) -> Path:
    """``path`` as a Path when it names an existing non-directory; else LingraftError with the message
    ``not_found`` or ``is_directory``, where ``{}`` stands for the path."""
    p = Path(path)
    if not p.exists():
        raise LingraftError(not_found.format(p))
    if p.is_dir():
        raise LingraftError(is_directory.format(p))
    return p


def parse_number(value: Any, what: str) -> float:
    """A finite float from a number or a string: ``"0.1"``, ``"2/255"`` (an ``A/B`` fraction), ``"1e-3"``.

    The one parser of numbers that may be written as fractions (eps on the command line, in config, sweep and
    compare files). ``what`` names the value in the message, e.g. ``"--eps"`` or ``"'eps' in sweep.yaml"``.
    Raises UsageError (exit 2).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise UsageError(f"{what} is {value!r}, not a number; give e.g. 0.1 or 2/255")
    if isinstance(value, str):
        text = value.replace(" ", "")
        try:
            x = float(Fraction(text)) if "/" in text else float(text)
        except (ValueError, ZeroDivisionError, OverflowError):
            raise UsageError(f"{what} is {value!r}, not a number; give e.g. 0.1 or 2/255") from None
    else:
        x = float(value)
    if not math.isfinite(x):
        raise UsageError(f"{what} is {value!r}; give a finite number such as 0.1 or 2/255")
    return x + 0.0  # -0.0 -> 0.0


def parse_eps(value: Any, what: str = "eps") -> float:
    """A perturbation radius in [0, 1] pixel space (images are scaled to [0, 1]) from a number or ``"A/B"``.

    Raises UsageError naming ``what`` when it is not a finite number, negative, or above 1.
    """
    x = parse_number(value, what)
    if x < 0:
        raise UsageError(f"{what} must be >= 0, got {value}")
    if x > 1:
        raise UsageError(
            f"{what} {value} exceeds the input range [0, 1]: eps is a radius in [0, 1] pixel space"
            + (f" (for {x:g} of 255 grey levels write {x:g}/255)" if x <= 255 else "")
        )
    return x


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def load_config(path: str | os.PathLike) -> dict:
    """Load a YAML config file whose top level is a mapping. An empty file gives ``{}``.

    Raises LingraftError (exit 1, one line) when the file is missing, unreadable, not UTF-8, malformed
    (with ``file:line:col``), has a duplicate key, or its top level is not a mapping.
    """
    p = require_file(
        path, "config file {} not found; check the path", "config path {} is a directory; pass a YAML file"
    )
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LingraftError(f"config file {p} is not UTF-8 text; save it as UTF-8 YAML") from None
    except OSError as e:
        raise LingraftError(f"cannot read config file {p}: {e.strerror or e}; check its permissions") from None
    try:
        data = yaml.load(text, Loader=_StrictSafeLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{p}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(p)
        what = _one_line(e.problem or e.context or "syntax error")
        raise LingraftError(f"malformed YAML at {where}: {what}; fix the file") from None
    except yaml.YAMLError as e:
        raise LingraftError(f"malformed YAML in {p}: {_one_line(e)}; fix the file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LingraftError(
            f"config file {p} must be a mapping of 'key: value' lines at the top level, not a {_yaml_type(data)}"
        )
    return data


def _yaml_type(value: Any) -> str:
    if isinstance(value, list):
        return "list"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return type(value).__name__


def normalize_key(key: str) -> str:
    """``'batch-size'`` -> ``'batch_size'``."""
    return key.replace("-", "_")


def normalize_keys(cfg: dict, where: str = "config") -> dict:
    """Return a copy of ``cfg`` (top level only) with dashes in keys replaced by underscores.

    Raises UsageError for a non-string key or for two keys that collide after normalization.
    """
    out: dict[str, Any] = {}
    original: dict[str, str] = {}
    for key, value in cfg.items():
        if not isinstance(key, str):
            raise UsageError(f"key {key!r} in {where} is not a name; config keys must be words like 'epochs'")
        norm = normalize_key(key)
        if norm in out:
            raise UsageError(f"keys '{original[norm]}' and '{key}' in {where} are the same setting; keep one")
        out[norm] = value
        original[norm] = key
    return out


def validate_keys(cfg: dict, allowed: Iterable[str], where: str) -> None:
    """Raise UsageError (exit 2) naming the first key of ``cfg`` that is not in ``allowed``.

    Dashes and underscores are interchangeable on both sides. The message suggests the closest allowed key
    (written in the user's dash/underscore style), or lists the allowed keys when none is close.
    """
    allowed_norm = {normalize_key(a) for a in allowed}
    normalize_keys(cfg, where)  # type and collision checks
    for key in cfg:
        norm = normalize_key(key)
        if norm in allowed_norm:
            continue
        close = difflib.get_close_matches(norm, sorted(allowed_norm), n=1, cutoff=0.6)
        if close:
            hint = close[0].replace("_", "-") if "-" in key else close[0]
            raise UsageError(f"unknown key '{key}' in {where} (did you mean '{hint}'?)")
        listed = ", ".join(sorted(allowed_norm)) or "none"
        raise UsageError(f"unknown key '{key}' in {where} (allowed keys: {listed})")


def _canonical_default(o: Any) -> Any:
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    if isinstance(o, (set, frozenset)):
        return sorted(o, key=repr)
    item = getattr(o, "item", None)  # numpy / torch scalars
    if callable(item) and getattr(o, "shape", None) == ():
        return item()
    raise TypeError(f"config value of type {type(o).__name__} cannot be hashed; use plain numbers/strings/lists")


def _normalize_floats(o: Any) -> Any:
    """-0.0 -> 0.0 so that two equal configs hash the same; everything else unchanged."""
    if isinstance(o, float) and o == 0.0:
        return 0.0
    if isinstance(o, dict):
        return {k: _normalize_floats(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_normalize_floats(v) for v in o]
    return o


def canonical_json(cfg: Any) -> str:
    """Deterministic JSON text: sorted keys, no whitespace, tuples as lists, ``-0.0`` as ``0.0``.

    NaN/inf are rejected (they have no JSON form and would make equal-looking configs hash apart).
    """
    try:
        return json.dumps(
            _normalize_floats(cfg),
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
            allow_nan=False,
            default=_canonical_default,
        )
    except ValueError as e:
        raise UsageError(
            f"config contains NaN or infinity, which cannot be hashed ({e}); use a finite number"
        ) from None
    except TypeError as e:
        raise UsageError(_one_line(e)) from None


def config_hash(cfg: dict) -> str:
    """First 16 hex chars of the SHA-256 of :func:`canonical_json` (key order does not matter)."""
    return hashlib.sha256(canonical_json(cfg).encode("utf-8")).hexdigest()[:16]


def _param_names(command_params: Any) -> list[str]:
    params = getattr(command_params, "params", None)  # a click.Command was passed
    if params is not None:
        return [p.name for p in params if p.name]
    return [str(n) for n in command_params]


def click_default_map(cfg: dict, command_params: Iterable[str] | Any, *, where: str = "config") -> dict:
    """Turn a config mapping into a click ``default_map`` for one command.

    ``command_params``: the command's parameter names (``param.name``, underscore form), or the
    ``click.Command`` itself. Unknown keys raise UsageError with a did-you-mean. click applies a
    ``default_map`` entry only when the flag is absent, so flags override the file, which overrides defaults.
    Returns ``{param_name: value}``.
    """
    names = _param_names(command_params)
    validate_keys(cfg, names, where)
    return dict(normalize_keys(cfg, where))


def _check_values(ctx: Any, defaults: dict, where: str) -> None:
    """Convert each config value with its option's click type now, so a bad value names the file
    (click would report it as if the flag had been given)."""
    import click

    params = {p.name: p for p in ctx.command.params}
    for name, value in defaults.items():
        param = params.get(name)
        if param is None or value is None:
            continue
        try:
            param.type_cast_value(ctx, value)
        except click.BadParameter as e:
            key = name.replace("_", "-")
            raise UsageError(f"bad value for '{key}' in {where}: {_one_line(e.message)}") from None
        except UsageError as e:
            key = name.replace("_", "-")
            raise UsageError(f"bad value for '{key}' in {where}: {e}") from None


def config_option(
    *param_decls: str,
    help: str = "YAML file with default values for this command's options; flags given on the command line win.",
) -> Callable:
    """A ``--config FILE`` click option that loads the file before the other options are parsed.

    Usage: ``@config_option()`` under ``@click.command()``. Unknown keys fail with did-you-mean (exit 2),
    file problems with exit 1. The ``config`` parameter itself cannot be set from the file.
    """
    import click

    decls = param_decls or ("--config", "config_path")

    def _callback(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
        if value is None:
            return value
        cfg = load_config(value)
        allowed = [n for n in _param_names(ctx.command) if n != param.name]
        defaults = click_default_map(cfg, allowed, where=str(value))
        _check_values(ctx, defaults, str(value))
        # Merge over any default_map given by a parent group; the file is more specific.
        ctx.default_map = {**(ctx.default_map or {}), **defaults}
        return value

    return click.option(
        *decls,
        type=click.Path(dir_okay=False),
        default=None,
        is_eager=True,
        expose_value=True,
        callback=_callback,
        help=help,
    )
