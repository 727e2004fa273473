"""Projector refresh cost and optimizer-state bytes, one markdown report.

1. Refresh cost: one ``size x size`` matrix, rank ``size / 8`` (4096 / 512 by default),
   subspace refreshed on *every* step. The time of a whole optimizer step (refresh +
   projection + rule + update) for DCT (FFT and matmul scores) and online PCA, as a
   ratio of the exact-SVD refresh alone (GaLore's ``torch.linalg.svd``). Goal: <= 0.1x.
2. State bytes on the LLaMA-60M shape (d 512, 8 layers, FFN 1376, vocab 32000;
   rank 128 on the attention/MLP matrices, embeddings/head/norms full-rank) after one
   step, for every optimizer in ``lrgrad.OPTIMIZERS`` and ``torch.optim.AdamW``.

    python experiments/bench/bench_projectors.py --size 2048 --out results/bench_projectors.md
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from lrgrad_experiments import machine
from torch import nn

import lrgrad
from lrgrad.projectors.dct import clear_dct_cache
from lrgrad.projectors.svd import top_singular_basis


# ---------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> float:
    """Fastest of ``repeats`` runs of ``fn()`` (after one warm-up run), in seconds.

    The minimum, not the median: on shared machines other jobs only ever add time.
    """
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def refresh_costs(size: int, rank: int, device: torch.device, repeats: int) -> list[tuple[str, float]]:
    gen = torch.Generator(device=device).manual_seed(0)
    grad = torch.randn(size, size, device=device, generator=gen)
    rows: list[tuple[str, float]] = []
    print(f"timing {size}x{size}, rank {rank} on {device}", file=sys.stderr, flush=True)
    rows.append(("exact SVD refresh alone (`torch.linalg.svd`)",
                 timed(lambda: top_singular_basis(grad, rank, "right"), device, repeats)))

    def step_time(cls, warmup: int = 2, **options) -> float:
        param = nn.Parameter(torch.zeros(size, size, device=device))
        opt = cls([param], lr=1e-3, rank=rank, update_proj_gap=1, **options)
        param.grad = grad
        for _ in range(warmup):  # online PCA: step 1 is its one-off initialisation
            opt.step()

        return timed(opt.step, device, repeats)

    rows.append(("GaLoreAdamW step, exact SVD every step", step_time(lrgrad.GaLoreAdamW)))
    rows.append(("GaLoreAdamW step, randomized SVD every step", step_time(lrgrad.GaLoreAdamW, svd="randomized")))
    rows.append(("DCTAdamW step, FFT scores", step_time(lrgrad.DCTAdamW, dct_scores="fft")))
    rows.append(("DCTAdamW step, matmul scores", step_time(lrgrad.DCTAdamW, dct_scores="matmul")))
    rows.append(("OnlineSubspaceAdamW step (online PCA step)", step_time(lrgrad.OnlineSubspaceAdamW)))
    rows.append(("OnlineSubspaceAdamW step, `pca_init=\"random\"`",
                 step_time(lrgrad.OnlineSubspaceAdamW, pca_init="random")))
    return rows


# ---------------------------------------------------------------------------- state bytes
class Block(nn.Module):
    def __init__(self, dim: int, ffn: int):
        super().__init__()
        self.input_layernorm = nn.Parameter(torch.ones(dim))
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        self.post_attention_layernorm = nn.Parameter(torch.ones(dim))
        self.gate_proj = nn.Linear(dim, ffn, bias=False)
        self.up_proj = nn.Linear(dim, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, dim, bias=False)


class LlamaShape(nn.Module):
    """The parameter shapes of LLaMA-60M (GaLore's configs/llama_60m.json); no forward needed."""

    def __init__(self, dim: int = 512, layers: int = 8, ffn: int = 1376, vocab: int = 32000):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Block(dim, ffn) for _ in range(layers))
        self.norm = nn.Parameter(torch.ones(dim))
        self.lm_head = nn.Linear(dim, vocab, bias=False)


def projector_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.untyped_storage().nbytes() for s in opt.state.values() for k, v in s.items()
               if k.startswith("proj_") and isinstance(v, torch.Tensor))


def state_bytes_rows(rank: int) -> list[tuple[str, int, int, int]]:
    torch.manual_seed(0)
    model = LlamaShape()
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    rows = []
    ref = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ref.step()
    rows.append(("torch.optim.AdamW", lrgrad.optimizer_state_bytes(ref), 0, 0))
    del ref
    for name in sorted(lrgrad.OPTIMIZERS):
        clear_dct_cache()
        start = time.perf_counter()
        opt = lrgrad.OPTIMIZERS[name](lrgrad.param_groups(model, rank=rank), lr=1e-3)
        opt.step()
        print(f"  {name}: {time.perf_counter() - start:.1f}s", file=sys.stderr, flush=True)
        shared = opt.shared_state_bytes() if hasattr(opt, "shared_state_bytes") else 0
        rows.append((name, lrgrad.optimizer_state_bytes(opt), projector_bytes(opt), shared))
        del opt
    return rows


# ---------------------------------------------------------------------------- report
def mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=4096, help="the timed matrix is size x size")
    parser.add_argument("--rank", type=int, default=None, help="rank of the timed refresh (default: size / 8)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--memory-rank", type=int, default=128)
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 avoids OpenMP spin-wait stalls on oversubscribed cores)")
    parser.add_argument("--out", default="results/bench_projectors.md")
    args = parser.parse_args()
    if args.size < 2:
        parser.error("--size must be >= 2")
    rank = args.rank or max(1, args.size // 8)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    lines = ["# bench_projectors", ""]
    lines.append(machine.describe())
    lines.append("")
    if not args.skip_timing:
        rows = refresh_costs(args.size, rank, device, args.repeats)
        svd = rows[0][1]
        lines += [f"## Refresh every step: one {args.size}x{args.size} matrix, rank {rank} (fp32, best of "
                  f"{args.repeats})", "",
                  "| what | seconds | ratio to exact-SVD refresh |", "|---|---:|---:|"]
        lines += [f"| {what} | {sec:.4f} | {sec / svd:.3f}x |" for what, sec in rows]
        lines.append("")
    rows_b = state_bytes_rows(args.memory_rank)
    adamw = rows_b[0][1]
    galore = next(r for r in rows_b if r[0] == "GaLoreAdamW")
    lines += [f"## Optimizer state on the LLaMA-60M shape (rank {args.memory_rank} on attention/MLP), "
              "after one step", "",
              "`state` = `lrgrad.optimizer_state_bytes` (per-param tensors + shared buffers); "
              "`projector` = the per-layer `proj_*` tensors; `shared` = buffers shared across layers "
              "(the DCT bases).", "",
              "| optimizer | state MiB | vs AdamW | vs GaLoreAdamW | projector MiB | projector vs GaLore | "
              "shared MiB |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, total, proj, shared in rows_b:
        proj_ratio = f"{proj / galore[2]:.3f}x" if galore[2] and name != "torch.optim.AdamW" else "-"
        lines.append(f"| {name} | {mib(total)} | {total / adamw:.3f}x | {total / galore[1]:.3f}x | {mib(proj)} | "
                     f"{proj_ratio} | {mib(shared)} |")
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            f.write(report)


if __name__ == "__main__":
    main()
