"""Training memory: the estimator's table for LLaMA 60M-7B, and measured peak process memory.

    .venv/bin/python experiments/bench/bench_memory_estimate.py            # table + measurement -> results/memory.md
    .venv/bin/python experiments/bench/bench_memory_estimate.py --no-measure

Part 1: ``lrgrad.estimate_memory`` for LLaMA 60M/130M/350M/1B/7B x {AdamW, GaLore, GaLore-8bit,
Q-GaLore, DCT, Flora, AuON}: bf16 weights, GaLore's ranks, token batch 256 (batch 1 x seq 256,
GaLore's Fig. 1 setting); 7B with and without per-layer updates, and whether it fits 16 / 24 GB.

Part 2: peak process memory of a LLaMA-130M-shaped ``transformers.LlamaForCausalLM`` (fp32, CPU)
training a few steps, each configuration in its own subprocess. Peak = high-water RSS (VmHWM,
reset through /proc/self/clear_refs after the imports) minus the RSS after the imports, so
the interpreter and libraries are not counted. The model is built, quantized and
``malloc_trim``-ed before the reset, so a transient fp32 copy of the weights does not count.
``ru_maxrss`` (which cannot be reset) is reported too. Children run with a fixed glibc mmap
threshold (``ALLOCATOR_ENV``) so freed tensors leave the RSS.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from lrgrad_experiments import machine
from lrgrad_experiments.paths import REPO as ROOT  # noqa: E402

SIZES = ["llama-60m", "llama-130m", "llama-350m", "llama-1b", "llama-7b"]
OPTIMIZERS = [("adamw", "AdamW"), ("galore", "GaLore"), ("galore8bit", "GaLore-8bit"), ("qgalore", "Q-GaLore"),
              ("dct", "DCT"), ("flora", "Flora"), ("auon", "AuON")]
GIB = 2**30
# glibc raises its mmap threshold each time a large block is freed, after which large tensors come
# from the heap and freed memory stays resident (measured: 600 MiB of a Q-GaLore step's RSS was
# freed-but-kept heap; malloc_trim returned it). A fixed threshold makes every large tensor its own
# mapping, returned on free, so the high-water RSS measures live tensors rather than the allocator.
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def estimator_tables() -> str:
    import torch

    import lrgrad

    lines = ["### Estimated training memory (GiB), bf16 weights, token batch 256 (1 x 256)", "",
             "Optimizer state includes projector state; rank as in GaLore (128/256/256/512/1024). "
             "Q-GaLore counts INT8 weights (group 256); no per-layer updates here.", ""]
    lines.append("| model | " + " | ".join(label for _, label in OPTIMIZERS) + " |")
    lines.append("|---|" + "---:|" * len(OPTIMIZERS))
    for size in SIZES:
        cells = []
        for name, _ in OPTIMIZERS:
            bits = 8 if name == "qgalore" else None
            est = lrgrad.estimate_memory(size, optimizer=name, dtype=torch.bfloat16, weight_bits=bits,
                                         batch_size=1, seq_len=256)
            cells.append(f"{est.total / GIB:.2f}")
        lines.append(f"| {size[6:].upper()} | " + " | ".join(cells) + " |")
    lines += ["", "### LLaMA-7B breakdown (GiB), token batch 256", "",
              "| optimizer | per-layer | weights | grads | opt. state | proj. state | activations | total "
              "| fits 16 GB | fits 24 GB |", "|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for name, label in OPTIMIZERS:
        for layerwise in (False, True):
            bits = 8 if name == "qgalore" else None
            est = lrgrad.estimate_memory("llama-7b", optimizer=name, dtype=torch.bfloat16, weight_bits=bits,
                                         layerwise=layerwise, batch_size=1, seq_len=256)
            lines.append(
                f"| {label}{' (INT8 weights)' if bits else ''} | {'yes' if layerwise else 'no'} | "
                f"{est.weights / GIB:.2f} | {est.gradients / GIB:.2f} | {est.optimizer_state / GIB:.2f} | "
                f"{est.projector_state / GIB:.2f} | {est.activations / GIB:.2f} | {est.total / GIB:.2f} | "
                f"{'yes' if est.fits(16) else 'no'} | {'yes' if est.fits(24) else 'no'} |")
    lines += ["", "16 GB / 24 GB are taken as 16 / 24 GiB of tensors; a real GPU also needs the CUDA "
              "context and allocator slack (~0.5-1.5 GiB), so totals within ~1 GiB of the limit are marginal."]
    return "\n".join(lines)


# ---------------------------------------------------------------------- measurement (child process)
def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def child(config_name: str, steps: int, seq_len: int) -> None:
    import torch
    import transformers

    import lrgrad
    from lrgrad.estimate import make_optimizer

    torch.manual_seed(0)
    torch.set_num_threads(2)
    base_rss = _status("VmRSS")
    cfg = transformers.LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                                   num_attention_heads=12, vocab_size=32000, max_position_embeddings=1024,
                                   attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(cfg)
    optimizer, rank, layerwise = config_name, 256, False
    if config_name == "qgalore":
        lrgrad.quantize_weights(model, bits=8, group_size=256)
        layerwise = True
    options = {"update_proj_gap": 200} if optimizer != "adamw" else {}
    opt = make_optimizer(model, optimizer, rank=rank if optimizer != "adamw" else None, lr=1e-3, **options)
    driver = lrgrad.LayerwiseOptimizer(opt) if layerwise else None
    estimate = lrgrad.estimate_memory(model, optimizer=optimizer, rank=rank if optimizer != "adamw" else None,
                                      layerwise=layerwise, batch_size=1, seq_len=seq_len, **options)
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    setup_rss = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark: the peak below is the training peak
    tokens = torch.randint(0, cfg.vocab_size, (1, seq_len))
    start = time.perf_counter()
    for _ in range(steps):
        loss = model(tokens, labels=tokens).loss
        loss.backward()
        if driver is not None:
            driver.step()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
    peak = _status("VmHWM")
    print(json.dumps({
        "config": config_name, "peak_net": peak - base_rss, "setup_net": setup_rss - base_rss,
        "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "estimate": estimate.as_dict(), "state_bytes": lrgrad.optimizer_state_bytes(opt),
        "seconds": time.perf_counter() - start, "loss": float(loss),
    }))


def measure(steps: int, seq_len: int) -> str:
    rows = []
    for name in ("adamw", "galore", "qgalore"):
        out = subprocess.run([sys.executable, __file__, "--child", name, "--steps", str(steps), "--seq-len",
                              str(seq_len)], capture_output=True, text=True, cwd=ROOT, check=True,
                             env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **ALLOCATOR_ENV})
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"measured {name}: {rows[-1]['peak_net'] / 2**20:.0f} MiB", file=sys.stderr)
    labels = {"adamw": "torch AdamW", "galore": "GaLoreAdamW (rank 256)",
              "qgalore": "QGaLoreAdamW + INT8 weights + per-layer"}
    ref, ref_est = rows[0]["peak_net"], rows[0]["estimate"]["total"]
    lines = [f"### Measured peak memory: LLaMA-130M shape, fp32, CPU, batch 1 x seq {seq_len}, {steps} steps", "",
             "| configuration | measured peak (MiB) | ratio vs AdamW | estimated total (MiB) | est. ratio "
             "| est./measured | opt.+proj. state measured = estimated | ru_maxrss (MiB) |",
             "|---|---:|---:|---:|---:|---:|---|---:|"]
    for row in rows:
        est = row["estimate"]
        exact = row["state_bytes"] == est["optimizer_state"] + est["projector_state"]
        lines.append(
            f"| {labels[row['config']]} | {row['peak_net'] / 2**20:,.0f} | {row['peak_net'] / ref:.2f} | "
            f"{est['total'] / 2**20:,.0f} | {est['total'] / ref_est:.2f} | {est['total'] / row['peak_net']:.2f} | "
            f"{'yes' if exact else 'no'} ({row['state_bytes'] / 2**20:,.1f} MiB) | {row['ru_maxrss'] / 2**20:,.0f} |")
    lines += ["", "Estimated breakdown (MiB): " + "; ".join(
        f"{labels[r['config']]}: weights {r['estimate']['weights'] / 2**20:,.0f}, grads "
        f"{r['estimate']['gradients'] / 2**20:,.0f}, state {r['estimate']['optimizer_state'] / 2**20:,.0f}, proj "
        f"{r['estimate']['projector_state'] / 2**20:,.1f}, activations {r['estimate']['activations'] / 2**20:,.0f}"
        for r in rows)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", default=None)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--no-measure", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "results" / "memory.md"))
    args = parser.parse_args()
    if args.child:
        child(args.child, args.steps, args.seq_len)
        return
    sections = ["# Training memory: estimator and measured peak", "",
                f"Command: `.venv/bin/python experiments/bench/bench_memory_estimate.py"
                f"{' --no-measure' if args.no_measure else ''}`", "",
                f"Machine: {machine.describe()}", "", estimator_tables()]
    if not args.no_measure:
        sections += ["", measure(args.steps, args.seq_len)]
    text = "\n".join(sections) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
