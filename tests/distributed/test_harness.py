"""The spawn harness ends a rank that finished with ``os._exit(0)`` (harness.py says why): a rank that fails
must still fail the test with its traceback, and every rank's result must still come back."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from harness import run_distributed


def summing_worker(rank: int, world: int) -> float:
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return float(t.item())


def failing_worker(rank: int, world: int) -> None:
    if rank == 1:
        raise ValueError("rank 1 says no")


def test_every_rank_returns_its_result():
    assert run_distributed(summing_worker) == [3.0, 3.0]


def test_a_failing_rank_fails_the_run_with_its_traceback():
    with pytest.raises(AssertionError, match="rank 1 says no"):
        run_distributed(failing_worker)
