"""Shared test setup: deterministic, small, CPU-only."""

import os
import sys
from pathlib import Path

# Kernels are checked through Triton's interpreter on the CPU (set before triton is imported).
os.environ.setdefault("TRITON_INTERPRET", "1")

# Shared helpers (tiny_model, state_utils) live here; test files in subfolders import them by name.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402
import torch  # noqa: E402

# Two pytest workers share two cores: one intra-op thread each avoids oversubscription.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
