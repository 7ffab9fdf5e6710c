"""lingraft: linearity grafting and bound-propagation certification of neural networks."""

__version__ = "0.1.0"
