"""lingraft checkpoints: a torch.save'd dict, always read back with ``weights_only=True``.

Format (``format_version`` 1)::

    {"format": "lingraft-checkpoint", "format_version": 1,
     "arch": "cnn-b", "arch_kwargs": {"in_shape": [1, 28, 28], "num_classes": 10, "mean": [..], "std": [..]},
     "dataset": "mnist", "state_dict": {...},
     "grafted": {"3": [32, 14, 14], ...},          # module name -> GraftedReLU shape
     "meta": {...JSON-able: config, metrics, command line...}}

Next to ``model.pt`` a sidecar ``model.json`` holds everything except the weights, plus the lingraft version and
the sha256 of the ``.pt`` file, so a checkpoint can be inspected (and verified) without torch.

Integrity and crash safety. The ``.pt`` is authoritative: it holds all the metadata itself, and loading never
takes anything from the sidecar. The sidecar is derived data that is trusted only while its ``sha256`` matches
the ``.pt``. :func:`save_checkpoint` writes, in this order: (1) the new ``.pt`` to a temp file, synced;
(2) the sidecar, atomically, with the sha256 of that temp file and ``previous_sha256``, the sha256 of the
``.pt`` it is about to replace (when that one matched its own sidecar); (3) the rename of the temp file over
``model.pt``. A kill before (2) leaves the old pair intact (plus a temp file, removed by the next write of
``model.pt``); a kill between (2) and (3) leaves the old ``.pt`` beside a sidecar whose ``previous_sha256`` is that
``.pt``'s hash: :func:`load_checkpoint` recognizes this, loads the old checkpoint with its own metadata, warns,
and rewrites the sidecar from it; after (3) the pair is consistent. Any other mismatch (flipped bytes, a ``.pt``
replaced by hand) is an error naming the file; a ``.pt`` without a sidecar (or beside a JSON file that is not a
lingraft sidecar) loads unchecked. So a kill at any point never yields silently wrong metadata.
"""

from __future__ import annotations

import json
import os
import pickle
import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn

from lingraft import __version__
from lingraft.errors import LingraftError, UsageError
from lingraft.io.files import _json_default, atomic_write, atomic_write_json, file_sha256
from lingraft.models.layers import GraftedReLU, first_non_binary, is_binary_mask

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "save_checkpoint",
    "load_checkpoint",
    "replace_module",
    "sidecar_path",
    "grafted_modules",
]

FORMAT = "lingraft-checkpoint"
FORMAT_VERSION = 1


def sidecar_path(path) -> Path:
    """The JSON sidecar of checkpoint ``path`` (``model.pt`` -> ``model.json``)."""
    return Path(path).with_suffix(".json")


def grafted_modules(model: nn.Module) -> dict[str, list[int]]:
    """{module name: shape} of every :class:`GraftedReLU` inside ``model``."""
    return {name: [int(s) for s in m.shape] for name, m in model.named_modules() if isinstance(m, GraftedReLU)}


def _plain(obj):
    """JSON round trip: tuples -> lists, tensors/numpy -> lists; raises TypeError on anything else."""
    return json.loads(json.dumps(obj, default=_json_default))


def save_checkpoint(path, model: nn.Module, *, arch: str, arch_kwargs: dict, dataset: str, meta: dict) -> None:
    """Write ``model`` to ``path`` atomically, plus the JSON sidecar (see module docstring).

    ``arch_kwargs`` must rebuild the un-grafted network with ``lingraft.models.create_model(arch, **arch_kwargs)``;
    grafted layers are recorded from the model itself.
    """
    path = Path(path)
    if path.suffix == ".json":
        raise UsageError(f"checkpoint path {path} ends in .json, which is the sidecar's name; use e.g. .pt")
    try:
        arch_kwargs = _plain(dict(arch_kwargs))
        meta = _plain(dict(meta or {}))
    except TypeError as e:
        raise UsageError(f"checkpoint arch_kwargs/meta must be JSON-serializable ({e})") from None
    ckpt = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": str(arch),
        "arch_kwargs": arch_kwargs,
        "dataset": str(dataset),
        # clone: a view into a larger storage would otherwise save the whole storage
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "grafted": grafted_modules(model),
        "meta": meta,
    }
    previous = _verified_sha256(path)

    def write_sidecar(tmp: Path) -> None:  # runs after the temp .pt is synced, before it is renamed
        atomic_write_json(sidecar_path(path), _sidecar(ckpt, path, file_sha256(tmp), previous))

    atomic_write(path, lambda f: torch.save(ckpt, f), before_replace=write_sidecar)


def _sidecar(ckpt: dict, path: Path, sha256: str, previous_sha256: str | None) -> dict:
    side = {k: v for k, v in ckpt.items() if k != "state_dict"}
    side["lingraft_version"] = __version__
    side["checkpoint_file"] = path.name
    side["sha256"] = sha256
    side["previous_sha256"] = previous_sha256
    return side


