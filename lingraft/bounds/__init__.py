"""lingraft's own bound-propagation engine (IBP, CROWN, alpha-CROWN) with exact grafted neurons."""

from lingraft.bounds.engine import METHODS, BoundedNetwork, BoundResult
from lingraft.spec.margin import margin_spec, input_box

__all__ = ["METHODS", "BoundedNetwork", "BoundResult", "margin_spec", "input_box"]
