# Local development: one virtualenv in .venv, torch pinned to the CPU wheel.
#
#   make venv    create .venv: torch==2.13.0 first, then this package with [test]
#   make demo    plan the paper's model on 16 devices, then run it scaled down on 16 CPU processes
#   make test    the test suite (CPU only; no GPU, no network)
#   make clean   remove .venv and build / test caches

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch is installed on its own, pinned, before anything else: the machines
# carry this CPU wheel on disk (pip's find-links), while an unpinned `torch`
# (or the >=2.11,<2.14 range in pyproject.toml with no torch present) would let
# pip resolve a multi-GB CUDA build.
TORCH  := torch==2.13.0
STAMP  := $(VENV)/.helix-installed

.PHONY: venv demo test clean

venv: $(STAMP)

# Re-run when the dependencies change; otherwise `make venv` does nothing.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install '$(TORCH)'
	$(BIN)/python -m pip install -e '.[test]'
	touch $@

# 1. plan the paper's model (full size, on the meta device) on 16 devices;
# 2. compile the scaled paper model (16 heads of 8, D=128) and run its 16 rank
#    modules on 16 CPU processes (torchrun, gloo): rank 0 prints the max
#    relative error against the unsharded model. About 80 s on 2 cores.
demo: $(STAMP)
	$(BIN)/helix plan --devices 16
	$(BIN)/helix run --devices 16 --backend gloo

# the tests on up to 4 worker processes (pytest-xdist): torchrun tests start 2-4 processes
# of their own, so more workers than cores only queue; worksteal: a worker that is done takes
# queued tests from the other, so the run does not end on one worker's long tail
JOBS ?= $(shell $(PYTHON) -c "import os; print(max(1, min(4, len(os.sched_getaffinity(0)))))")
test: $(STAMP)
	$(BIN)/python -m pytest -q -x -n $(JOBS) --dist worksteal

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
