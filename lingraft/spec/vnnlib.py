"""VNN-LIB properties and VNN-COMP counterexample files: one import point for the parts.

- :mod:`lingraft.spec.sexpr`: loading the text (plain or gzipped), tokens, S-expressions, :class:`VnnlibError`;
- :mod:`lingraft.spec.vnnlib_parser`: :func:`parse_vnnlib`, the formula -> regions pass (conventions there);
- :mod:`lingraft.spec.property`: the result types :class:`VnnlibProperty`, :class:`Region`,
  :class:`OutputConstraint`;
- :mod:`lingraft.spec.counterexample`: :func:`write_counterexample` / :func:`read_counterexample`.
"""

from __future__ import annotations

# re-exported names (``X as X``): every name that used to live here still imports from here
from lingraft.spec.counterexample import read_counterexample as read_counterexample
from lingraft.spec.counterexample import write_counterexample as write_counterexample
from lingraft.spec.property import OutputConstraint as OutputConstraint
from lingraft.spec.property import Region as Region
from lingraft.spec.property import VnnlibProperty as VnnlibProperty
from lingraft.spec.sexpr import MAX_DEPTH as MAX_DEPTH
from lingraft.spec.sexpr import PathOrText as PathOrText
from lingraft.spec.sexpr import VnnlibError as VnnlibError
from lingraft.spec.vnnlib_parser import MAX_TERMS as MAX_TERMS
from lingraft.spec.vnnlib_parser import parse_vnnlib as parse_vnnlib
