"""Newton–Schulz in bf16 vs fp32: orthogonality on LLaMA gradients and Muon's loss with each.

    python -m lrgrad_experiments.bench.ns_precision                 # writes results/ns_precision.md

(1) Orthogonality. LLaMA-60M shapes (hidden 512, MLP 1376, 8 layers: 56 block matrices) on the
embedded byte-level corpus: the gradients of a batch at initialization and after ``--warm-steps``
AdamW steps. For each matrix G and each precision, Muon's 5 steps and Hybrid-AuON's 1 step of the
quintic iteration (``lrgrad.kernels.newton_schulz(dtype=...)``) give O; reported over the 56
matrices: the singular-value band of O, the orthogonality error ‖OOᵀ − I‖₂ = max|σᵢ² − 1|, and
the relative distance ‖O − O*‖_F/‖O*‖_F from the exact result O* = U p⁵(S) Vᵀ (an fp64 SVD of G),
split into G's leading directions (σᵢ ≥ σ₁/256, what bf16's 8-bit significand resolves) and the
tail beyond them.

(2) Loss. Muon (and Hybrid-AuON) with ``ns_dtype="bf16"`` and ``"fp32"``, otherwise identical
(``experiments/pretrain_llama.py``: llama_9m, byte-level corpus, the demo's schedule), over
``--seeds`` seeds: final validation loss, and the seed-to-seed spread as the noise scale.

Writes ``results/ns_precision.md`` (and ``.json``) with the CPU model and whether bf16 GEMMs are native.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from lrgrad_experiments.paths import RESULTS

import lrgrad
from lrgrad.kernels import newton_schulz
from lrgrad.kernels.newton_schulz import MUON_COEFFICIENTS
from lrgrad.kernels.precision import describe_cpu

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
#: σᵢ/σ₁ below this is "tail": bf16's 8-bit significand rounds X's entries at ~2⁻⁹ of the largest
HEAD_RATIO = 1 / 256
#: the low end of the 5-step quintic's band (σ̂ ≥ 3e-3 lands in [0.68, 1.21]; tests/kernels/test_newton_schulz_math.py)
BAND_LOW = 0.68


def llama_gradients(config: str, warm_steps: int, batch: int, seq: int, seed: int = 0) -> dict[str, list]:
    """The block matrices' gradients of one batch at init and after ``warm_steps`` AdamW steps."""
    from lrgrad_experiments.pretrain.configs import build_model, get_config
    from lrgrad_experiments.pretrain.data import BatchLoader, load_corpus

    torch.manual_seed(seed)
    corpus = load_corpus("stdlib")
    loader = BatchLoader(corpus.train, batch, seq, seed=seed)
    model = build_model(config, vocab_size=256, max_seq_len=seq)
    hidden = [p for _, p in lrgrad.param_groups(model, rank=get_config(config)["rank"])[0]["params"] if p.dim() == 2]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def grads() -> list[torch.Tensor]:
        tokens = loader.next()
        logits = model(tokens[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        model.zero_grad(set_to_none=True)
        loss.backward()
        return [p.grad.detach().clone() for p in hidden]

    out = {"init": grads()}
    for _ in range(warm_steps):
        grads()
        opt.step()
    out[f"after {warm_steps} AdamW steps"] = grads()
    return out


def polar_exact_values(s: torch.Tensor, steps: int) -> torch.Tensor:
    """The exact iteration's singular values: the scalar quintic on the Frobenius-normalized σ."""
    a, b, c = MUON_COEFFICIENTS
    x = s / (torch.linalg.vector_norm(s) + 1e-7)
    for _ in range(steps):
        x = a * x + b * x**3 + c * x**5
    return x


def polar_exact(g: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(O*, S, Vh): the exact iteration result through an fp64 SVD, and G's singular values/vectors."""
    u, s, vh = torch.linalg.svd(g.double(), full_matrices=False)
    return (u * polar_exact_values(s, steps)) @ vh, s, vh


def orthogonality(grads: list[torch.Tensor], steps: int) -> dict[str, dict[str, float]]:
    rows: dict[str, dict[str, list[float]]] = {name: {} for name in PRECISIONS}
    for g in grads:
        exact, s, vh = polar_exact(g, steps)
        head = s >= s[0] * HEAD_RATIO
        band = polar_exact_values(s, steps) >= BAND_LOW
        for name, dtype in PRECISIONS.items():
            o = newton_schulz(g, steps=steps, dtype=dtype).double()
            sv = torch.linalg.svdvals(o)
            diff = o - exact
            # split by G's right singular directions: (O − O*) V restricted to head / tail columns
            dv, ev = diff @ vh.T, exact @ vh.T
            r = rows[name]
            r.setdefault("sv_min", []).append(float(sv.min()))
            r.setdefault("sv_max", []).append(float(sv.max()))
            r.setdefault("ortho", []).append(float((sv.square() - 1).abs().max()))
            if steps >= 5:  # Muon: over the directions the exact iteration brings into the band [0.68, 1.21]
                ob = o @ vh[band].T
                gram = ob.T @ ob - torch.eye(int(band.sum()), dtype=ob.dtype)
                r.setdefault("ortho_band", []).append(float(torch.linalg.matrix_norm(gram, ord=2)))
            r.setdefault("rel", []).append(float(diff.norm() / exact.norm()))
            r.setdefault("rel_head", []).append(float(dv[:, head].norm() / ev[:, head].norm()))
            if (~head).any():
                r.setdefault("rel_tail", []).append(float(dv[:, ~head].norm() / ev[:, ~head].norm()))
            r.setdefault("tail_share", []).append(float((~head).sum()) / len(s))
    out = {}
    for name, r in rows.items():
        out[name] = {"sv_min": min(r["sv_min"]), "sv_max": max(r["sv_max"]),
                     "ortho_median": statistics.median(r["ortho"]), "ortho_max": max(r["ortho"]),
                     "ortho_band_median": statistics.median(r["ortho_band"]) if r.get("ortho_band") else float("nan"),
                     "ortho_band_max": max(r["ortho_band"]) if r.get("ortho_band") else float("nan"),
                     "rel_median": statistics.median(r["rel"]), "rel_max": max(r["rel"]),
                     "rel_head_max": max(r["rel_head"]),
                     "rel_tail_median": statistics.median(r["rel_tail"]) if r.get("rel_tail") else float("nan"),
                     "tail_share": statistics.median(r["tail_share"])}
    return out


def train_loss(optimizer: str, ns_dtype: str, seed: int, steps: int, config: str) -> dict[str, Any]:
    from lrgrad_experiments import pretrain_llama

    with tempfile.TemporaryDirectory(prefix="ns-precision-") as tmp:
        args = pretrain_llama.parse_args([
            "--config", config, "--optimizer", optimizer, "--opt-arg", f"ns_dtype={ns_dtype}",
            "--max-steps", str(steps), "--batch-size", "8", "--seq-len", "256", "--eval-every", str(steps),
            "--eval-batches", "8", "--seed", str(seed), "--threads", "1", "--no-progress", "--quiet",
            "--out-dir", str(Path(tmp) / "run")])
        summary = pretrain_llama.run(args)
    return {"optimizer": optimizer, "ns_dtype": ns_dtype, "seed": seed, "val_loss": summary["final_val_loss"],
            "opt_step_ms": 1e3 * summary["opt_step_time_s"], "step_ms": 1e3 * summary["step_time_s"]}


def render(res: dict[str, Any], command: str) -> str:
    lines = ["# Newton–Schulz in bf16 vs fp32\n",
             f"`{command}` — CPU: {res['cpu']}; torch {res['torch']}, 1 thread. Timings are noisy (a 2-core "
             "machine shared with other jobs); read the losses and errors.\n",
             f"## Orthogonality on {res['config']} gradients ({res['matrices']} block matrices)\n",
             "O = Newton–Schulz of the gradient G with iterates in each precision; O* = the exact iteration "
             "(fp64 SVD of G, the scalar map on its singular values). *in band*: ‖(OV_b)ᵀ(OV_b) − I‖₂ over "
             "G's right singular directions V_b that the exact 5-step map sends into the band [0.68, 1.21] "
             "(the exact map alone gives up to 1 − 0.68² = 0.54 there); ‖OOᵀ−I‖₂ over all directions is 1 "
             "wherever G has directions too small for 5 steps to lift. *head*: G's directions with "
             "σᵢ ≥ σ₁/256, *tail*: the rest (median share of the tail given).\n",
             "| gradients | NS steps | iterates | σ(O) range | ‖OOᵀ−I‖₂ in band, median / max | ‖OOᵀ−I‖₂ all, max "
             "| ‖O−O*‖/‖O*‖ median / max | head, max | tail, median | tail share |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for label, by_steps in res["orthogonality"].items():
        for steps, by_dtype in by_steps.items():
            for name, r in by_dtype.items():
                band = "—" if r["ortho_band_max"] != r["ortho_band_max"] else \
                    f"{r['ortho_band_median']:.3f} / {r['ortho_band_max']:.3f}"
                lines.append(f"| {label} | {steps} | {name} | [{r['sv_min']:.3f}, {r['sv_max']:.3f}] | {band} | "
                             f"{r['ortho_max']:.3f} | {r['rel_median']:.1e} / "
                             f"{r['rel_max']:.1e} | {r['rel_head_max']:.1e} | {r['rel_tail_median']:.1e} | "
                             f"{r['tail_share']:.2f} |")
    lines += ["", f"## Loss: {res['loss_config']}, {res['loss_steps']} steps, byte-level embedded corpus\n",
              "| optimizer | ns_dtype | seeds | final val loss per seed | mean | optimizer.step ms (median) |",
              "|---|---|---|---|---|---|"]
    by_key: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in res["loss"]:
        by_key.setdefault((run["optimizer"], run["ns_dtype"]), []).append(run)
    for (opt, dt), runs in by_key.items():
        losses = [r["val_loss"] for r in runs]
        lines.append(f"| {opt} | {dt} | {len(runs)} | {', '.join(f'{v:.4f}' for v in losses)} | "
                     f"{statistics.mean(losses):.4f} | {statistics.median(r['opt_step_ms'] for r in runs):.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="llama_60m", help="model whose gradients are orthogonalized")
    p.add_argument("--warm-steps", type=int, default=10, help="AdamW steps before the second set of gradients")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--loss-config", default="llama_9m")
    p.add_argument("--loss-steps", type=int, default=200)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--optimizers", default="muon,hybrid_auon")
    p.add_argument("--out", default=str(RESULTS))
    opts = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    grads = llama_gradients(opts.config, opts.warm_steps, opts.batch, opts.seq)
    ortho = {label: {steps: orthogonality(gs, steps) for steps in (5, 1)} for label, gs in grads.items()}
    print(json.dumps(ortho, indent=1), flush=True)
    loss = []
    for optimizer in opts.optimizers.split(","):
        seeds = range(opts.seeds) if optimizer == "muon" else range(1)
        for seed in seeds:
            for ns_dtype in PRECISIONS:
                loss.append(train_loss(optimizer, ns_dtype, seed, opts.loss_steps, opts.loss_config))
                print(loss[-1], flush=True)
    res = {"cpu": describe_cpu(), "torch": torch.__version__, "config": opts.config,
           "matrices": len(next(iter(grads.values()))), "orthogonality": ortho, "loss": loss,
           "loss_config": opts.loss_config, "loss_steps": opts.loss_steps, "seconds": time.perf_counter() - t0}
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    shown = sys.argv[1:] if argv is None else argv
    command = "python -m lrgrad_experiments.bench.ns_precision" + (" " + " ".join(shown) if shown else "")
    (out / "ns_precision.md").write_text(render(res, command))
    (out / "ns_precision.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
