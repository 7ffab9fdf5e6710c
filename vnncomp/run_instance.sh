#!/bin/bash
# VNN-COMP run script: run_instance.sh v1 CATEGORY ONNX VNNLIB RESULT_FILE TIMEOUT
# Verifies one instance with lingraft and writes the result file (sat + counterexample, unsat, unknown,
# timeout or error). The timeout counts from this script's start, Python start-up included.
# Python: $LINGRAFT_PYTHON if set, else python3 on PATH; the repository root is put on PYTHONPATH.
set -u
START="$(date +%s.%N)"
if [ "$#" -ne 6 ]; then
    echo "usage: $0 v1 CATEGORY ONNX VNNLIB RESULT_FILE TIMEOUT" >&2
    exit 2
fi
VERSION="$1"; CATEGORY="$2"; ONNX="$3"; VNNLIB="$4"; RESULT="$5"; TIMEOUT="$6"
if [ "$VERSION" != "v1" ]; then
    echo "unsupported interface version '$VERSION' (expected v1)" >&2
    exit 2
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${LINGRAFT_PYTHON:-python3}"
echo "running lingraft on category '$CATEGORY': $ONNX $VNNLIB (timeout $TIMEOUT s)"
# stdout: the JSON result; --threads 1 unless $LINGRAFT_THREADS says otherwise (branch and bound's many small tensor
# operations run fastest single-threaded)
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m lingraft.cli.main verify "$ONNX" "$VNNLIB" \
    --timeout "$TIMEOUT" --result "$RESULT" --started-at "$START" --threads "${LINGRAFT_THREADS:-1}" --json -
STATUS=$?
if [ ! -s "$RESULT" ]; then
    # the verifier died before writing anything (e.g. killed): leave a valid result file behind
    echo "error" > "$RESULT"
fi
exit $STATUS
