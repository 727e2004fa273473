# `make test` and `make demo` set everything up themselves on a fresh machine.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.lrgrad-installed

# torch: the requirement and pip's index options are yours to choose. `torch==2.13.0` is what CI
# tests. Where pip is configured to find a CPU wheel first (as on the project's CI machines) that is
# a CPU build; on an ordinary Linux machine the same line pulls the CUDA build and its GPU libraries
# (several GB). For a CPU-only build there, point pip at PyTorch's CPU index:
#   make test TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu"
TORCH       ?= torch==2.13.0
TORCH_INDEX ?=
# Exact versions of everything else that CI is green with (regenerate with `make lock` after a green
# `make test-latest`). CONSTRAINTS= (empty) installs the newest versions the pyproject ranges allow.
CONSTRAINTS ?= constraints.txt
# Peer implementations the tests compare against, never library deps. --no-deps: their metadata pulls
# what the tests do not use (apollo-torch: bitsandbytes' CUDA binaries) or a torch build of its own.
TEST_PEERS  ?= apollo-torch pytorch-optimizer
BENCH_PEERS ?= galore-torch bitsandbytes
PYTEST_WORKERS ?= 2
# The suite runs from the installed packages, never from the repository root on sys.path (where the
# top-level kernels/ folder would shadow Hugging Face's `kernels`): pytest's own script, not `python -m`.
PYTEST = TRITON_INTERPRET=1 $(1)/bin/pytest -q -n $(PYTEST_WORKERS) --dist loadgroup tests

.PHONY: test test-latest lock demo lint bench bench-deps clean gpu-check aot

$(STAMP): pyproject.toml experiments/pyproject.toml Makefile $(CONSTRAINTS)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_INDEX) $(TORCH)
	$(PY) -m pip install --quiet $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e '.[dev]' -e './experiments[wandb]'
	$(PY) -m pip install --quiet --no-deps $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) $(TEST_PEERS)
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Triton kernels run on the CPU through the interpreter: that is how CI checks them.
test: $(STAMP) lint
	$(call PYTEST,$(VENV))

# The newest releases the pyproject ranges allow (torch aside: $(TORCH)), in a venv of their own, then
# the whole suite; prints what drifted from constraints.txt. Run it before each submission.
LATEST ?= .venv-latest
test-latest:
	rm -rf $(LATEST) && python3 -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --quiet $(TORCH_INDEX) $(TORCH)
	# hold torch where $(TORCH) put it: an eager upgrade would otherwise replace a CPU build with PyPI's CUDA one
	# (the distribution's version: torch.__version__ says 2.14.1+cu130 for PyPI's 2.14.1, which pip cannot match)
	$(LATEST)/bin/python -c "from importlib.metadata import version; print('torch==' + version('torch'))" \
		> $(LATEST)/torch-pin.txt
	$(LATEST)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -c $(LATEST)/torch-pin.txt \
		-e '.[dev]' -e './experiments[wandb]'
	$(LATEST)/bin/python -m pip install --quiet --upgrade --no-deps $(TEST_PEERS)
	$(LATEST)/bin/python -m pip freeze --exclude-editable > $(LATEST)/freeze.txt
	python3 .ci/drift.py $(CONSTRAINTS) $(LATEST)/freeze.txt | tee $(LATEST)/drift.txt
	$(LATEST)/bin/ruff check .
	$(call PYTEST,$(LATEST))

# Rewrite constraints.txt from the latest venv (after `make test-latest` passed).
lock:
	{ sed -n '/^#/p' constraints.txt; grep -v -i -E '^(torch|lrgrad|lrgrad-experiments)==' $(LATEST)/freeze.txt; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

# On a CUDA machine: kernel tests on the GPU, benchmarks vs their goals, step time/memory, a 300-step
# run -> results/gpu.md (about 10 minutes of an H100/H200). Without CUDA it says so and exits 0.
# Uses .venv when it exists, else the python on PATH (a GPU box brings its own CUDA torch + triton).
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	env -u TRITON_INTERPRET $(GPU_PY) experiments/tools/gpu_check.py

# Ahead-of-time compile of every kernel launch (full set) for sm_90, sm_80 and gfx90a; no GPU needed.
aot: $(STAMP)
	env -u TRITON_INTERPRET $(PY) experiments/tools/aot.py --set full

demo: $(STAMP)
	$(PY) experiments/compare.py

bench-deps: $(STAMP)
	$(PY) -m pip install --quiet --no-deps $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) $(BENCH_PEERS)

bench: bench-deps
	$(PY) experiments/bench/bench_step.py

clean:
	rm -rf $(VENV) $(LATEST) .pytest_cache .ruff_cache *.egg-info experiments/*.egg-info