def _read_sidecar(path: Path) -> dict | None:
    """The lingraft sidecar next to checkpoint ``path``, or None when there is none (a JSON file there that is not
    a lingraft sidecar, e.g. a certify result written as ``--json model.json``, does not count)."""
    side = sidecar_path(path)
    if side == path:
        return None
    try:
        d = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) and d.get("format") == FORMAT else None


def _verified_sha256(path: Path) -> str | None:
    """sha256 of the existing ``path`` if it is safe to name as ``previous_sha256`` (it matches its sidecar, or
    has none), else None, so that an interrupted save can never make a damaged old file look intact."""
    if not path.is_file():
        return None
    try:
        sha = file_sha256(path)
    except OSError:
        return None
    side = _read_sidecar(path)
    if side is not None and side.get("sha256") != sha:
        return None
    return sha


def _check_sidecar(path: Path) -> dict | None:
    """Compare checkpoint ``path`` with its sidecar before anything is unpickled. Returns the sidecar when it is
    stale from an interrupted save (the ``.pt`` is the previous, intact checkpoint), else None; raises
    LingraftError when the bytes do not match."""
    side = _read_sidecar(path)
    if side is None:
        return None
    recorded = side.get("sha256")
    sp = sidecar_path(path)
    if not isinstance(recorded, str):
        warnings.warn(
            f"sidecar {sp} records no sha256, so {path} cannot be checked against it; re-save the "
            "checkpoint to rewrite it",
            stacklevel=3,
        )
        return None
    try:
        actual = file_sha256(path)
    except OSError as e:
        raise LingraftError(f"cannot read checkpoint {path} ({e.strerror}); check its permissions") from None
    if actual == recorded:
        return None
    if actual == side.get("previous_sha256"):
        return side
    raise LingraftError(
        f"checkpoint {path} does not match its sidecar {sp.name} (sha256 {actual[:12]}..., the sidecar records "
        f"{recorded[:12]}...): the .pt is corrupted or was replaced; re-copy both files or re-create the "
        f"checkpoint (if you replaced the .pt on purpose, delete {sp})"
    )


def _rewrite_stale_sidecar(path: Path, ckpt: dict) -> None:
    sp = sidecar_path(path)
    what = (
        f"{sp} belongs to a save of {path.name} that was interrupted before the .pt was replaced; loaded "
        f"{path}, the previous intact checkpoint, with its own metadata"
    )
    try:
        atomic_write_json(sp, _sidecar(ckpt, path, file_sha256(path), None))
    except (OSError, LingraftError) as e:
        warnings.warn(f"{what}; could not rewrite the sidecar ({e}): delete it or re-save the checkpoint", stacklevel=3)
        return
    warnings.warn(f"{what}, and rewrote the sidecar to match", stacklevel=3)


def replace_module(model: nn.Module, name: str, new_module: nn.Module) -> None:
    """Replace the submodule called ``name`` (as in ``named_modules``: "3", "block1.relu1") by ``new_module``."""
    parent_name, _, child = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
    except AttributeError:
        raise LingraftError(f"model has no submodule {parent_name!r} (needed to replace {name!r})") from None
    if not child or child not in parent._modules:
        raise LingraftError(f"model has no submodule {name!r} to replace")
    setattr(parent, child, new_module)


def _torch_load(path: Path, map_location):
    """torch.load with weights_only=True, mapping every failure to one clear line; the file is first checked
    against its sidecar. Returns (the loaded object, the sidecar if it is stale from an interrupted save)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise LingraftError(f"checkpoint {path} not found; check the path or train one with 'lingraft train'") from None
    except OSError as e:
        raise LingraftError(f"cannot read checkpoint {path} ({e.strerror}); check its permissions") from None
    if path.is_dir():
        raise LingraftError(f"checkpoint {path} is a directory; pass the .pt file")
    if size == 0:
        raise LingraftError(f"checkpoint {path} is empty (0 bytes; an interrupted copy?); re-create or re-copy it")
    with open(path, "rb") as f:
        head = f.read(4)
    is_zip = head[:2] == b"PK"
    if not is_zip and head[:1] != b"\x80":  # neither torch's zip format nor a (legacy) pickle stream
        raise LingraftError(f"checkpoint {path} is not a PyTorch file; pass a .pt written by 'lingraft train'")
    stale = _check_sidecar(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": we report failures ourselves
            return torch.load(path, map_location=map_location, weights_only=True), stale
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "Weights only load failed" in msg or "Unsupported" in msg or "global" in msg.lower():
            raise LingraftError(
                f"checkpoint {path} contains pickled objects or code that safe loading (weights_only) refuses; "
                "lingraft never runs code from a checkpoint: re-save the weights with lingraft.io.checkpoint."
                "save_checkpoint"
            ) from None
        raise LingraftError(
            f"checkpoint {path} is not a PyTorch file or is corrupted; re-create or re-copy it"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, KeyError) as e:
        if is_zip or isinstance(e, EOFError):
            raise LingraftError(
                f"checkpoint {path} is truncated or corrupted ({type(e).__name__}); re-create or re-copy it"
            ) from None
        raise LingraftError(
            f"checkpoint {path} is not a PyTorch file; pass a .pt written by 'lingraft train'"
        ) from None


def load_checkpoint(path, map_location="cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model saved by :func:`save_checkpoint`.

    Returns (model in eval mode, the checkpoint dict without ``state_dict``). Never executes pickled code.
    """
    path = Path(os.fspath(path))
    ckpt, stale_sidecar = _torch_load(path, map_location)
    _check_format(path, ckpt)
    model = _build_model(path, ckpt)
    state = ckpt["state_dict"]
    _check_weights(path, ckpt, model.state_dict())
    model.load_state_dict(state, strict=True)
    if isinstance(map_location, (str, torch.device)):
        model.to(map_location)  # buffers created by the constructor (e.g. GraftedReLU masks) follow too
    model.eval()
    info = {k: v for k, v in ckpt.items() if k != "state_dict"}
    if stale_sidecar is not None:
        _rewrite_stale_sidecar(path, ckpt)  # warns with stacklevel=3: must be called from here
    return model, info


