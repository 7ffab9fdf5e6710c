"""lingraft's own bound-propagation engine (IBP, CROWN, alpha-CROWN) with exact grafted neurons."""

from .engine import METHODS, BoundedNetwork, BoundResult
from .spec import margin_spec, input_box

__all__ = ["METHODS", "BoundedNetwork", "BoundResult", "margin_spec", "input_box"]
