"""Markdown table printing shared by the benchmark scripts (run them from the repository root)."""

from __future__ import annotations


def markdown_table(header: list[str], rows: list[list]) -> str:
    """GitHub Markdown: floats with 3 significant digits, everything else as str."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in r) + " |")
    return "\n".join(lines)
