"""Where GaLoreAdamW's first step goes: the first subspace refresh per LLaMA-60M matrix shape.

    python -m lrgrad_experiments.bench.first_refresh          # writes results/first_refresh.md

The first refresh has no previous basis. Per distinct block-matrix shape of LLaMA-60M (rank 128) it
times, on one thread, each way of computing the top-r basis of one gradient:

* ``warm`` (the default ``svd="warm"``): subspace iteration from seeded Gaussian columns
  (``lrgrad.projectors.svd.warm_top_basis``), with whether it converged within ``svd_warm_iters``
  power steps (when not, the refresh pays the Gram fallback on top);
* ``gram``: the eigenvectors of the projected side's Gram matrix (``svd="gram"``, the fallback);
* ``exact``: ``torch.linalg.svd`` (``svd="exact"``; galore-torch's call);

on two kinds of gradient: bench_step's (σᵢ ∝ 1/i in a random subspace) and a real LLaMA-60M gradient
(byte-level embedded corpus, one batch at initialization). Then the whole first ``optimizer.step()``
of lrgrad's GaLoreAdamW (default) and galore-torch's GaLoreAdamW (when installed), fresh optimizers
alternated ``--repeats`` times on the same gradients. Writes ``results/first_refresh.md`` (+ ``.json``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from lrgrad_experiments.bench import step_floors
from lrgrad_experiments.bench.bench_step import gradient_like
from lrgrad_experiments.paths import RESULTS
from lrgrad_experiments.pretrain.configs import build_model, get_config

import lrgrad
from lrgrad.kernels.precision import describe_cpu
from lrgrad.projectors import svd


def best_of(fn, repeats: int) -> tuple[float, Any]:
    """Median seconds of ``repeats`` calls (a shared machine: other jobs add time) and the last result."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def per_shape(grads: list[torch.Tensor], rank: int, repeats: int, oversample: int = 8, tol: float = 1e-3,
              iters: int = 3) -> list[dict[str, Any]]:
    counts = Counter(tuple(g.shape) for g in grads)
    rows = []
    for shape, count in counts.items():
        g = next(g for g in grads if tuple(g.shape) == shape)
        side = "right" if shape[0] >= shape[1] else "left"
        warm_s, basis = best_of(lambda g=g, side=side: svd.warm_top_basis(
            g, rank, side, None, oversample, tol, iters, torch.Generator().manual_seed(0)), repeats)
        gram_s, _ = best_of(lambda g=g, side=side: svd.gram_top_basis(g, rank, side), repeats)
        exact_s, _ = best_of(lambda g=g, side=side: svd.top_singular_basis(g, rank, side), repeats)
        converged = basis is not None
        rows.append({"shape": list(shape), "count": count, "warm_s": warm_s, "converged": converged,
                     "warm_total_s": warm_s + (0.0 if converged else gram_s), "gram_s": gram_s, "exact_s": exact_s})
    return rows


def real_gradients(config: str, batch: int, seq: int) -> list[torch.Tensor]:
    from lrgrad_experiments.bench.ns_precision import llama_gradients

    return llama_gradients(config, 0, batch, seq)["init"]


def first_steps(config: str, repeats: int, vocab: int) -> dict[str, list[float]]:
    """First ``step()`` of fresh optimizers on one model with bench_step's gradients, alternated."""
    rank = get_config(config)["rank"]
    torch.manual_seed(0)
    model = build_model(config, vocab_size=vocab, max_seq_len=256)
    mats, _ = step_floors.split_params(model, rank)
    generator = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    for p in mats:
        p.grad = gradient_like(tuple(p.shape), generator)
    builders = {"lrgrad GaLoreAdamW (svd=\"warm\", default)": lambda: lrgrad.GaLoreAdamW(
        lrgrad.param_groups(model, rank=rank), lr=1e-2, weight_decay=0.0)}
    for method in ("gram", "exact"):
        builders[f"lrgrad GaLoreAdamW (svd=\"{method}\")"] = lambda method=method: lrgrad.GaLoreAdamW(
            lrgrad.param_groups(model, rank=rank), lr=1e-2, weight_decay=0.0, svd=method)
    peer = step_floors.galore_torch_refresh(model, rank)
    if peer is not None:
        builders["galore-torch GaLoreAdamW"] = lambda: step_floors.galore_torch_refresh(model, rank)
    saved = [p.detach().clone() for p in model.parameters()]
    times: dict[str, list[float]] = {name: [] for name in builders}
    for _ in range(repeats):
        for name, build in builders.items():
            opt = build()
            t0 = time.perf_counter()
            opt.step()
            times[name].append(time.perf_counter() - t0)
            with torch.no_grad():
                for p, s in zip(model.parameters(), saved):
                    p.copy_(s)
            del opt
    return times


