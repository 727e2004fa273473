# `make test` and `make demo` set everything up themselves on a fresh machine.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.lrgrad-installed
# torch is pinned to the CPU build that lies on this machine's disk: an unpinned
# torch would pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
# The APOLLO reference the float64 equivalence test compares against
# (tests/optim/test_apollo_torch_equivalence.py). Installed with --no-deps: its metadata
# requires bitsandbytes (a 43 MB wheel of CUDA binaries, only for its 8-bit optimizer, which the
# test does not use) and transformers (already in the experiments extra); torch is pinned above.
APOLLO_TORCH ?= apollo-torch==1.0.3
PYTEST_WORKERS ?= 2

.PHONY: test demo lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev,experiments]'
	$(PY) -m pip install --quiet --no-deps $(APOLLO_TORCH)
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Triton kernels run on the CPU through the interpreter: that is how CI checks them.
test: $(STAMP) lint
	TRITON_INTERPRET=1 $(PY) -m pytest -q -n $(PYTEST_WORKERS) tests

demo: $(STAMP)
	$(PY) experiments/compare.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
