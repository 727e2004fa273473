"""Optimizer step time against its floor and its fastest peer, all measured in one run.

    python experiments/bench/bench_step.py                                  # llama_9m, llama_20m, llama_60m shapes
    python experiments/bench/bench_step.py --configs llama_60m --steps 10   # the issue's measurement

For each model size (LLaMA shapes, vocab 32000 as in the GaLore paper, rank = the config's
GaLore rank on the attention/MLP matrices) one ``LlamaForCausalLM`` is built and given fixed
random gradients; every optimizer is built over it and stepped. The subspace refresh gap is set
beyond the run, so the timed steps are the *steady state* (no SVD); the first step (state
allocation + the first refresh) is reported on its own.

Beside the lrgrad optimizers the same round-robin times (``experiments/bench/step_floors.py``):

* each family's *floor* — the projection GEMMs + the fastest elementwise rule (fused AdamW,
  torch Adafactor, bitsandbytes AdamW8bit) over the full-rank params and tensors shaped like
  the low-rank moments; for Flora + its seeded draws; for online PCA its whole step's arithmetic
  (``pca_step_floor``), beside the floor with only its ``BᵀG`` product; for Muon / Hybrid-AuON the
  bare Newton–Schulz GEMMs in the row's precision;
* each family's *anchor* — galore-torch ``GaLoreAdamW``, ``torch.optim.Adafactor``,
  bitsandbytes ``AdamW8bit``, ``torch.optim.Muon`` on the same block matrices; Muon and Hybrid-AuON
  like for like (``NS_VARIANTS``): ``ns_dtype="bf16"`` beside ``torch.optim.Muon`` (bf16 iterates),
  ``ns_dtype="fp32"`` beside the bare fp32 Newton–Schulz; the page names the CPU and whether its
  bf16 GEMMs are native, since the bf16/fp32 ratio depends on it;
* GaLore's refresh: lrgrad (its warm default, the Gram, exact and randomized SVD) and galore-torch
  at ``update_proj_gap=2``, on gradients with a gradient's spectrum (σᵢ ∝ 1/i) whose subspace changes
  at every refresh; refresh cost = median refresh step − median plain step.

Timing is round-robin — step 1 of every row, then step 2 of every row, ... — with one torch
thread, so load changes on a shared machine hit all rows alike; the median per row is reported
and ratios (``x floor``, ``x anchor``) are taken inside the run. Peers that are not installed
are left out (``make bench-deps`` = ``pip install --no-deps bitsandbytes galore-torch``).

Writes ``results/bench_step.md``, ``results/bench_step.png`` and ``results/bench_step.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lrgrad_experiments.bench import step_floors  # noqa: E402
from lrgrad_experiments.paths import REPO as ROOT  # noqa: E402
from lrgrad_experiments.pretrain.configs import build_model, get_config  # noqa: E402
from lrgrad_experiments.pretrain.optimizers import REGISTRY, available_optimizers, build_optimizer, get_spec  # noqa: E402

import lrgrad  # noqa: E402
from lrgrad.kernels.precision import describe_cpu, native_bf16_matmul  # noqa: E402

NO_REFRESH = 10**9
BASELINES = ("adamw_foreach", "adamw_fused")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


#: lrgrad presets timed beside the experiments registry's (class name, scale): the 8-bit and
#: Adafactor variants of the GaLore family
EXTRA_OPTIMIZERS: dict[str, tuple[str, float, str]] = {
    "galore_adamw8bit": ("GaLoreAdamW8bit", 0.25, "GaLore-AdamW8bit"),
    "dct_adafactor": ("DCTAdafactor", 0.25, "DCT-Adafactor"),
    "flora_adafactor": ("FloraAdafactor", 1.0, "Flora-Adafactor"),
    # what the opt-in non-finite guard (a read of every full-rank gradient and a sync) costs
    "galore_adamw_guarded": ("GaLoreAdamW", 0.25, "GaLore-AdamW (skip_nonfinite=True)"),
}
#: extra keyword arguments of some EXTRA_OPTIMIZERS
EXTRA_OPTIONS: dict[str, dict] = {"galore_adamw_guarded": {"skip_nonfinite": True}}
#: Muon / Hybrid-AuON with the Newton–Schulz precision pinned (name -> registry name, ns_dtype): bf16 beside
#: torch.optim.Muon (bf16 iterates), fp32 beside a bare fp32 Newton–Schulz; the registry's rows run "auto"
NS_VARIANTS: dict[str, tuple[str, str]] = {
    "muon_bf16": ("muon", "bf16"), "muon_fp32": ("muon", "fp32"),
    "hybrid_auon_bf16": ("hybrid_auon", "bf16"), "hybrid_auon_fp32": ("hybrid_auon", "fp32"),
}

#: the bounded step's cost (issue 28): a registry optimizer with ``step_workspace_bytes`` beyond any model, so its
#: step runs as one chunk - every projected gradient alive at once, whole-tensor full-rank updates, as before the
#: streamed step - timed beside the same optimizer with the default 32 MiB workspace (its anchor)
ONE_CHUNK: dict[str, str] = {f"{base}_one_chunk": base for base in
                             ("galore_adamw", "flora_adamw", "apollo_mini_adamw", "fira_adamw", "galore_adamw8bit")}


def make_optimizer(name: str, model: torch.nn.Module, rank: int, gap: int | None = None) -> torch.optim.Optimizer:
    if name in ONE_CHUNK:
        opt = make_optimizer(ONE_CHUNK[name], model, rank, gap)
        opt.step_workspace_bytes = 2**62
        return opt
    if name in BASELINES:
        return build_optimizer("adamw", model, adamw_impl=name.split("_")[1])
    if name in NS_VARIANTS:
        base, ns_dtype = NS_VARIANTS[name]
        return build_optimizer(base, model, ns_dtype=ns_dtype)
    if name in EXTRA_OPTIMIZERS:
        cls_name, scale, _ = EXTRA_OPTIMIZERS[name]
        groups = lrgrad.param_groups(model, rank=rank, update_proj_gap=gap or NO_REFRESH, scale=scale)
        return lrgrad.OPTIMIZERS[cls_name](groups, lr=1e-2, weight_decay=0.0, **EXTRA_OPTIONS.get(name, {}))
    spec = get_spec(name)
    if spec.kind == "lowrank":
        # steady state: no refresh inside the timed steps (online subspace descent and LDAdam update P
        # every step by design, so they keep their own gap)
        if gap is None:
            gap = None if name in ("online_subspace_adamw", "ldadamw") else NO_REFRESH
        return build_optimizer(name, model, rank=rank, update_proj_gap=gap)
    return build_optimizer(name, model)


#: singular-value decay of the refresh runners' gradients (σᵢ ∝ i^-decay): LLaMA blocks' gradients
#: measured along a GaLore run fall as i^-1.2 to i^-6 (σ₁/σ_r of 30-200), so 1.0 is on the flat side
REFRESH_SPECTRUM_DECAY = 1.0


def gradient_like(shape: tuple[int, ...], generator: torch.Generator, decay: float = REFRESH_SPECTRUM_DECAY,
                  rms: float = 1e-3) -> torch.Tensor:
    """``U diag(i^-decay) Vᵀ`` with random orthonormal U, V, scaled to ``rms``: a gradient's spectrum
    in a random subspace (the benchmark's plain ``randn`` gradients have a flat one)."""
    m, n = shape
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=generator))
    g = (u * torch.arange(1, k + 1, dtype=torch.float32) ** -decay) @ v.T
    return g * (rms / g.square().mean().sqrt())


