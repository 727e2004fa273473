"""experiments/bench/bench_comm.py counts the bytes of the collectives a sharded refresh issues."""

from __future__ import annotations

import pytest
from lrgrad_experiments.bench import bench_comm  # noqa: E402


def test_bench_comm_counts_issued_collectives():
    world, dim, ffn, rank = 4, 48, 96, 8
    traffic = bench_comm.measure_traffic(world, dim, ffn, rank)
    ring = 2 * (world - 1) / world  # bytes sent per rank for an all-reduce of one byte
    gather = (world - 1) / world
    k = rank + 8  # default oversampling
    vote = ring * 4  # the 1-element fp32 finiteness vote
    for name, m, n in bench_comm.matrices(dim, ffn):
        assert traffic["all-gather G"][name] == pytest.approx(gather * m * n * 4)
        if m >= n:  # right side: one n x k all-reduce (power_iters=0), two with one power iteration
            assert traffic["sketch, 1 pass (default)"][name] == pytest.approx(vote + ring * n * k * 4)
            assert traffic["sketch, 2 passes"][name] == pytest.approx(vote + 2 * ring * n * k * 4)
            assert traffic["Gram"][name] == pytest.approx(vote + ring * n * n * 4)
        else:  # left side: n x k all-reduce + the basis rows gathered (m x r, ceil(m / W) rows a rank)
            rows = -(-m // world) * world
            assert traffic["sketch, 1 pass (default)"][name] == pytest.approx(
                vote + ring * n * k * 4 + gather * rows * rank * 4)
    table = bench_comm.traffic_table(traffic, dim, ffn, 2, world, rank)
    assert "| sketch, 1 pass (default) |" in table and "1.00x" in table
