"""bench_step's like-for-like Newton–Schulz rows (issue 32): Muon / Hybrid-AuON with ``ns_dtype`` pinned,
beside torch.optim.Muon (bf16) and the bare fp32 Newton–Schulz, on a tiny LLaMA; the page names the CPU
and whether its bf16 GEMMs are native."""

from __future__ import annotations

import torch
from lrgrad_experiments.bench import bench_step, step_floors
from lrgrad_experiments.pretrain.configs import build_model

from lrgrad.kernels.precision import native_bf16_matmul


def test_ns_variant_rows_have_like_for_like_floors_and_anchors(tmp_path):
    names = ["adamw_foreach", "adamw_fused", "muon", *bench_step.NS_VARIANTS]
    res = bench_step.bench_size("llama_test", names, steps=1, vocab=256, refresh=False)
    rows = res["rows"]
    assert not res["errors"]
    for name in bench_step.NS_VARIANTS:
        floor, anchor = rows[name]["floor"], rows[name]["anchor"]
        if name.endswith("_bf16"):
            assert floor.endswith("_bf16") and anchor == "torch_muon"
        else:
            assert not floor.endswith("_bf16") and anchor == floor
        assert floor in rows and anchor in rows and rows[name]["step_s"] > 0
    auto_floor = rows["muon"]["floor"]
    assert auto_floor.endswith("_bf16") == native_bf16_matmul("cpu")
    bench_step.write([res], tmp_path, "test")
    md = (tmp_path / "bench_step.md").read_text()
    assert "bf16 GEMMs native" in md or "bf16 GEMMs emulated" in md
    assert "Muon (ns_dtype=bf16)" in md and "Muon (ns_dtype=fp32)" in md
    assert "floor: 5 bf16 Newton–Schulz steps (hidden) + fused AdamW (rest)" in md


def test_ns_variants_pin_the_precision_in_the_optimizer():
    model = build_model("llama_test", vocab_size=256, max_seq_len=16)
    for name, (_, ns_dtype) in bench_step.NS_VARIANTS.items():
        opt = bench_step.make_optimizer(name, model, rank=8)
        groups = [g for g in opt.param_groups if g.get("rule", "adamw") != "adamw"]
        assert groups and all(g["ns_dtype"] == ns_dtype for g in groups)


def test_bf16_floor_iterates_in_bf16(monkeypatch):
    """The bf16 floor's products run on bf16 operands (not fp32 ones cast at the end)."""
    model = build_model("llama_test", vocab_size=256, max_seq_len=16)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    seen = []
    original = torch.addmm

    def spy(*args, **kwargs):
        seen.append(args[1].dtype)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "addmm", spy)
    step_floors.build_reference("floor_muon_ns1_bf16", model, rank=8).step()
    assert seen and set(seen) == {torch.bfloat16}
    seen.clear()
    step_floors.build_reference("floor_muon_ns1", model, rank=8).step()
    assert seen and set(seen) == {torch.float32}