def swapping_step(step: Callable[[], Any], params: list[torch.Tensor],
                  pools: list[list[torch.Tensor]]) -> Callable[[], None]:
    """``step`` with ``params``' gradients taken from ``pools`` in turn, two calls each (gap 2: one
    refresh step and one plain step per pool), and the params' own gradients put back after it."""
    calls = [0]

    def timed_step() -> None:
        pool = pools[calls[0] // 2 % len(pools)]
        calls[0] += 1
        saved = [p.grad for p in params]
        for p, g in zip(params, pool):
            p.grad = g
        try:
            step()
        finally:
            for p, g in zip(params, saved):
                p.grad = g

    return timed_step


def refresh_runners(model: torch.nn.Module, rank: int) -> dict[str, step_floors.Runner]:
    """GaLore refreshing on every second step (gap 2): lrgrad's warm default, the Gram and exact SVD and
    the randomized SVD, and galore-torch.

    The projected matrices get gradients with a gradient's spectrum (:func:`gradient_like`) from two
    pools used in turn, so each refresh meets a gradient whose subspace is unrelated to the previous
    basis: the warm start helps nothing (the pessimistic case for ``svd="warm"``), as after a long gap.
    """
    mats, _ = step_floors.split_params(model, rank)
    generator = torch.Generator().manual_seed(1)
    pools = [[gradient_like(tuple(p.shape), generator).to(p.device, p.dtype) for p in mats] for _ in range(2)]

    def runner(step: Callable[[], Any]) -> step_floors.Runner:
        return step_floors.Runner(swapping_step(step, mats, pools))

    runners = {}
    for svd in ("warm", "gram", "exact", "randomized"):
        opt = lrgrad.GaLoreAdamW(lrgrad.param_groups(model, rank=rank, update_proj_gap=2), lr=1e-2,
                                 weight_decay=0.0, svd=svd)
        runners[f"refresh_{svd}"] = runner(opt.step)
    peer = step_floors.galore_torch_refresh(model, rank)
    if peer is not None:
        runners["refresh_galore_torch"] = runner(peer.step)
    return runners


def bench_size(config: str, names: list[str], steps: int, vocab: int, seed: int = 0,
               references: bool = True, refresh: bool = True) -> dict[str, Any]:
    """Time ``names`` (+ their floors/anchors and the refresh runners) round-robin on one model.

    Every runner is stepped once per round, in the same order, for ``steps + 1`` rounds; the
    first round (state allocation + first refresh) is reported on its own and the median of the
    others is the step time.
    """
    rank = get_config(config)["rank"]
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(config, vocab_size=vocab, max_seq_len=256).to(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    runners: dict[str, step_floors.Runner] = {}
    for n in names:
        opt = make_optimizer(n, model, rank)
        runners[n] = step_floors.Runner(opt.step, lambda opt=opt: lrgrad.optimizer_state_bytes(opt))
    missing: list[str] = []
    if references and device == "cpu":
        wanted = {ref for n in names for ref in step_floors.FAMILIES.get(ONE_CHUNK.get(n, n), (None, None)) if ref}
        wanted |= {ref for n in names for ref in step_floors.ALSO_MEASURED.get(n, ())}
        for ref in sorted(wanted - set(runners)):
            if ref in step_floors.LABELS:
                runner = step_floors.build_reference(ref, model, rank)
                if runner is None:
                    missing.append(ref)
                else:
                    runners[ref] = runner
    if refresh and device == "cpu":
        # the refresh rows step first in every round: their first step (state + first refresh) then meets
        # the process as a training run's first step does, not after ~30 other optimizers' first steps
        # (which added ~1.4 s to each of them, galore-torch's included, in a full LLaMA-60M run)
        runners = {**refresh_runners(model, rank), **runners}
    first: dict[str, float] = {}
    times: dict[str, list[float]] = {n: [] for n in runners}
    errors: dict[str, str] = {}
    for i in range(steps + 1):
        for n, runner in list(runners.items()):
            _sync()
            t0 = time.perf_counter()
            try:
                runner.step()
            except Exception as exc:  # a broken optimizer is reported, not allowed to stop the benchmark
                if n in BASELINES:
                    raise
                errors[n] = f"{type(exc).__name__}: {exc}"
                print(f"{config} {n}: step failed ({errors[n]}); skipped", flush=True)
                del runners[n]
                continue
            _sync()
            dt = time.perf_counter() - t0
            if i == 0:
                first[n] = dt
            else:
                times[n].append(dt)
    rows: dict[str, dict[str, Any]] = {}
    refreshes: dict[str, dict[str, float]] = {}
    for n, runner in runners.items():
        if n.startswith("refresh_"):
            # rounds 1, 2, ... are optimizer steps 2, 3, ...: odd steps refresh (gap 2)
            on = [t for k, t in enumerate(times[n], start=2) if k % 2 == 1]
            off = [t for k, t in enumerate(times[n], start=2) if k % 2 == 0]
            refreshes[n[len("refresh_"):]] = {
                "first_step_s": first[n],
                "refresh_s": statistics.median(on) - statistics.median(off) if on and off else float("nan"),
            }
            continue
        floor, anchor = step_floors.FAMILIES.get(n, (None, None))
        if n in ONE_CHUNK:  # beside its floor, and anchored to the same optimizer with the bounded step
            floor, anchor = step_floors.FAMILIES.get(ONE_CHUNK[n], (None, None))[0], ONE_CHUNK[n]
        rows[n] = {"step_s": statistics.median(times[n]), "first_step_s": first[n],
                   "state_bytes": runner.state_bytes() if runner.state_bytes else None,
                   "floor": floor, "anchor": anchor}
    params = sum(p.numel() for p in model.parameters())
    gemm = step_floors.gemm_work(model, rank)
    del runners, model
    return {"config": config, "rank": rank, "vocab": vocab, "params": params, "rows": rows, "errors": errors,
            "refresh": refreshes, "missing": missing, "steps": steps, "gemm_work": gemm}


def gemm_line(res: dict[str, Any]) -> list[str]:
    """Online PCA's GEMM multiply-adds over GaLore's (``step_floors.gemm_work``): the bound under its step."""
    gemm = res.get("gemm_work")
    if not gemm:
        return []
    return [f"GEMM work of the projected matrices per step: GaLore/DCT/Flora {gemm['galore'] / 1e9:.2f} G "
            f"multiply-adds, online PCA {gemm['online_pca'] / 1e9:.2f} G "
            f"(**{gemm['online_pca'] / gemm['galore']:.2f}x**: C = BᵀĜ is one more m·n·r product, K, KP, the "
            "Gram and L⁻¹P four r²·d ones), a ratio no implementation of the method goes under.\n"]


def label(name: str) -> str:
    if name in ("adamw_foreach", "adamw_fused"):
        return {"adamw_foreach": "torch AdamW (foreach)", "adamw_fused": "torch AdamW (fused)"}[name]
    if name in step_floors.LABELS:
        return step_floors.LABELS[name]
    if name in EXTRA_OPTIMIZERS:
        return EXTRA_OPTIMIZERS[name][2]
    if name in ONE_CHUNK:
        return f"{label(ONE_CHUNK[name])}, one chunk (step_workspace_bytes unbounded)"
    if name in NS_VARIANTS:
        base, ns_dtype = NS_VARIANTS[name]
        return f"{REGISTRY[base].label} (ns_dtype={ns_dtype})"
    if name in ("muon", "hybrid_auon"):
        resolved = "bf16" if native_bf16_matmul("cpu") else "fp32"
        return f"{REGISTRY[name].label} (ns_dtype=auto: {resolved})"
    return REGISTRY[name].label if name in REGISTRY else name


def _ms(seconds: float | None) -> str:
    return "—" if seconds is None or seconds != seconds else f"{seconds * 1e3:.1f}"


def table(res: dict[str, Any]) -> list[str]:
    """The markdown table of one size: every row with its floor and anchor and the two ratios."""
    rows = res["rows"]
    fe, fu = rows["adamw_foreach"], rows["adamw_fused"]
    lines = ["| optimizer | state MiB | state vs AdamW | step ms | vs fused AdamW | floor ms | x floor "
             "| anchor | anchor ms | x anchor | first step ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for n, r in rows.items():
        sb = r["state_bytes"]
        state = "—" if sb is None else f"{sb / 2**20:.1f}"
        ratio = "—" if sb is None else f"{sb / fe['state_bytes']:.3f}"
        floor = rows.get(r.get("floor") or "")
        anchor = rows.get(r.get("anchor") or "")
        cells = [label(n), state, ratio, _ms(r["step_s"]), f"{r['step_s'] / fu['step_s']:.2f}x"]
        cells += [_ms(floor["step_s"]), f"{r['step_s'] / floor['step_s']:.2f}x"] if floor else ["—", "—"]
        if anchor:
            cells += [label(r["anchor"]), _ms(anchor["step_s"]), f"{r['step_s'] / anchor['step_s']:.2f}x"]
        else:
            cells += ["—", "—", "—"]
        cells.append(f"{r['first_step_s'] * 1e3:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    for n, err in res.get("errors", {}).items():
        lines.append(f"| {label(n)} | failed: {err} |" + " |" * 9)
    return lines


def refresh_table(res: dict[str, Any]) -> list[str]:
    """First step and refresh of GaLore-AdamW (warm default / Gram / exact / randomized SVD) against galore-torch."""
    ref = res.get("refresh") or {}
    if not ref:
        return []
    peer = ref.get("galore_torch")
    steady = res["rows"].get("galore_adamw", {}).get("step_s")
    lines = ["| GaLore-AdamW refresh | first step ms | vs galore-torch first step | refresh ms | "
             "amortised at gap 200 (% of GaLore-AdamW step) |", "|---|---|---|---|---|"]
    for name in ("warm", "gram", "exact", "randomized", "galore_torch"):
        if name not in ref:
            continue
        r = ref[name]
        vs = f"{r['first_step_s'] / peer['first_step_s']:.2f}x" if peer else "—"
        amort = f"{100 * r['refresh_s'] / 200 / steady:.2f}%" if steady else "—"
        who = {"warm": "lrgrad, svd=\"warm\" (default)", "gram": "lrgrad, svd=\"gram\"",
               "exact": "lrgrad, svd=\"exact\"", "randomized": "lrgrad, svd=\"randomized\" (warm-started)",
               "galore_torch": "galore-torch"}[name]
        lines.append(f"| {who} | {_ms(r['first_step_s'])} | {vs} | {_ms(r['refresh_s'])} | {amort} |")
    return lines


def write(results: list[dict[str, Any]], out: Path, command: str, stem: str = "bench_step") -> None:
    out.mkdir(parents=True, exist_ok=True)
    # the CPU model and whether its bf16 GEMMs are native: a ratio of bf16 rows (Muon, torch.optim.Muon) holds
    # for that kind of CPU only (2x faster than fp32 with AVX512-BF16, slower than fp32 where emulated)
    machine = torch.cuda.get_device_name() if torch.cuda.is_available() else \
        f"CPU: {describe_cpu()}, {torch.get_num_threads()} thread(s)"
    lines = ["# Optimizer step time against its floor and its fastest peer\n",
             f"`{command}` — {machine}, torch {torch.__version__}. Steady-state `optimizer.step()` "
             "(no subspace refresh), fixed random gradients, rank = the config's GaLore rank on the "
             "attention/MLP matrices. Every optimizer, floor and anchor is stepped round-robin in one run "
             "(step 1 of all, then step 2 of all, ...) and the median per row is reported, so machine load "
             "hits all rows alike: read the ratios, not the absolute times.\n",
             "*floor*: the least work of the family with the fastest pieces (projection GEMMs + the peer's "
             "elementwise rule on the full-rank params and on tensors shaped like the low-rank moments; "
             "for online PCA, its whole step's arithmetic with no bookkeeping, beside the floor with only "
             "its BᵀG product; for Muon, the bare Newton–Schulz GEMMs on the same block matrices, in the "
             "row's precision). *anchor*: the peer a user would run instead; for Muon and Hybrid-AuON like for "
             "like: `ns_dtype=bf16` (and `auto` where it resolves to bf16) beside `torch.optim.Muon` (bf16 "
             "iterates) on the same block matrices, `ns_dtype=fp32` beside the bare fp32 Newton–Schulz. "
             "`x floor` and `x anchor` are step ms over theirs.\n"]
    for res in results:
        lines += [f"## {res['config']} ({res['params'] / 1e6:.1f}M params, vocab {res['vocab']}, rank {res['rank']})\n"]
        lines += table(res)
        lines.append("")
        lines += gemm_line(res)
        if res.get("missing"):
            lines.append("Not installed (rows left out): " + ", ".join(label(n) for n in res["missing"]) +
                         " — `pip install --no-deps bitsandbytes galore-torch`.\n")
        refresh = refresh_table(res)
        if refresh:
            lines += ["Subspace refresh (GaLore-AdamW with `update_proj_gap=2` in the same round-robin, stepped "
                      "first in each round, on gradients with σᵢ ∝ 1/i in a new random subspace at every "
                      "refresh; refresh ms = median refresh step − median plain step):\n", *refresh, ""]
    (out / f"{stem}.md").write_text("\n".join(lines))
    (out / f"{stem}.json").write_text(json.dumps({"command": command, "results": results}, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5), dpi=100)
    names = [n for n in results[0]["rows"] if results[0]["rows"][n]["state_bytes"] is not None
             and all(n in r["rows"] for r in results)]
    width = 0.8 / len(results)
    for k, res in enumerate(results):
        rows = res["rows"]
        xs = [i + k * width for i in range(len(names))]
        axes[0].bar(xs, [rows[n]["state_bytes"] / rows["adamw_foreach"]["state_bytes"] for n in names], width,
                    label=res["config"])
        axes[1].bar(xs, [rows[n]["step_s"] / rows["adamw_fused"]["step_s"] for n in names], width,
                    label=res["config"])
    for ax, title in zip(axes, ("optimizer state / AdamW", "step time / fused AdamW")):
        ax.set_xticks([i + width * (len(results) - 1) / 2 for i in range(len(names))])
        ax.set_xticklabels([label(n) for n in names], rotation=60, ha="right", fontsize=8)
        ax.axhline(1.0, color="k", linewidth=0.8)
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"{stem}.png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="llama_9m,llama_20m,llama_60m")
    p.add_argument("--optimizers", default=None, help="comma-separated registry names (default: all available)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per optimizer (after the first)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable on a shared CPU)")
    p.add_argument("--out", default=str(ROOT / "results"))
    p.add_argument("--no-references", action="store_true", help="leave out the floors and anchors")
    p.add_argument("--no-refresh", action="store_true", help="leave out the refresh measurement")
    p.add_argument("--stem", default="bench_step", help="output file names: <out>/<stem>.md, .json, .png")
    opts = p.parse_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    default = available_optimizers() + list(EXTRA_OPTIMIZERS) + list(NS_VARIANTS)
    names = [n for n in (opts.optimizers.split(",") if opts.optimizers else default) if n != "adamw"]
    for n in names:
        if n not in EXTRA_OPTIMIZERS and n not in NS_VARIANTS and n not in ONE_CHUNK:
            get_spec(n)
    names = list(BASELINES) + names
    results = []
    for config in opts.configs.split(","):
        res = bench_size(config, names, opts.steps, opts.vocab, references=not opts.no_references,
                         refresh=not opts.no_refresh)
        results.append(res)
        print("\n".join(table(res) + [""] + gemm_line(res) + refresh_table(res)), flush=True)
    shown = sys.argv[1:] if argv is None else argv
    write(results, Path(opts.out), "python experiments/bench/bench_step.py" + (" " + " ".join(shown) if shown else ""),
          stem=opts.stem)
    return 0


if __name__ == "__main__":
    sys.exit(main())
