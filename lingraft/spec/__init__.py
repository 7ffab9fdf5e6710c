"""Property specifications: the VNN-LIB parser and VNN-COMP counterexample files."""

from lingraft.spec.vnnlib import (
    OutputConstraint,
    Region,
    VnnlibError,
    VnnlibProperty,
    parse_vnnlib,
    read_counterexample,
    write_counterexample,
)

__all__ = [
    "OutputConstraint",
    "Region",
    "VnnlibError",
    "VnnlibProperty",
    "parse_vnnlib",
    "read_counterexample",
    "write_counterexample",
]
