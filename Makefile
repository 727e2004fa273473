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

.PHONY: test demo lint bench bench-deps clean gpu-check aot

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
	TRITON_INTERPRET=1 $(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadgroup tests

# On a CUDA machine: kernel tests on the GPU, benchmarks vs their goals, step time/memory, a 300-step
# run -> results/gpu.md (about 10 minutes of an H100/H200). Without CUDA it says so and exits 0.
# Uses .venv when it exists, else the python on PATH (a GPU box brings its own CUDA torch + triton).
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	env -u TRITON_INTERPRET $(GPU_PY) experiments/gpu_check.py

# Ahead-of-time compile of every kernel launch (full set) for sm_90, sm_80 and gfx90a; no GPU needed.
aot: $(STAMP)
	env -u TRITON_INTERPRET $(PY) -m lrgrad.kernels.aot --set full

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
