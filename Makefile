# `make test` and `make demo` set everything up themselves on a fresh machine.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.lrgrad-installed
# torch is pinned to the CPU build that lies on this machine's disk: an unpinned
# torch would pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
PYTEST_WORKERS ?= 2

.PHONY: test demo lint bench bench-deps clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev,experiments]'
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Triton kernels run on the CPU through the interpreter: that is how CI checks them.
test: $(STAMP) lint
	TRITON_INTERPRET=1 $(PY) -m pytest -q -n $(PYTEST_WORKERS) tests

demo: $(STAMP)
	$(PY) experiments/compare.py

# Optional peers timed by experiments/bench_step.py (never library deps). --no-deps: their
# `torch` requirement must not replace the pinned CPU torch with another (CUDA) build.
bench-deps: $(STAMP)
	$(PY) -m pip install --quiet --no-deps bitsandbytes galore-torch

bench: bench-deps
	$(PY) experiments/bench_step.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
