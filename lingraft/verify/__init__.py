"""Complete verification (attack + bounds + branch and bound) of VNN-LIB properties, and the VNN-COMP runner.

``python -m lingraft.verify run NET.onnx PROP.vnnlib --timeout 60 --result out.txt`` verifies one instance;
see :mod:`lingraft.verify.__main__` for the other commands.
"""

from lingraft.verify.core import INPUT_SPLIT_MAX_DIM, STATUSES, VerifyResult, verify_property
from lingraft.spec.region import PROVE_TOL
from lingraft.verify.runner import verify_instances, write_result

__all__ = ["INPUT_SPLIT_MAX_DIM", "PROVE_TOL", "STATUSES", "VerifyResult", "verify_property", "verify_instances",
           "write_result"]
