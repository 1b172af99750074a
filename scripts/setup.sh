#!/usr/bin/env bash
# Creates .venv (once) with torch (the build pip selects here), latentdiff and its test/tracking extras, and the CLIP
# BPE vocabulary from open-clip-torch (installed without its dependencies: it would pull torchvision).
# The Hugging Face libraries are held at the versions the tests passed with (scripts/constraints.txt).
# A finished setup is stamped with a hash of what decides it, so running it again does nothing (no network either)
# until pyproject.toml, the constraints or this script change; latentdiff itself is installed editable.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
STAMP="$VENV/.latentdiff-setup"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "latentdiff needs Python >= 3.11 (diffusers 0.42 does); $PYTHON is $("$PYTHON" --version 2>&1)." \
        "Run again with PYTHON=python3.11 (or newer), e.g. PYTHON=python3.12 make test." >&2
    exit 1
fi
wanted=$(cat pyproject.toml scripts/constraints.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)
installed='import importlib.util as u, sys; sys.exit(not all(u.find_spec(m) for m in ("latentdiff", "torch")))'
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$wanted" ] && "$VENV/bin/python" -c "$installed" 2>/dev/null; then
    exit 0
fi
# A .venv without a working pip (venv interrupted, python3-venv missing, its interpreter gone) is made again.
# (In place: a venv records its own path, so one built aside and renamed would activate the wrong folder.)
if ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
    if ! "$PYTHON" -m venv --clear "$VENV"; then
        echo "Could not create a virtual environment with $PYTHON: on Debian/Ubuntu install python3-venv" \
            "(apt-get install python3-venv), then run again." >&2
        exit 1
    fi
fi
rm -f "$STAMP"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
$PIP install --upgrade pip 2>/dev/null || true
$PIP install "torch==2.13.0"
$PIP install -c scripts/constraints.txt -e ".[test,tracking]"
$PIP install --no-deps "open-clip-torch==3.3.0"
echo "$wanted" > "$STAMP"
