#!/usr/bin/env bash
# Creates .venv (once) with torch (the build pip selects here), latentdiff and its test/tracking extras, and the CLIP
# BPE vocabulary from open-clip-torch (installed without its dependencies: it would pull torchvision).
# Re-running is cheap: pip skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
$PIP install --upgrade pip 2>/dev/null || true
$PIP install "torch==2.13.0"
$PIP install -e ".[test,tracking]"
$PIP install --no-deps "open-clip-torch==3.3.0"
