"""experiments/compare.py (make demo), bench_step.py and bench_memory.py on a tiny LLaMA."""

from __future__ import annotations

import json

import pytest
import torch
from lrgrad_experiments import compare  # noqa: E402
from lrgrad_experiments.bench import (
    bench_memory,  # noqa: E402
    bench_step,  # noqa: E402
)

import lrgrad  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_threads():
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)  # compare/bench set one thread; leave the worker as it was


def test_compare_writes_table_and_plot(tmp_path):
    rc = compare.main(["--config", "llama_test", "--optimizers", "adamw,galore_adamw", "--steps", "4",
                       "--seq-len", "16", "--batch-size", "2", "--n-evals", "2", "--eval-batches", "1",
                       "--max-bytes", "60000", "--threads", "1", "--out", str(tmp_path / "res"),
                       "--runs-dir", str(tmp_path / "runs")])
    assert rc == 0
    md = (tmp_path / "res" / "demo.md").read_text()
    raw = json.loads((tmp_path / "res" / "demo.json").read_text())
    assert [r["optimizer"] for r in raw["results"]] == ["adamw", "galore_adamw"]
    adamw, galore = raw["results"]
    assert adamw["tokens"] == galore["tokens"] == 4 * 2 * 16  # same token budget
    assert "| AdamW (torch) (`adamw`) | 0.003 |" in md and "`galore_adamw`) | 0.01 |" in md
    assert f"{galore['final_val_loss']:.4f}" in md and "Quality check" in md
    assert galore["state_bytes"] < adamw["state_bytes"]
    assert (tmp_path / "res" / "demo_loss.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_merge_adds_a_separate_run(tmp_path):
    common = ["--config", "llama_test", "--steps", "3", "--seq-len", "16", "--batch-size", "2", "--n-evals", "1",
              "--eval-batches", "1", "--max-bytes", "60000", "--threads", "1", "--runs-dir", str(tmp_path / "runs")]
    assert compare.main([*common, "--optimizers", "adamw", "--out", str(tmp_path / "a")]) == 0
    assert compare.main([*common, "--optimizers", "apollo_mini_adamw", "--out", str(tmp_path / "b")]) == 0
    assert compare.main(["--merge", str(tmp_path / "b" / "demo.json"), "--out", str(tmp_path / "a")]) == 0
    raw = json.loads((tmp_path / "a" / "demo.json").read_text())
    assert [r["optimizer"] for r in raw["results"]] == ["adamw", "apollo_mini_adamw"]
    md = (tmp_path / "a" / "demo.md").read_text()
    mini = raw["results"][1]
    assert f"{mini['final_val_loss']:.4f}" in md and "ms† | — |" in md and "--optimizers apollo_mini_adamw" in md
    with pytest.raises(SystemExit, match="steps"):  # another recipe cannot be merged
        other = raw | {"meta": raw["meta"] | {"steps": 5}}
        (tmp_path / "c.json").write_text(json.dumps(other))
        compare.main(["--merge", str(tmp_path / "c.json"), "--out", str(tmp_path / "a")])


def test_compare_rejects_unknown_optimizer(tmp_path):
    with pytest.raises(ValueError, match="Invalid optimizer: 'nope'"):
        compare.main(["--optimizers", "adamw,nope", "--steps", "2", "--out", str(tmp_path)])


def test_pick_steps_fits_budget():
    # 1 s/step, 10 optimizers, 11 minutes: steps + evals + slack fit 66 s per optimizer
    steps = compare.pick_steps(1.0, 10, 660, n_evals=10, eval_batches=4)
    assert steps % 10 == 0 and steps * 1.25 + 10 * 4 / 3 <= 66
    assert compare.pick_steps(100.0, 10, 660, 10, 4) == 10  # floor
    assert compare.pick_steps(0.001, 10, 660, 10, 4) == 200  # cap


def test_refresh_rows_see_a_new_gradient_like_gradient_each_refresh_and_leave_the_model_s():
    """The refresh rows step on gradients with a falling spectrum from two pools in turn (a new
    subspace every refresh at gap 2), and every other row keeps its own gradients."""
    params = [torch.nn.Parameter(torch.zeros(3)) for _ in range(2)]
    own = [torch.ones(3), torch.ones(3)]
    for p, g in zip(params, own):
        p.grad = g
    pools = [[torch.full((3,), float(k)) for _ in params] for k in (10, 20)]
    seen = []
    step = bench_step.swapping_step(lambda: seen.append(float(params[1].grad[0])), params, pools)
    for _ in range(6):
        step()
    assert seen == [10, 10, 20, 20, 10, 10]
    assert all(p.grad is g for p, g in zip(params, own))
    g = bench_step.gradient_like((48, 40), torch.Generator().manual_seed(0))
    s = torch.linalg.svdvals(g.double())
    assert float(s[0] / s[7]) == pytest.approx(8.0, rel=1e-3)  # σᵢ ∝ 1/i
    assert float(g.square().mean().sqrt()) == pytest.approx(1e-3, rel=1e-4)


def test_bench_step_and_memory(tmp_path):
    res = bench_step.bench_size("llama_test", ["adamw_foreach", "adamw_fused", "galore_adamw"], steps=1, vocab=256)
    rows = res["rows"]
    assert rows["adamw_foreach"]["state_bytes"] == rows["adamw_fused"]["state_bytes"]
    # GaLore state = AdamW's on full-rank params + max(m,n) x r moments x2 + one basis per projected matrix
    assert rows["galore_adamw"]["state_bytes"] < rows["adamw_foreach"]["state_bytes"]
    assert all(r["step_s"] > 0 for r in rows.values())
    # the family's floor is timed in the same run; floors hold no optimizer state
    assert rows["galore_adamw"]["floor"] == "floor_adamw" and rows["floor_adamw"]["state_bytes"] is None
    assert set(res["refresh"]) >= {"warm", "gram", "exact", "randomized"}
    assert all(r["first_step_s"] > 0 for r in res["refresh"].values())
    bench_step.write([res], tmp_path, "test")
    md = (tmp_path / "bench_step.md").read_text()
    assert "| torch AdamW (foreach) |" in md and "| 1.00x |" in md
    assert "| floor: projection GEMMs + fused AdamW |" in md and "svd=\"randomized\"" in md
    assert "svd=\"warm\" (default)" in md
    assert "GEMM work of the projected matrices per step" in md
    assert (tmp_path / "bench_step.png").exists()

    mem = bench_memory.measure("llama_test", ["adamw_foreach", "galore_adamw"], vocab=256)
    for name in ("adamw_foreach", "galore_adamw"):
        row = mem["rows"][name]
        if hasattr(lrgrad, "estimate_memory"):  # the estimator must agree exactly with the measurement
            assert row["estimated_bytes"] == row["state_bytes"], name
    assert mem["rows"]["galore_adamw"]["state_bytes"] == rows["galore_adamw"]["state_bytes"]


def test_gemm_work_counts_each_projected_matrix_by_hand():
    """Projected at rank 2: a 12 x 8 (d = 8) and a 12 x 12 (d = 12) weight. GaLore: 2·m·n·r each; online
    PCA adds C (m·n·r) and K, KP, the Gram and L⁻¹P (4·r²·d). The 2 x 12 and 12 x 2 weights
    (min(m, n) <= rank) and the biases are not projected, nor is the output layer (the last linear of a
    model without get_output_embeddings: lrgrad.groups.head_modules), here a 12 -> 2 head."""
    from lrgrad_experiments.bench import step_floors

    model = torch.nn.Sequential(torch.nn.Linear(8, 12), torch.nn.Linear(12, 2), torch.nn.Linear(2, 12),
                                torch.nn.Linear(12, 12), torch.nn.Linear(12, 2))
    work = step_floors.gemm_work(model, rank=2)
    galore = 2 * (12 * 8 * 2) + 2 * (12 * 12 * 2)
    extra = (12 * 8 * 2 + 4 * 2 * 2 * 8) + (12 * 12 * 2 + 4 * 2 * 2 * 12)
    assert work == {"galore": galore, "online_pca": galore + extra}


def test_bench_oneliner_prints_the_table(capsys):
    from lrgrad_experiments.bench import bench_oneliner

    rc = bench_oneliner.main(["--shapes", "byte", "--config", "llama_test", "--steps", "3", "--lrs", "1e-3",
                              "--eval-batches", "1", "--max-bytes", "60000", "--variants", "GaLoreAdamW"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| byte | 0.001 | AdamW | " in out and "| byte | 0.001 | GaLoreAdamW | " in out
    assert "+0.0% | — |" in out  # AdamW is the reference row
