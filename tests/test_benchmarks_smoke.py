"""The benchmark scripts stay runnable: each parses its arguments and imports everything it needs."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py") if not p.name.startswith("_"))


def test_there_are_benchmarks():
    assert {"certify_speed.py", "graft_effect.py", "vnncomp.py", "complete_verification.py"} <= set(SCRIPTS)


@pytest.mark.subprocess
@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_help(script):
    res = subprocess.run(
        [sys.executable, f"benchmarks/{script}", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    assert "usage" in res.stdout.lower()
