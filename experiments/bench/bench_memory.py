"""Optimizer-state memory of every optimizer across LLaMA sizes, measured and estimated.

    python experiments/bench/bench_memory.py          # measured on llama_9m/20m/60m shapes, estimated up to 7B

Part 1 (measured): each optimizer is built over a real ``LlamaForCausalLM`` (vocab 32000,
the config's GaLore rank on the attention/MLP matrices), stepped once with random gradients,
and its state counted with ``lrgrad.optimizer_state_bytes`` — as a ratio to
``torch.optim.AdamW``'s state in the same run. When ``lrgrad.estimate_memory`` exists its
optimizer+projector estimate for the same model is printed next to it.

Part 2 (estimated, needs ``lrgrad.estimate_memory``): the paper sizes 60M–7B in bf16 — weights,
gradients, optimizer state, projector state and their total, for AdamW, GaLore, 8-bit GaLore,
Q-GaLore (INT8 weights, per-layer updates), DCT, Flora, AuON and Muon.

Writes ``results/bench_memory.md``, ``results/bench_memory.png`` and ``results/bench_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from lrgrad_experiments import machine
from lrgrad_experiments.bench.bench_step import label, make_optimizer  # noqa: E402
from lrgrad_experiments.paths import REPO as ROOT  # noqa: E402
from lrgrad_experiments.pretrain.configs import build_model, get_config  # noqa: E402
from lrgrad_experiments.pretrain.optimizers import available_optimizers, get_spec  # noqa: E402

import lrgrad  # noqa: E402

#: registry name -> lrgrad.estimate_memory's optimizer name
ESTIMATOR_NAMES = {"adamw_foreach": "adamw", "galore_adamw": "galore", "qgalore_adamw": "qgalore",
                   "dct_adamw": "dct", "flora_adamw": "flora", "auon": "auon", "muon": "muon",
                   "apollo_adamw": "apollo", "apollo_mini_adamw": "apollo_mini", "fira_adamw": "fira"}

#: rows of the estimated table: (label, estimator optimizer, options)
ESTIMATE_ROWS = [
    ("AdamW", "adamw", {}),
    ("GaLore-AdamW", "galore", {}),
    ("GaLore-AdamW 8-bit", "galore8bit", {}),
    ("GaLore-AdamW 8-bit, per-layer", "galore8bit", {"layerwise": True}),
    ("Q-GaLore (INT8 weights, per-layer)", "qgalore", {"weight_bits": 8, "layerwise": True}),
    ("DCT-AdamW", "dct", {}),
    ("Flora-AdamW", "flora", {}),
    ("AuON", "auon", {}),
    ("Muon", "muon", {}),
]
ESTIMATE_SIZES = ["llama-60m", "llama-130m", "llama-350m", "llama-1b", "llama-7b"]


def measure(config: str, names: list[str], vocab: int) -> dict[str, Any]:
    rank = get_config(config)["rank"]
    torch.manual_seed(0)
    model = build_model(config, vocab_size=vocab, max_seq_len=256)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    rows = {}
    estimate = getattr(lrgrad, "estimate_memory", None)
    for n in names:
        opt = make_optimizer(n, model, rank)
        opt.step()
        row = {"state_bytes": lrgrad.optimizer_state_bytes(opt)}
        if estimate is not None and n in ESTIMATOR_NAMES:
            est = estimate(model, optimizer=ESTIMATOR_NAMES[n], rank=rank if n != "adamw_foreach" else None)
            row["estimated_bytes"] = est.optimizer_state + est.projector_state
        rows[n] = row
        print(f"{config:10s} {n:24s} state {row['state_bytes'] / 2**20:8.2f} MiB", flush=True)
        del opt
    return {"config": config, "rank": rank, "vocab": vocab, "params": sum(p.numel() for p in model.parameters()),
            "rows": rows}


def estimates() -> list[dict[str, Any]]:
    estimate = lrgrad.estimate_memory
    out = []
    for lab, opt, kw in ESTIMATE_ROWS:
        row = {"label": lab, "sizes": {}}
        for size in ESTIMATE_SIZES:
            e = estimate(size, optimizer=opt, **kw)
            row["sizes"][size] = {"weights": e.weights, "gradients": e.gradients, "optimizer_state": e.optimizer_state,
                                  "projector_state": e.projector_state, "total": e.total}
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="llama_9m,llama_20m,llama_60m")
    p.add_argument("--optimizers", default=None)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", default=str(ROOT / "results"))
    opts = p.parse_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    names = [n for n in (opts.optimizers.split(",") if opts.optimizers else available_optimizers()) if n != "adamw"]
    for n in names:
        get_spec(n)
    names = ["adamw_foreach", *names]
    shown = sys.argv[1:] if argv is None else argv
    command = "python experiments/bench/bench_memory.py" + (" " + " ".join(shown) if shown else "")
    measured = [measure(c, names, opts.vocab) for c in opts.configs.split(",")]
    lines = ["# Optimizer-state memory\n", f"`{command}`\n", f"Machine: {machine.describe()}\n",
             "## Measured (`lrgrad.optimizer_state_bytes` after one step; fp32 params)\n"]
    for res in measured:
        base = res["rows"]["adamw_foreach"]["state_bytes"]
        lines += [f"### {res['config']} ({res['params'] / 1e6:.1f}M params, vocab {res['vocab']}, "
                  f"rank {res['rank']})\n",
                  "| optimizer | state MiB | vs AdamW | estimator MiB |", "|---|---|---|---|"]
        for n, r in res["rows"].items():
            est = f"{r['estimated_bytes'] / 2**20:.2f}" if "estimated_bytes" in r else "—"
            lines.append(f"| {label(n)} | {r['state_bytes'] / 2**20:.2f} | {r['state_bytes'] / base:.3f} | {est} |")
        lines.append("")
    est_rows = []
    if hasattr(lrgrad, "estimate_memory"):
        est_rows = estimates()
        lines += ["## Estimated by `lrgrad.estimate_memory` (bf16 weights, GaLore ranks; GiB: "
                  "optimizer+projector state / total without activations)\n",
                  "| method | " + " | ".join(ESTIMATE_SIZES) + " |", "|---|" + "---|" * len(ESTIMATE_SIZES)]
        for row in est_rows:
            cells = []
            for size in ESTIMATE_SIZES:
                s = row["sizes"][size]
                cells.append(f"{(s['optimizer_state'] + s['projector_state']) / 2**30:.2f} / {s['total'] / 2**30:.2f}")
            lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
        lines.append("")
    else:
        lines.append("(`lrgrad.estimate_memory` not available in this lrgrad: no estimated table.)\n")
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_memory.md").write_text("\n".join(lines))
    (out / "bench_memory.json").write_text(json.dumps({"command": command, "measured": measured,
                                                       "estimated": est_rows}, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5), dpi=100)
    width = 0.8 / len(measured)
    for k, res in enumerate(measured):
        base = res["rows"]["adamw_foreach"]["state_bytes"]
        ax.bar([i + k * width for i in range(len(names))], [res["rows"][n]["state_bytes"] / base for n in names],
               width, label=res["config"])
    ax.set_xticks([i + width * (len(measured) - 1) / 2 for i in range(len(names))])
    ax.set_xticklabels([label(n) for n in names], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("optimizer state / torch AdamW")
    ax.axhline(1.0, color="k", linewidth=0.8)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "bench_memory.png")
    plt.close(fig)
    return 0


if __name__ == "__main__":
    sys.exit(main())
