"""Compatibility shims for optional third-party tools (auto_LiRPA); imported only on demand."""
