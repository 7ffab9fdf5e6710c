"""Complete verification (attack + bounds + branch and bound) of VNN-LIB properties, and the VNN-COMP runner.

The command line is ``lingraft verify`` (:mod:`lingraft.cli.verify`): ``lingraft verify NET.onnx PROP.vnnlib
--timeout 60 --result out.txt`` verifies one instance, ``--instances instances.csv`` a benchmark folder,
``--prepare`` only loads both files; vnncomp/*.sh call it as ``python -m lingraft.cli.main verify ...``.
"""

from lingraft.spec.region import PROVE_TOL
from lingraft.verify.core import INPUT_SPLIT_MAX_DIM, STATUSES, VerifyResult, verify_property
from lingraft.verify.runner import verify_instances, write_result

__all__ = [
    "INPUT_SPLIT_MAX_DIM",
    "PROVE_TOL",
    "STATUSES",
    "VerifyResult",
    "verify_property",
    "verify_instances",
    "write_result",
]
