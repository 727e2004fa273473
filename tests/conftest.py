"""Shared test setup: deterministic, small, CPU-only."""

import os
import sys
from pathlib import Path

# Kernels are checked through Triton's interpreter on the CPU (set before triton is imported).
os.environ.setdefault("TRITON_INTERPRET", "1")

# Shared helpers (tiny_model, state_utils) live here; test files in subfolders import them by name.
TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(TESTS / "distributed"))  # the 2-process harness, used from several folders

# The code under test is the installed packages (lrgrad, lrgrad_experiments). The repository root must
# not be on sys.path: its top-level kernels/ folder would shadow Hugging Face's `kernels` package
# (transformers imports it). `make test` runs pytest's own script, which never adds it; `python -m
# pytest` from the root adds the working directory, so drop it here before anything imports.
REPO = TESTS.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO]
# The same for every Python the tests start: `python -c`/`-m` children and multiprocessing's
# forkserver (which imports its preload modules with its own sys.path, the working directory first)
# must not see the root either. Python >= 3.11 honours this; nothing else changes for scripts.
os.environ["PYTHONSAFEPATH"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

# Two pytest workers share two cores: one intra-op thread each avoids oversubscription.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_terminal_summary(terminalreporter):
    """Print the AOT compile summary of tests/kernels/test_kernels_aot.py (compiled count, registers,
    spills). Here, not in tests/kernels/conftest.py: under xdist only this conftest is loaded by the
    controller; user_properties travel back from the workers with the reports."""
    for report in terminalreporter.stats.get("passed", []):
        for name, value in getattr(report, "user_properties", []):
            if name == "aot_summary":
                terminalreporter.write_line(f"AOT compile (tests/kernels/test_kernels_aot.py): {value}")
