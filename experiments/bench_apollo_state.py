"""Optimizer state of the *projected* matrices on the LLaMA-60M shape: APOLLO / APOLLO-Mini / Fira vs AdamW.

    python experiments/bench_apollo_state.py             # llama_60m, rank 128 (APOLLO-Mini: 1)

One ``LlamaForCausalLM`` (vocab 32000) gets random gradients; each optimizer (the experiments'
recipe: attention/MLP matrices projected, embeddings/head/norms full-rank) takes one step, and
the bytes of ``optimizer.state`` are split into the projected matrices and the rest. The ratio
that matters for APOLLO-Mini is the projected matrices' state against ``torch.optim.AdamW``'s
state on the *same* matrices (2·m·n fp32 each): the full-rank embedding and head run AdamW in
every optimizer and are reported apart. Exact byte counts (``lrgrad.optimizer_state_bytes``'s
rule: each tensor storage once; DCT's shared basis does not occur here).

Writes ``results/apollo_state.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lrgrad  # noqa: E402
from experiments.configs import build_model, get_config  # noqa: E402
from experiments.optimizers import REGISTRY, build_optimizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NAMES = ("galore_adamw", "flora_adamw", "fira_adamw", "apollo_adamw", "apollo_mini_adamw")


def _bytes(state: dict) -> int:
    return sum(v.untyped_storage().nbytes() for v in state.values() if isinstance(v, torch.Tensor))


def measure(config: str, names: tuple[str, ...]) -> list[tuple[str, int, int, int]]:
    """(label, projected-matrix state bytes, rest, AdamW's bytes on the same projected matrices) per optimizer."""
    rank = get_config(config)["rank"]
    torch.manual_seed(0)
    model = build_model(config, vocab_size=32000, max_seq_len=256)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    projected_ids = {id(p) for _, p in lrgrad.param_groups(model, rank=rank)[0]["params"]}
    adamw_projected = sum(2 * p.numel() * p.element_size() for p in model.parameters() if id(p) in projected_ids)
    rows = []
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-3)
    adamw.step()
    rows.append(("torch AdamW", sum(_bytes({k: v for k, v in s.items() if k != "step"}) for p, s in adamw.state.items()
                                    if id(p) in projected_ids),
                 sum(_bytes(s) for p, s in adamw.state.items() if id(p) not in projected_ids), adamw_projected))
    del adamw
    for name in names:
        opt = build_optimizer(name, model, rank=rank)
        opt.step()
        proj = sum(_bytes(s) for p, s in opt.state.items() if id(p) in projected_ids)
        rest = sum(_bytes(s) for p, s in opt.state.items() if id(p) not in projected_ids)
        rows.append((REGISTRY[name].label, proj, rest, adamw_projected))
        del opt
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="llama_60m")
    p.add_argument("--out", default=str(ROOT / "results"))
    opts = p.parse_args(argv)
    rows = measure(opts.config, NAMES)
    lines = [f"# Optimizer state on the projected matrices, {opts.config} (vocab 32000, rank "
             f"{get_config(opts.config)['rank']}; APOLLO-Mini rank 1)\n",
             "`python experiments/bench_apollo_state.py` — bytes after one step. *Projected* = the "
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
