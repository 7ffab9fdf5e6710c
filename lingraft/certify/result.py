"""The JSON result of ``lingraft certify``: its schema version and fields, and reading one back.

A result is ``{"schema_version", "command": "certify", "config": {CONFIG_FIELDS}, "config_hash", "versions",
"device"}`` plus every field of :class:`lingraft.certify.pipeline.CertifyReport` (``to_dict()``).
"""

from __future__ import annotations

import json
from pathlib import Path

from lingraft.certify.pipeline import CertifyReport
from lingraft.config import config_hash
from lingraft.errors import LingraftError

SCHEMA_VERSION = 1

#: the run settings a result records under "config", in this order
CONFIG_FIELDS = (
    "model",
    "dataset",
    "eps",
    "norm",
    "method",
    "num_samples",
    "offset",
    "batch_size",
    "pgd_steps",
    "pgd_restarts",
    "seed",
    "timeout",
    "bab_timeout",
    "alpha_iterations",
    "alpha_scope",
)


def certify_config(**fields) -> dict:
    """The "config" of a result: exactly the keys of CONFIG_FIELDS (ValueError otherwise), in that order."""
    if set(fields) != set(CONFIG_FIELDS):
        raise ValueError(f"certify config needs the fields {CONFIG_FIELDS}, got {tuple(fields)}")
    return {k: fields[k] for k in CONFIG_FIELDS}


def resume_settings(config: dict, model_sha256: str | None, data_dir: str | None) -> dict:
    """What the results of a resumable run depend on: the config but its time budget, the model by content
    (sha256, None when not a file) rather than by path, and the resolved data folder."""
    settings = {k: v for k, v in config.items() if k != "timeout"}
    settings["model_sha256"] = model_sha256
    settings["data_dir"] = None if data_dir is None else str(Path(data_dir).resolve())
    return settings


def certify_result(report: CertifyReport, config: dict, versions: dict, device: str) -> dict:
    """The JSON result of one run: its config (see :func:`certify_config`), the environment and the report."""
    return {
        "schema_version": SCHEMA_VERSION,
        "command": "certify",
        "config": config,
        "config_hash": config_hash(config),
        "versions": versions,
        "device": device,
        **report.to_dict(),
    }


def load_certified_acc(path) -> float:
    """The certified accuracy recorded in a stored certify result (a regression baseline)."""
    p = Path(path)
    try:
        d = json.loads(p.read_text())
        return float(d["certified_acc"])
    except FileNotFoundError:
        raise LingraftError(f"baseline file not found: {p}") from None
    except (ValueError, KeyError, TypeError):
        raise LingraftError(
            f"baseline {p} is not a lingraft certify JSON result (needs 'certified_acc'); "
            "write one with 'lingraft certify ... --json FILE'"
        ) from None
