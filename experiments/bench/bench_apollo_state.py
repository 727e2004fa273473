"""Optimizer state of the *projected* matrices on the LLaMA-60M shape: APOLLO / APOLLO-Mini / Fira vs AdamW.

    python experiments/bench/bench_apollo_state.py             # llama_60m, rank 128 (APOLLO-Mini: 1)

One ``LlamaForCausalLM`` (vocab 32000); each optimizer (the experiments' recipe: attention/MLP
matrices projected, embeddings/head/norms full-rank) has its state split into the projected
matrices and the rest. The ratio
that matters for APOLLO-Mini is the projected matrices' state against ``torch.optim.AdamW``'s
state on the *same* matrices (2·m·n fp32 each): the full-rank embedding and head run AdamW in
every optimizer and are reported apart. Exact byte counts: each param's state as its first step
creates it plus the basis its first refresh allocates (``lrgrad.estimate_memory``'s accounting,
tested equal to ``lrgrad.optimizer_state_bytes`` after a step), so no SVD has to run; APOLLO-Mini
is cross-checked against a real step.

Writes ``results/apollo_state.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from lrgrad_experiments import machine
from lrgrad_experiments.paths import REPO as ROOT  # noqa: E402
from lrgrad_experiments.pretrain.configs import build_model, get_config  # noqa: E402
from lrgrad_experiments.pretrain.optimizers import REGISTRY, build_optimizer  # noqa: E402

import lrgrad  # noqa: E402
from lrgrad.subspace import compute_dtype, matrix_shape  # noqa: E402

NAMES = ("galore_adamw", "flora_adamw", "fira_adamw", "apollo_adamw", "apollo_mini_adamw")


def _bytes(state: dict) -> int:
    return sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))


def allocated_state(opt: lrgrad.LowRankOptimizer) -> dict[int, int]:
    """Per-param state bytes once every param has stepped: its state as the first step creates it plus
    the basis its first refresh allocates (what ``lrgrad.estimate_memory`` counts; tested equal to
    ``optimizer_state_bytes`` after a step for every optimizer) - without running the SVDs."""
    out = {}
    for group in opt.param_groups:
        for p in group["params"]:
            state: dict = {}
            opt.init_param_state(p, group, state)
            extra = opt.projector_for(p, group).basis_bytes(matrix_shape(p), compute_dtype(p.dtype)) \
                if opt.is_projected(p, group) else 0
            out[id(p)] = _bytes(state) + extra
    return out


def measure(config: str, names: tuple[str, ...]) -> list[tuple[str, int, int, int]]:
    """(label, projected-matrix state bytes, rest, AdamW's bytes on the same projected matrices) per optimizer."""
    rank = get_config(config)["rank"]
    torch.manual_seed(0)
    model = build_model(config, vocab_size=32000, max_seq_len=256)
    projected_ids = {id(p) for _, p in lrgrad.param_groups(model, rank=rank)[0]["params"]}
    adamw = {id(p): 2 * p.numel() * p.element_size() for p in model.parameters()}  # exp_avg + exp_avg_sq
    adamw_projected = sum(b for i, b in adamw.items() if i in projected_ids)
    rows = [("torch AdamW", adamw_projected, sum(b for i, b in adamw.items() if i not in projected_ids),
             adamw_projected)]
    for name in names:
        per_param = allocated_state(build_optimizer(name, model, rank=rank))
        proj = sum(b for i, b in per_param.items() if i in projected_ids)
        rest = sum(b for i, b in per_param.items() if i not in projected_ids)
        rows.append((REGISTRY[name].label, proj, rest, adamw_projected))
    # cross-check with a real step where it is cheap (no SVD): APOLLO-Mini's measured state
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    mini = build_optimizer("apollo_mini_adamw", model, rank=rank)
    mini.step()
    assert sum(allocated_state(mini).values()) == lrgrad.optimizer_state_bytes(mini)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="llama_60m")
    p.add_argument("--out", default=str(ROOT / "results"))
    opts = p.parse_args(argv)
    rows = measure(opts.config, NAMES)
    lines = [f"# Optimizer state on the projected matrices, {opts.config} (vocab 32000, rank "
             f"{get_config(opts.config)['rank']}; APOLLO-Mini rank 1)\n", f"Machine: {machine.describe()}\n",
             "`python experiments/bench/bench_apollo_state.py` — state bytes once every param has stepped. "
             "*Projected* = the "
             "attention/MLP matrices; *rest* = embeddings, head, norms (AdamW in every optimizer).\n",
             "| optimizer | projected matrices MiB | vs AdamW on them | rest MiB |", "|---|---:|---:|---:|"]
    for label, proj, rest, adamw_proj in rows:
        lines.append(f"| {label} | {proj / 2**20:.3f} | {proj / adamw_proj:.4f} | {rest / 2**20:.1f} |")
    text = "\n".join(lines) + "\n"
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "apollo_state.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