def _check_format(path: Path, ckpt) -> None:
    """LingraftError unless ``ckpt`` (what ``path`` unpickled to) is a lingraft checkpoint dict this version reads,
    with its arch, arch_kwargs and state_dict entries."""
    if not isinstance(ckpt, dict):
        raise LingraftError(
            f"{path} holds a {type(ckpt).__name__}, not a lingraft checkpoint; "
            "re-save the model with lingraft.io.checkpoint.save_checkpoint"
        )
    if ckpt.get("format") != FORMAT:
        if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            first = next(iter(ckpt))
            raise LingraftError(
                f"{path} is a bare state_dict ({len(ckpt)} tensors, e.g. {first!r}), not a lingraft checkpoint; "
                "load it into create_model(ARCH, ...) and save with lingraft.io.checkpoint.save_checkpoint, "
                "or export the network to ONNX"
            )
        raise LingraftError(
            f"{path} is not a lingraft checkpoint (no format '{FORMAT}'; keys: "
            f"{', '.join(map(str, list(ckpt)[:5]))}); pass a .pt written by 'lingraft train'"
        )
    version = ckpt.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise LingraftError(
            f"{path} has checkpoint format version {version!r}, newer than this lingraft supports "
            f"({FORMAT_VERSION}); upgrade lingraft"
        )
    for key in ("arch", "arch_kwargs", "state_dict"):
        if key not in ckpt:
            raise LingraftError(f"{path} lacks the '{key}' entry; the checkpoint is damaged, re-create it")


def _build_model(path: Path, ckpt: dict) -> nn.Module:
    """The checkpoint's architecture with its grafted layers in place, with fresh (not yet loaded) weights."""
    from lingraft.models import create_model, list_models

    arch = ckpt["arch"]
    if arch not in list_models():
        raise LingraftError(
            f"{path} was saved from architecture {arch!r}, which this lingraft does not know "
            f"(available: {', '.join(list_models())}); use the lingraft version that wrote it"
        )
    try:
        model = create_model(arch, **ckpt["arch_kwargs"])
    except (TypeError, ValueError, LingraftError) as e:
        raise LingraftError(
            f"{path}: cannot build {arch!r} from its arch_kwargs ({e}); the checkpoint is damaged"
        ) from None
    for name, shape in (ckpt.get("grafted") or {}).items():
        replace_module(model, name, GraftedReLU(shape))
    return model


def _check_weights(path: Path, ckpt: dict, expected: dict) -> None:
    """LingraftError unless the checkpoint's state_dict fits ``expected`` (the built model's state_dict): the same
    keys, the same shapes, and 0/1 masks in its grafted layers."""
    arch, state = ckpt["arch"], ckpt["state_dict"]
    for name in ckpt.get("grafted") or {}:
        m = state.get(f"{name}.mask")
        if isinstance(m, torch.Tensor) and not is_binary_mask(m):
            raise LingraftError(
                f"{path}: GraftedReLU {name!r} mask holds values other than 0/1 (e.g. {first_non_binary(m):g}); "
                "a mask marks each neuron grafted (1) or not (0), so the checkpoint is damaged or was edited: "
                "re-create it with 'lingraft graft' (or round the mask to 0/1 and re-save)"
            )
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}" + (" ..." if len(missing) > 3 else ""))
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:3])}" + (" ..." if len(unexpected) > 3 else ""))
        raise LingraftError(
            f"{path}: weights do not match architecture {arch!r} ({'; '.join(parts)}); "
            "the checkpoint is damaged or was edited"
        )
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise LingraftError(
                f"{path}: weight {k!r} has shape {list(state[k].shape)} but {arch!r} needs "
                f"{list(v.shape)}; the checkpoint is damaged or was edited"
            )
