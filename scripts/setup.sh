#!/usr/bin/env bash
# Creates .venv (once) with torch (the build pip selects here), latentdiff and its test/tracking extras, and the CLIP
# BPE vocabulary from open-clip-torch (installed without its dependencies: it would pull torchvision).
# The Hugging Face libraries are held at the versions the tests passed with (scripts/constraints.txt).
# Re-running is cheap: pip skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "latentdiff needs Python >= 3.11 (diffusers 0.42 does); $PYTHON is $("$PYTHON" --version 2>&1)." \
        "Run again with PYTHON=python3.11 (or newer), e.g. PYTHON=python3.12 make test." >&2
    exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
$PIP install --upgrade pip 2>/dev/null || true
$PIP install "torch==2.13.0"
$PIP install -c scripts/constraints.txt -e ".[test,tracking]"
$PIP install --no-deps "open-clip-torch==3.3.0"
