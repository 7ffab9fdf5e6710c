#!/usr/bin/env python
"""Write docs/cli.md from the ``--help`` text of ``lingraft`` and every subcommand.

    python scripts/gen_cli_docs.py           # regenerate docs/cli.md
    python scripts/gen_cli_docs.py --check   # exit 1 when docs/cli.md is out of date (CI)

The text is rendered at a fixed width (100 columns) so the output does not depend on the terminal;
tests/test_cli_docs.py regenerates it in memory and fails when docs/cli.md has drifted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import click

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "cli.md"
WIDTH = 100

HEADER = """\
# CLI reference

Generated from `--help` by `scripts/gen_cli_docs.py`; do not edit by hand (run
`python scripts/gen_cli_docs.py` after changing a command). Exit codes for every command:
0 ok, 1 error, 2 usage, 3 robustness gate failed, 130 interrupted.
"""


def _help(cmd: click.Command, name: str, parent: click.Context | None) -> tuple[str, click.Context]:
    # the command's own context_settings (e.g. -h/--help) as the real CLI would apply them, at a fixed width
    settings = {**cmd.context_settings, "terminal_width": WIDTH, "max_content_width": WIDTH}
    ctx = click.Context(cmd, info_name=name, parent=parent, **settings)
    return cmd.get_help(ctx).rstrip() + "\n", ctx


def render() -> str:
    """The full Markdown text of docs/cli.md."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from lingraft.cli.main import cli

    top, ctx = _help(cli, "lingraft", None)
    names = sorted(cli.commands)
    parts = [HEADER, "Commands: " + ", ".join(f"[`{n}`](#lingraft-{n})" for n in names) + ".\n",
             "## lingraft\n", "```text\n" + top + "```\n"]
    for n in names:
        text, _ = _help(cli.commands[n], n, ctx)
        parts += [f"## lingraft {n}\n", "```text\n" + text + "```\n"]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 when docs/cli.md differs")
    ap.add_argument("--out", type=Path, default=OUT, help="file to write (default: docs/cli.md)")
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.exists() else ""
        if current != text:
            print(f"{args.out} is out of date; run: python scripts/gen_cli_docs.py", file=sys.stderr)
            return 1
        return 0
    sys.path.insert(0, str(REPO))
    from lingraft.io.files import atomic_write_text

    atomic_write_text(args.out, text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
