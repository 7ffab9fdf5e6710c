"""lingraft: linearity grafting and bound-propagation certification of neural networks."""

__version__ = "0.1.0"  # the one place the version is written: pyproject.toml reads it (see CHANGELOG.md)
