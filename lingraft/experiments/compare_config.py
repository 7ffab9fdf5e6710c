"""What a ``lingraft compare`` file asks for: the validated :class:`CompareSpec` and the hashes that key its steps.

See :mod:`lingraft.experiments.compare` for the file format. :func:`parse_compare` raises UsageError (exit 2)
naming the first problem; :func:`step_hashes` and :func:`unit_key` give every train / graft step and every
certification unit an identity that changes exactly when its result would, so a rerun reuses what is done.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lingraft.bounds.methods import METHODS
from lingraft.config import config_hash, load_config, normalize_keys, parse_eps, parse_number, validate_keys
from lingraft.errors import UsageError
from lingraft.io.files import file_sha256

TOP_KEYS = ("dataset", "eps", "eps_grid", "train", "graft", "certify", "entries", "data_dir")
# run_graft keyword arguments a compare file may set (everything else run_graft takes is fixed by compare)
GRAFT_KEYS = (
    "ratio",
    "epochs",
    "num_train",
    "batch_size",
    "lr",
    "lr_graft",
    "train_eps",
    "rule",
    "scope",
    "gammas",
    "significance",
    "significance_input",
    "score_images",
    "score_bound",
    "init",
)
CERTIFY_KEYS = (
    "num_samples",
    "methods",
    "grid_num_samples",
    "batch_size",
    "pgd_steps",
    "pgd_restarts",
    "alpha_iterations",
)
_METHODS = METHODS
# TrainConfig fields the compare file does not control per entry (set from the top level or the CLI)
_TRAIN_FIXED = ("arch", "dataset", "teacher", "data_dir", "device", "seed")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_HASH_VERSION = 1  # bump when the meaning of a stored step changes, so old results are not reused


@dataclass
class Entry:
    """One baseline: ``train`` are its TrainConfig keyword arguments (without arch/dataset/teacher/seed/device).

    ``teacher`` is another entry's name (``teacher_entry`` True) or an absolute checkpoint path.
    """

    name: str
    arch: str
    train: dict
    teacher: str | None = None
    teacher_entry: bool = False


@dataclass
class CompareSpec:
    """A validated compare file. ``entries`` are in training order (every teacher before its students)."""

    dataset: str
    eps: float
    eps_grid: list[float]
    graft: dict
    certify: dict
    entries: list[Entry]
    data_dir: str | None = None
    source: str = "<dict>"

    def entry(self, name: str) -> Entry:
        return next(e for e in self.entries if e.name == name)


# ----------------------------------------------------------------------------------------------- parsing


def _number(value: Any, what: str) -> float:
    """A finite float from a YAML number or an ``"a/b"`` string (:func:`lingraft.config.parse_number`)."""
    return parse_number(value, what)


def _eps(value: Any, what: str) -> float:
    x = parse_eps(value, what)
    if x == 0:
        raise UsageError(f"{what} is 0; eps must be in (0, 1] (pixel space, e.g. 0.1 or 8/255)")
    return x


def _mapping(value: Any, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UsageError(f"'{what}' must be a mapping like {{key: value}}, got {type(value).__name__}")
    return value


def check_choice(value: str, options, what: str) -> str:
    """``value`` if it is one of ``options``, else UsageError with a did-you-mean (``what`` names the setting)."""
    if value not in options:
        close = difflib.get_close_matches(str(value), list(options), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UsageError(f"unknown {what} {value!r}{hint}; use one of: {', '.join(options)}")
    return value


def _train_fields() -> list[str]:
    from lingraft.train.loop import TrainConfig

    return [f.name for f in dataclasses.fields(TrainConfig) if f.name not in _TRAIN_FIXED]


def load_compare(path) -> CompareSpec:
    """Read and validate a compare YAML file; relative paths (teachers, data_dir) resolve against its folder."""
    p = Path(path)
    return parse_compare(load_config(p), base_dir=p.resolve().parent, where=str(p))


def parse_compare(cfg: dict, *, base_dir=None, where: str = "compare config") -> CompareSpec:
    """Validate a compare mapping (see :mod:`lingraft.experiments.compare`). UsageError (exit 2) names the first
    problem."""
    from lingraft.data.datasets import dataset_info

    base = Path(base_dir) if base_dir is not None else Path.cwd()
    validate_keys(cfg, TOP_KEYS, where)
    cfg = normalize_keys(cfg, where)
    for req in ("dataset", "eps", "entries"):
        if req not in cfg:
            raise UsageError(f"{where} needs '{req}'")
    dataset = dataset_info(str(cfg["dataset"])).name
    eps = _eps(cfg["eps"], f"'eps' in {where}")
    grid_raw = cfg.get("eps_grid", [eps])
    grid_raw = grid_raw if isinstance(grid_raw, list) else [grid_raw]
    grid = sorted({_eps(v, f"'eps_grid' in {where}") for v in grid_raw})
    if not grid:
        raise UsageError(f"'eps_grid' in {where} is empty; list at least one eps or remove the key")

    train_fields = _train_fields()
    shared = _mapping(cfg.get("train"), "train")
    validate_keys(shared, train_fields, f"'train' of {where}")
    shared = normalize_keys(shared, "train")
    graft = _parse_graft(cfg.get("graft"), where)
    cert = _parse_certify(cfg.get("certify"), where)

    data_dir = cfg.get("data_dir")
    if data_dir is not None:
        data_dir = str((base / str(data_dir)).resolve())

    entries = _parse_entries(cfg["entries"], shared, train_fields, dataset, eps, where)
    names = [x.name for x in entries]
    for x in entries:
        _check_loss(x, names, base, where)
    return CompareSpec(
        dataset=dataset,
        eps=eps,
        eps_grid=grid,
        graft=graft,
        certify=cert,
        entries=_training_order(entries),
        data_dir=data_dir,
        source=where,
    )


def _parse_graft(value: Any, where: str) -> dict:
    """The ``graft`` mapping: run_graft options, numbers checked (ratio in [0, 1], train_eps a valid eps)."""
    graft = _mapping(value, "graft")
    validate_keys(graft, GRAFT_KEYS, f"'graft' of {where}")
    graft = normalize_keys(graft, "graft")
    if "gammas" in graft:
        graft["gammas"] = [
            _number(g, "graft gammas")
            for g in (graft["gammas"] if isinstance(graft["gammas"], list) else [graft["gammas"]])
        ]
    ratio = _number(graft.get("ratio", 0.5), "graft ratio")
    if not 0 <= ratio <= 1:
        raise UsageError(f"graft ratio must be in [0, 1], got {ratio}")
    graft["ratio"] = ratio
    if "train_eps" in graft:
        graft["train_eps"] = _eps(graft["train_eps"], "graft train_eps")
    return graft


def _parse_certify(value: Any, where: str) -> dict:
    """The ``certify`` mapping with every default filled in (methods deduplicated, counts checked)."""
    cert = _mapping(value, "certify")
    validate_keys(cert, CERTIFY_KEYS, f"'certify' of {where}")
    cert = normalize_keys(cert, "certify")
    methods = cert.get("methods", ["crown", "alpha-crown"])
    methods = [str(m).strip().lower() for m in (methods if isinstance(methods, list) else str(methods).split(","))]
    if not methods:
        raise UsageError(f"'certify.methods' in {where} is empty; list e.g. [crown, alpha-crown]")
    for m in methods:
        check_choice(m, _METHODS, "certify method")
    cert["methods"] = list(dict.fromkeys(methods))
    for key, default, low in (
        ("num_samples", 200, 1),
        ("batch_size", 32, 1),
        ("pgd_steps", 20, 0),
        ("pgd_restarts", 1, 1),
        ("alpha_iterations", 20, 1),
    ):
        v = cert.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise UsageError(f"certify {key} must be an integer >= {low}, got {v!r}")
        cert[key] = v
    g = cert.get("grid_num_samples", cert["num_samples"])
    if isinstance(g, bool) or not isinstance(g, int) or g < 1:
        raise UsageError(f"certify grid_num_samples must be an integer >= 1, got {g!r}")
    cert["grid_num_samples"] = g
    return cert


def _parse_entries(
    raw: Any, shared: dict, train_fields: Iterable[str], dataset: str, eps: float, where: str
) -> list[Entry]:
    """The ``entries`` list in file order; each entry's train options are the shared ones overridden by its own
    (its train eps defaults to the certification eps). Teachers are resolved later (:func:`_check_loss`)."""
    from lingraft.models import list_models
    from lingraft.train.loop import TrainConfig

    if not isinstance(raw, list) or not raw:
        raise UsageError(f"'entries' in {where} must be a non-empty list of {{name: ..., arch: ...}} mappings")
    entry_keys = ["name", "arch", "teacher", "train_eps"] + [f for f in train_fields if f != "eps"]
    models = list_models()
    entries: list[Entry] = []
    for i, e in enumerate(raw):
        if not isinstance(e, dict):
            raise UsageError(f"entry {i + 1} in {where} must be a mapping like {{name: ce, arch: cnn-b}}")
        label = f"entry {e.get('name', i + 1)!r} of {where}"
        validate_keys(e, entry_keys, label)
        e = normalize_keys(e, label)
        name = e.get("name")
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise UsageError(f"{label} needs a 'name' of letters, digits, '-', '_' or '.' (it names a folder)")
        if any(x.name == name for x in entries):
            raise UsageError(f"entry name {name!r} appears twice in {where}; names must be unique")
        arch = e.get("arch")
        if arch is None:
            raise UsageError(f"{label} needs 'arch' (one of: {', '.join(models)})")
        check_choice(str(arch), models, f"arch in {label}:")
        kw = dict(shared)
        kw.update({k: v for k, v in e.items() if k not in ("name", "arch", "teacher", "train_eps")})
        if "train_eps" in e:
            kw["eps"] = _eps(e["train_eps"], f"train_eps of {label}")
        elif "eps" not in kw:
            kw["eps"] = eps
        TrainConfig(arch=str(arch), dataset=dataset, **kw)  # value checks (method, optimizer, ...)
        entries.append(Entry(name, str(arch), kw, e.get("teacher")))
    return entries


def _check_loss(x: Entry, names: list[str], base: Path, where: str) -> None:
    """Validate the loss name and resolve the teacher (entry name or checkpoint path)."""
    from lingraft.train import losses

    loss = str(x.train.get("loss", "ce"))
    check_choice(loss, list(losses.LOSSES), f"loss in entry {x.name!r}:")
    needs = losses.needs_teacher(loss)
    t = x.teacher
    if t is None:
        if needs:
            raise UsageError(
                f"entry {x.name!r}: loss {loss!r} needs a teacher; add 'teacher: ENTRY_NAME' or a checkpoint path"
            )
        return
    if not needs:
        raise UsageError(
            f"entry {x.name!r} sets a teacher but loss {loss!r} does not use one; "
            "remove 'teacher' or use loss kd or nkd"
        )
    if not isinstance(t, str) or not t.strip():
        raise UsageError(f"entry {x.name!r}: teacher must be an entry name or a checkpoint path, got {t!r}")
    if t in names:
        x.teacher, x.teacher_entry = t, True
        return
    looks_like_path = "/" in t or "\\" in t or Path(t).suffix.lower() in (".pt", ".pth", ".ckpt")
    if looks_like_path:
        p = (base / t).resolve()
        if not p.is_file():
            raise UsageError(f"entry {x.name!r}: teacher checkpoint {p} not found; fix the path or name an entry")
        x.teacher, x.teacher_entry = str(p), False
        return
    close = difflib.get_close_matches(t, names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise UsageError(
        f"entry {x.name!r}: unknown teacher {t!r}{hint}; name another entry "
        f"({', '.join(names)}) or give a checkpoint path"
    )


def _training_order(entries: list[Entry]) -> list[Entry]:
    """Depth-first topological order over teacher links (file order otherwise); UsageError on a cycle."""
    by = {e.name: e for e in entries}
    order: list[Entry] = []
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(e: Entry, stack: list[str]) -> None:
        if state.get(e.name) == 2:
            return
        if state.get(e.name) == 1:
            cyc = stack[stack.index(e.name) :] + [e.name]
            raise UsageError(f"teacher cycle {' -> '.join(cyc)}; an entry cannot (indirectly) teach itself")
        state[e.name] = 1
        if e.teacher_entry:
            visit(by[e.teacher], stack + [e.name])
        state[e.name] = 2
        order.append(e)

    for e in entries:
        visit(e, [])
    return order


# ----------------------------------------------------------------------------------------------- hashing


def step_hashes(spec: CompareSpec, seed: int) -> dict[str, dict[str, str]]:
    """{entry: {"train": hash, "graft": hash}}; a student's train hash includes its teacher's."""
    out: dict[str, dict[str, str]] = {}
    for e in spec.entries:  # training order: teachers first
        if e.teacher is None:
            teacher = None
        elif e.teacher_entry:
            teacher = out[e.teacher]["train"]
        else:
            teacher = file_sha256(e.teacher)[:16]
        th = config_hash(
            {
                "v": _HASH_VERSION,
                "arch": e.arch,
                "dataset": spec.dataset,
                "train": e.train,
                "teacher": teacher,
                "seed": seed,
            }
        )
        gh = config_hash({"v": _HASH_VERSION, "parent": th, "graft": spec.graft, "eps": spec.eps, "seed": seed})
        out[e.name] = {"train": th, "graft": gh}
    return out


def unit_key(model_hash: str, eps: float, method: str, num_samples: int, spec: CompareSpec, seed: int) -> str:
    """Identity of one certification unit: the model's step hash plus everything certify() depends on."""
    keys = ("batch_size", "pgd_steps", "pgd_restarts") + (("alpha_iterations",) if method == "alpha-crown" else ())
    opts = {k: spec.certify[k] for k in keys}
    return config_hash(
        {
            "v": _HASH_VERSION,
            "model": model_hash,
            "eps": eps,
            "method": method,
            "n": num_samples,
            "dataset": spec.dataset,
            "opts": opts,
            "seed": seed,
        }
    )


def certify_units(spec: CompareSpec, hashes: dict, entry: str, seed: int) -> list[dict]:
    """Every certification unit of one entry: main (eps x methods) and grid (eps_grid x crown), deduplicated."""
    out: dict[str, dict] = {}
    c = spec.certify
    for variant in ("plain", "grafted"):
        mh = hashes[entry]["train" if variant == "plain" else "graft"]
        todo = [(spec.eps, m, c["num_samples"]) for m in c["methods"]]
        todo += [(e, "crown", c["grid_num_samples"]) for e in spec.eps_grid]
        for eps, method, n in todo:
            k = unit_key(mh, eps, method, n, spec, seed)
            out.setdefault(
                k, {"unit": k, "entry": entry, "variant": variant, "eps": eps, "method": method, "num_samples": n}
            )
    return list(out.values())
