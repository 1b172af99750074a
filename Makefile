# The two commands of the README. Each sets up .venv first (a no-op when it is already there).
.PHONY: setup test demo

setup:
	bash scripts/setup.sh

test: setup
	.venv/bin/python -m pytest -q

demo: setup
	.venv/bin/latentdiff demo