def render(res: dict[str, Any], command: str) -> str:
    lines = ["# GaLoreAdamW's first step: where the first refresh goes\n",
             f"`{command}` — CPU: {res['cpu']}; torch {res['torch']}, 1 thread. Timings are noisy (a 2-core "
             "machine shared with other jobs): medians, and ratios from one run.\n",
             f"## First refresh per {res['config']} block-matrix shape (rank {res['rank']})\n",
             "warm: subspace iteration from seeded Gaussian columns (r + 8 wide, `svd_warm_tol=1e-3`, at most "
             "3 power steps; when it does not converge the refresh pays the Gram fallback too: *warm total*).\n"]
    for source, rows in res["shapes"].items():
        lines += [f"### {source}\n", "| shape | matrices | warm ms | converged | warm total ms | gram ms "
                  "| exact SVD ms | warm total / exact |", "|---|---|---|---|---|---|---|---|"]
        tot = {"warm_total_s": 0.0, "gram_s": 0.0, "exact_s": 0.0}
        for r in rows:
            lines.append(f"| {r['shape'][0]}x{r['shape'][1]} | {r['count']} | {r['warm_s'] * 1e3:.1f} | "
                         f"{'yes' if r['converged'] else 'no'} | {r['warm_total_s'] * 1e3:.1f} | "
                         f"{r['gram_s'] * 1e3:.1f} | {r['exact_s'] * 1e3:.1f} | "
                         f"{r['warm_total_s'] / r['exact_s']:.2f}x |")
            for k in tot:
                tot[k] += r[k] * r["count"]
        lines.append(f"| all {sum(r['count'] for r in rows)} | | | | {tot['warm_total_s'] * 1e3:.0f} | "
                     f"{tot['gram_s'] * 1e3:.0f} | {tot['exact_s'] * 1e3:.0f} | "
                     f"{tot['warm_total_s'] / tot['exact_s']:.2f}x |")
        lines.append("")
    steps = res["first_steps"]
    peer = steps.get("galore-torch GaLoreAdamW")
    lines += [f"## Whole first `optimizer.step()` ({res['config']}, vocab {res['vocab']}, bench_step's gradients, "
              f"{res['repeats']} fresh optimizers each, alternated)\n",
              "| optimizer | first step ms (median) | runs ms | vs galore-torch |", "|---|---|---|---|"]
    for name, ts in steps.items():
        vs = f"{statistics.median(ts) / statistics.median(peer):.2f}x" if peer else "—"
        lines.append(f"| {name} | {statistics.median(ts) * 1e3:.0f} | {', '.join(f'{t * 1e3:.0f}' for t in ts)} "
                     f"| {vs} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="llama_60m")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--no-real", action="store_true", help="leave out the real LLaMA gradients")
    p.add_argument("--out", default=str(RESULTS))
    opts = p.parse_args(argv)
    torch.set_num_threads(1)
    rank = get_config(opts.config)["rank"]
    model = build_model(opts.config, vocab_size=256, max_seq_len=256)
    mats, _ = step_floors.split_params(model, rank)
    generator = torch.Generator().manual_seed(1)
    shapes = {"bench_step's gradients (σᵢ ∝ 1/i)": per_shape([gradient_like(tuple(p.shape), generator)
                                                                   for p in mats], rank, opts.repeats)}
    if not opts.no_real:
        real = real_gradients(opts.config, 4, 256)
        shapes["a real LLaMA gradient (init, byte-level corpus, batch 4 x 256)"] = per_shape(real, rank, opts.repeats)
    print(json.dumps(shapes, indent=1), flush=True)
    steps = first_steps(opts.config, opts.repeats, opts.vocab)
    res = {"cpu": describe_cpu(), "torch": torch.__version__, "config": opts.config, "rank": rank,
           "vocab": opts.vocab, "repeats": opts.repeats, "shapes": shapes, "first_steps": steps}
    shown = sys.argv[1:] if argv is None else argv
    command = "python -m lrgrad_experiments.bench.first_refresh" + (" " + " ".join(shown) if shown else "")
    text = render(res, command)
    print(text)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "first_refresh.md").write_text(text)
    (out / "first_refresh.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
