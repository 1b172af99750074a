# Sourced at the start of each device call (benchmarks/README.md): puts the carried wheels (diffusers,
# open-clip-torch) and latentdiff into /tmp/site and onto PYTHONPATH. latentdiff is copied, not built: the machine
# has no index for a build backend, and gpu.py needs only the modules, with pipelines/ as latentdiff.pipelines
# (what the package mapping of pyproject.toml makes of it). Run from the repository root with `.whl/` carried.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || return 1
rm -rf /tmp/site/latentdiff && cp -r latentdiff /tmp/site/latentdiff && cp -r pipelines /tmp/site/latentdiff/pipelines \
  || return 1
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
