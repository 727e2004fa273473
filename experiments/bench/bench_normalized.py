"""Step time and state bytes of AuON, HybridAuON and Muon vs torch.optim.AdamW.

Two workloads, fp32:

* ``2048x2048``: one 2048 x 2048 matrix;
* ``llama60m``: the hidden weights of LLaMA-60M (d512, 8 layers, ffn 1376: q/k/v/o 512x512,
  gate/up 1376x512, down 512x1376 per layer) plus its 17 RMSNorm vectors (which AuON/Muon
  route to their AdamW fallback). Embeddings/head are left out: with Muon-family optimizers
  they run AdamW anyway (``rule="adamw"`` group).

Each optimizer is timed on the same params and fixed random gradients, interleaved in one run
(best of ``--repeats`` steps after one warm-up step: the minimum is the estimate least
disturbed by other jobs on a shared machine; the median is reported beside it). Ratios are to
``torch.optim.AdamW(fused=True)`` and to ``torch.optim.AdamW(foreach=True)`` from the same run.

    python experiments/bench/bench_normalized.py                 # CPU, writes results/bench_normalized.{md,png}
    python experiments/bench/bench_normalized.py --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from lrgrad_experiments import machine

import lrgrad


def workload(name: str, device: str) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    if name == "2048x2048":
        shapes = [(2048, 2048)]
    else:
        d, ffn, layers = 512, 1376, 8
        shapes = []
        for _ in range(layers):
            shapes += [(d, d)] * 4 + [(ffn, d), (ffn, d), (d, ffn), (d,), (d,)]
        shapes.append((d,))
    return [torch.nn.Parameter(torch.randn(*s, generator=gen).mul_(0.02).to(device)) for s in shapes]


def make(name: str, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if name == "AdamW (fused)":
        return torch.optim.AdamW(params, lr=1e-3, fused=True)
    if name == "AdamW (foreach)":
        return torch.optim.AdamW(params, lr=1e-3, foreach=True)
    if name == "AuON":
        return lrgrad.AuON(params, lr=0.055)
    if name == "HybridAuON":
        return lrgrad.HybridAuON(params, lr=0.055)
    if name == "Muon":
        return lrgrad.Muon(params, lr=0.02)
    raise ValueError(name)


OPTS = ["AdamW (fused)", "AdamW (foreach)", "AuON", "HybridAuON", "Muon"]


def state_bytes(opt: torch.optim.Optimizer) -> int:
    total = 0
    for state in opt.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.numel() > 1:
                total += value.numel() * value.element_size()
    return total


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bench(workload_name: str, device: str, repeats: int) -> dict[str, dict[str, float]]:
    params = workload(workload_name, device)
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(p.shape, generator=gen).to(device) for p in params]
    opts = {}
    for name in OPTS:
        copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
        for c, g in zip(copies, grads):
            c.grad = g
        opts[name] = make(name, copies)
        opts[name].step()  # warm-up (creates state)
    times: dict[str, list[float]] = {name: [] for name in OPTS}
    for _ in range(repeats):  # interleaved, so machine load hits every optimizer alike
        for name, opt in opts.items():
            sync(device)
            start = time.perf_counter()
            opt.step()
            sync(device)
            times[name].append(time.perf_counter() - start)
    out = {}
    for name, opt in opts.items():
        out[name] = {"ms": 1e3 * min(times[name]), "median_ms": 1e3 * statistics.median(times[name]),
                     "bytes": state_bytes(opt)}
    return out


def table(results: dict[str, dict[str, dict[str, float]]], device: str) -> str:
    lines = [
        f"Device: {device}; {machine.describe()}; "
        "best-of-N step time (median beside it).",
        "",
        "| workload | optimizer | step (ms) | median (ms) | × AdamW fused | × AdamW foreach | state (MiB) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for wl, res in results.items():
        fused, foreach = res["AdamW (fused)"]["ms"], res["AdamW (foreach)"]["ms"]
        for name, r in res.items():
            lines.append(f"| {wl} | {name} | {r['ms']:.2f} | {r['median_ms']:.2f} | {r['ms'] / fused:.2f} | "
                         f"{r['ms'] / foreach:.2f} | {r['bytes'] / 2**20:.2f} |")
    lines += ["", "| workload | AuON / Muon step time | HybridAuON / Muon step time |", "|---|---:|---:|"]
    for wl, res in results.items():
        muon = res["Muon"]["ms"]
        lines.append(f"| {wl} | {res['AuON']['ms'] / muon:.4f} | {res['HybridAuON']['ms'] / muon:.4f} |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, dict[str, dict[str, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.8))
    for ax, (wl, res) in zip(axes, results.items()):
        fused = res["AdamW (fused)"]["ms"]
        names = list(res)
        ratios = [res[n]["ms"] / fused for n in names]
        bars = ax.bar(range(len(names)), ratios, color=["#888", "#aaa", "#1f77b4", "#2ca02c", "#d62728"])
        ax.set_yscale("log")
        ax.set_xticks(range(len(names)), [n.replace(" ", "\n") for n in names], fontsize=8)
        ax.set_ylabel("step time / AdamW fused")
        ax.set_title(wl)
        for bar, r in zip(bars, ratios):
            ax.text(bar.get_x() + bar.get_width() / 2, r, f"{r:.2g}", ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="results/bench_normalized")
    args = parser.parse_args()
    results = {wl: bench(wl, args.device, args.repeats) for wl in ("2048x2048", "llama60m")}
    text = table(results, args.device)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("# AuON / HybridAuON / Muon step time\n\n" + text)
    plot(results, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
