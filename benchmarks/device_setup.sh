# Sourced at the start of each device call (benchmarks/README.md): puts the carried wheels and latentdiff into
# /tmp/site and onto PYTHONPATH. Two steps, because latentdiff is built from the working tree without build
# isolation (the machine has no index to fetch a build backend from) and its pyproject needs setuptools >= 77
# (the SPDX `license` string): the carried setuptools wheel must be importable before that build, whatever
# setuptools the machine's image has. Run from the repository root with `.whl/` carried.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || return 1
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --upgrade \
  --target /tmp/site . || return 1
export PYTHONUNBUFFERED=1
