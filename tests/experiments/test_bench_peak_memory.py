"""bench_peak_memory on LLaMA-9M (vocab 32000), in process: the live-tensor count sees the model, its gradients and
the optimizer state; the page names the CPU, the allocator settings and every row."""

from __future__ import annotations

import torch
from lrgrad_experiments.bench import bench_peak_memory as bench


def test_live_bytes_counts_storages_until_their_last_view_dies():
    tracker = bench.LiveBytes()
    with tracker.mode:
        a = torch.zeros(1000)  # 4000 bytes
        view = a[10:]
        del a
        b = torch.ones(500, dtype=torch.float64)  # 4000 bytes
        assert tracker.live == 8000
        del view
        assert tracker.live == 4000
        del b
    assert tracker.live == 0 and tracker.peak == 8000


def test_rows_measure_the_state_and_carry_the_estimate(tmp_path):
    results = []
    for row in ("none", "galore", "galore_layerwise"):
        r = bench.child(row, "llama_9m", vocab=32000, seq_len=32, steps=2)
        r["seq_len"] = 32
        results.append(r)
    none, galore, layerwise = results
    weights = 2 * none["params"]  # bf16
    assert none["state"] == 0 and none["live_peak"] >= 2 * weights  # weights and their gradients
    assert galore["state"] > 0 and galore["live_peak"] >= none["live_peak"] + galore["state"] * 0.9
    assert galore["estimate"]["optimizer_state"] + galore["estimate"]["projector_state"] == galore["state"]
    assert layerwise["estimate"]["gradients"] < galore["estimate"]["gradients"]  # one gradient at a time
    assert all(r["peak_rss"] >= r["live_peak"] for r in results)
    for r in (galore, layerwise):  # the estimator's peak, runtime aside, is the live-tensor peak
        predicted = r["estimate"]["peak"] - r["estimate"]["runtime"]
        assert abs(predicted / r["live_peak"] - 1) <= 0.10, (r["row"], predicted, r["live_peak"])
    bench.write(results, tmp_path, "CPU test-cpu")
    page = (tmp_path / "peak_memory.md").read_text()
    assert "CPU test-cpu" in page and "MALLOC_MMAP_THRESHOLD_=65536" in page
    for row in ("none", "galore", "galore_layerwise"):
        assert bench.ROWS[row][0] in page
