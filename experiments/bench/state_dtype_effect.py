"""``state_dtype``: what keeping full-rank params' moments in bf16 (``"param"``) instead of fp32 costs.

    python experiments/bench/state_dtype_effect.py            # llama_9m, bf16 weights, 400 steps

Trains the same bf16 LLaMA (byte-level, the standard library's text, ``lrgrad_experiments``' data)
with ``GaLoreAdamW(model.named_parameters(), rank=r)`` and with ``LowRankAdamW`` (plain AdamW: every
param full-rank), each with ``state_dtype="fp32"`` and ``"param"``, same seed and batches, and reports
the validation loss and the optimizer state; beside it, the state the estimator gives at LLaMA-1B for
both settings. Writes ``results/state_dtype.md``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from lrgrad_experiments.machine import describe
from lrgrad_experiments.paths import REPO
from lrgrad_experiments.pretrain.configs import get_config, llama_config
from lrgrad_experiments.pretrain.data import BatchLoader, eval_batches, load_stdlib

import lrgrad

GIB = 2**30


def train(config: str, optimizer: str, state_dtype: str, steps: int, batch: int, seq_len: int, lr: float) -> dict:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    corpus = load_stdlib(max_bytes=4_000_000)
    cfg = llama_config(config, vocab_size=256, max_seq_len=seq_len)
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    rank = get_config(config)["rank"]
    if optimizer == "galore":
        opt = lrgrad.GaLoreAdamW(model.named_parameters(), rank=rank, lr=lr, state_dtype=state_dtype)
    else:
        opt = lrgrad.LowRankAdamW(model.parameters(), lr=lr, state_dtype=state_dtype)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 40) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    loader = BatchLoader(corpus.train, batch, seq_len, seed=0)
    for _ in range(steps):
        tokens = loader.next()
        model(input_ids=tokens[:, :-1], labels=tokens[:, 1:]).loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        losses = [float(model(input_ids=b[:, :-1], labels=b[:, 1:]).loss)
                  for b in eval_batches(corpus.val, batch, seq_len, 8)]
    return {"val_loss": sum(losses) / len(losses), "state": lrgrad.optimizer_state_bytes(opt)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="llama_9m")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--out", default=str(REPO / "results"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    lines = ["# Full-rank moments of bf16 params: fp32 or bf16 (`state_dtype`)", "",
             f"Machine: {describe()}. Command: `python experiments/bench/state_dtype_effect.py --config {args.config} "
             f"--steps {args.steps}`.", "",
             f"{args.config}, bf16 weights, byte-level stdlib text, batch {args.batch_size} x {args.seq_len}, "
             f"{args.steps} steps, lr {args.lr} (warmup 40, cosine), same seed and batches; validation loss "
             "over 8 batches.", "",
             "| optimizer | state_dtype | val loss (nats) | optimizer state (MiB) |", "|---|---|---:|---:|"]
    for optimizer in ("adamw", "galore"):
        for state_dtype in ("fp32", "param"):
            r = train(args.config, optimizer, state_dtype, args.steps, args.batch_size, args.seq_len, args.lr)
            name = "`LowRankAdamW` (all full-rank)" if optimizer == "adamw" else "`GaLoreAdamW(named_parameters())`"
            lines.append(f"| {name} | `{state_dtype}` | {r['val_loss']:.4f} | {r['state'] / 2**20:.2f} |")
            print(lines[-1], flush=True)
    lines += ["", "At LLaMA-1B (bf16, `lrgrad.estimate_memory`, rank 512), optimizer + projector state:", "",
              "| optimizer | `fp32` (GiB) | `param` (GiB) |", "|---|---:|---:|"]
    for name in ("galore", "galore8bit", "apollo_mini", "flora"):
        sizes = []
        for state_dtype in ("fp32", "param"):
            est = lrgrad.estimate_memory("llama-1b", optimizer=name, rank=1 if name == "apollo_mini" else 512,
                                         state_dtype=state_dtype)
            sizes.append((est.optimizer_state + est.projector_state) / GIB)
        lines.append(f"| {name} | {sizes[0]:.2f} | {sizes[1]:.2f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "state_dtype.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
