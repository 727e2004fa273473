"""bench_step's rows for the newer methods (issue 31): each beside its floor and pytorch-optimizer's
implementation (its Conda, APOLLO, Fira, or GaLore for the methods it lacks) in the same round-robin run,
on a tiny LLaMA; LDAdam keeps its per-step refresh (its subspace changes every step by design)."""

from __future__ import annotations

from lrgrad_experiments.bench import bench_step, step_floors

NEWER = ("grass_adamw", "golore_adamw", "frugal_adamw", "conda_adamw", "ldadamw")


def test_newer_rows_have_floors_and_pytorch_optimizer_anchors(tmp_path):
    res = bench_step.bench_size("llama_test", ["adamw_foreach", "adamw_fused", *NEWER], steps=1, vocab=256,
                                refresh=False)
    rows = res["rows"]
    assert not res["errors"], res["errors"]
    for name in NEWER:
        floor, anchor = rows[name]["floor"], rows[name]["anchor"]
        assert floor == "floor_adamw" and anchor.startswith("po_"), name
        assert floor in rows and anchor in rows and rows[name]["step_s"] > 0 and rows[anchor]["step_s"] > 0
    assert rows["conda_adamw"]["anchor"] == "po_conda" and rows["frugal_adamw"]["anchor"] == "po_fira"
    bench_step.write([res], tmp_path, "test")
    md = (tmp_path / "bench_step.md").read_text()
    assert "pytorch-optimizer Conda" in md and "Grass-AdamW" in md and "LDAdamW" in md


def test_ldadam_keeps_its_per_step_refresh():
    from lrgrad_experiments.pretrain.configs import build_model

    model = build_model("llama_test", vocab_size=256, max_seq_len=16)
    assert bench_step.make_optimizer("ldadamw", model, rank=8).param_groups[0]["update_proj_gap"] == 1
    assert bench_step.make_optimizer("grass_adamw", model, rank=8).param_groups[0]["update_proj_gap"] > 10**6
    assert set(step_floors.LABELS) >= {"po_galore", "po_apollo", "po_fira", "po_conda"}
