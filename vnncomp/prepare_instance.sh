#!/bin/bash
# VNN-COMP prepare script: prepare_instance.sh v1 CATEGORY ONNX VNNLIB
# Checks that lingraft can load the network and parse the property (nothing is cached between instances).
# Python: $LINGRAFT_PYTHON if set, else python3 on PATH; the repository root is put on PYTHONPATH.
set -u
if [ "$#" -ne 4 ]; then
    echo "usage: $0 v1 CATEGORY ONNX VNNLIB" >&2
    exit 2
fi
VERSION="$1"; CATEGORY="$2"; ONNX="$3"; VNNLIB="$4"
if [ "$VERSION" != "v1" ]; then
    echo "unsupported interface version '$VERSION' (expected v1)" >&2
    exit 2
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${LINGRAFT_PYTHON:-python3}"
echo "preparing lingraft for category '$CATEGORY': $ONNX $VNNLIB"
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" exec "$PY" -m lingraft.cli.main verify "$ONNX" "$VNNLIB" --prepare
