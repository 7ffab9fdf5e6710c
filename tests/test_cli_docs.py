"""docs/cli.md must equal what scripts/gen_cli_docs.py generates from the current --help texts, and the docs
must link to each other and to the benchmark tables."""

from __future__ import annotations

import difflib
import importlib.util
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"


def _gen():
    spec = importlib.util.spec_from_file_location("gen_cli_docs", REPO / "scripts" / "gen_cli_docs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cli_reference_is_up_to_date():
    want = _gen().render()
    have = (DOCS / "cli.md").read_text(encoding="utf-8")
    if have != want:
        diff = "".join(
            difflib.unified_diff(have.splitlines(True), want.splitlines(True), "docs/cli.md", "generated", n=1)
        )
        pytest.fail("docs/cli.md is out of date; run: python scripts/gen_cli_docs.py\n" + diff[:4000])


def test_cli_reference_lists_every_command_and_option():
    from lingraft.cli.main import cli

    text = _gen().render()
    for name, cmd in cli.commands.items():
        assert f"## lingraft {name}\n" in text
        for p in cmd.params:
            for opt in getattr(p, "opts", []):
                if opt.startswith("--"):
                    assert opt in text, (name, opt)


def test_render_does_not_depend_on_the_terminal(monkeypatch):
    gen = _gen()
    a = gen.render()
    monkeypatch.setenv("COLUMNS", "40")
    assert gen.render() == a


def test_check_mode_detects_drift(tmp_path):
    gen = _gen()
    stale = tmp_path / "cli.md"
    stale.write_text("old\n")
    assert gen.main(["--check", "--out", str(stale)]) == 1
    assert gen.main(["--out", str(stale)]) == 0
    assert gen.main(["--check", "--out", str(stale)]) == 0


OWN_DOCS = ("index.md", "quickstart.md", "concepts.md", "ci.md", "cli.md")


def test_docs_exist_and_local_links_resolve():
    for name in OWN_DOCS:
        assert (DOCS / name).is_file(), name
    index = (DOCS / "index.md").read_text()
    for target in ("quickstart.md", "concepts.md", "ci.md", "cli.md", "graft_effect.md", "compare.md", "vnncomp.md"):
        assert f"({target})" in index, f"index.md does not link {target}"
    others = {"graft_effect.md", "compare.md", "vnncomp.md"}  # written by others; may land later
    for name in OWN_DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", (DOCS / name).read_text()):
            if target.startswith(("http://", "https://")) or target in others:
                continue
            assert (DOCS / target).resolve().exists(), f"{name} links to missing {target}"


def test_ci_doc_examples_use_real_flags():
    """Every --flag the CI page uses with `lingraft certify` exists on that command."""
    from lingraft.cli.main import cli

    text = (DOCS / "ci.md").read_text()
    flags = set(re.findall(r"(--[a-z][a-z-]+)", text))
    known = {o for p in cli.commands["certify"].params for o in getattr(p, "opts", [])}
    known |= {o for p in cli.commands["run"].params for o in getattr(p, "opts", [])}
    known |= {"--upgrade", "--no-deps", "--json", "--help"}
    assert {"--min-certified-acc", "--min-clean-acc", "--baseline", "--max-drop"} <= flags
    assert flags <= known, flags - known
