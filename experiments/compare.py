"""`make demo`: pretrain a small LLaMA with AdamW and every lrgrad optimizer, same tokens and seed.

    python experiments/compare.py                      # auto: fits ~12 minutes on a 2-core CPU
    python experiments/compare.py --steps 200 --config llama_20m --optimizers adamw,galore_adamw

Writes ``results/demo.md`` (final validation loss, bits per byte, optimizer-state bytes, step
time vs AdamW), ``results/demo_loss.png`` (validation loss curves) and ``results/demo.json``.

Budget: unless ``--steps`` is given, a short AdamW calibration measures the training-step
time on this machine and picks the number of steps (a multiple of 10, at most 200) so that
all optimizers together fit ``--budget-minutes`` (12). Runs use one torch thread by default:
on a shared CPU, OpenMP threads that wait for descheduled siblings made 2-thread steps up to
100x slower in our measurements, and one thread makes the numbers reproducible. The embedded
corpus is the Python standard library (byte-level), so nothing is downloaded.

Recipe for short runs: every method uses its paper lr (METHODS.md), the cosine schedule with
10% warmup to 10% of the peak, clipping at 1.0; the subspace refresh gap (200 over ~10k steps
in the GaLore paper) is scaled to ``max(10, steps // 10)``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from lrgrad_experiments import machine
from lrgrad_experiments.paths import REPO as ROOT  # noqa: E402
from lrgrad_experiments.pretrain.optimizers import REGISTRY, available_optimizers, get_spec  # noqa: E402
from lrgrad_experiments.pretrain_llama import lm_loss, parse_args, run  # noqa: E402


def _train_args(opts: argparse.Namespace, optimizer: str, steps: int, out: Path) -> list[str]:
    argv = ["--config", opts.config, "--optimizer", optimizer, "--max-steps", str(steps),
            "--batch-size", str(opts.batch_size), "--seq-len", str(opts.seq_len),
            "--eval-every", str(max(1, steps // opts.n_evals)), "--eval-batches", str(opts.eval_batches),
            "--seed", str(opts.seed), "--out-dir", str(out / optimizer), "--quiet",
            "--overwrite"]  # `make demo` reruns replace the previous demo's runs
    if not opts.progress:
        argv.append("--no-progress")
    if opts.max_bytes:
        argv += ["--max-bytes", str(opts.max_bytes)]
    if opts.threads:
        argv += ["--threads", str(opts.threads)]
    spec = get_spec(optimizer)
    # online subspace descent updates P every step by design: keep its own gap
    if spec.kind == "lowrank" and optimizer != "online_subspace_adamw":
        argv += ["--update-proj-gap", str(opts.gap or max(10, steps // 10))]
    return argv


def calibrate(opts: argparse.Namespace) -> float:
    """Seconds per AdamW training step (model forward/backward dominate) on this machine, now."""
    from lrgrad_experiments.pretrain.configs import build_model

    torch.manual_seed(0)
    model = build_model(opts.config, vocab_size=256, max_seq_len=opts.seq_len)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = torch.randint(0, 256, (opts.batch_size, opts.seq_len + 1))
    times = []
    for _ in range(4):
        t = time.perf_counter()
        lm_loss(model, batch).backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t)
    return sorted(times[1:])[1]


def pick_steps(step_s: float, n_opts: int, budget_s: float, n_evals: int, eval_batches: int) -> int:
    # per optimizer: steps + evals (an eval batch costs ~1/3 of a training step) + ~25% slack for
    # optimizers slower than AdamW and load changes on a shared machine
    per_opt = budget_s / n_opts
    eval_cost = n_evals * eval_batches * step_s / 3
    steps = int((per_opt - eval_cost - 5.0) / (step_s * 1.25))
    return max(10, min(200, steps // 10 * 10))


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def write_report(results: list[dict[str, Any]], meta: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    base = next((r for r in results if r["optimizer"] == "adamw"), results[0])
    lines = [
        "# `make demo`: LLaMA pretraining, AdamW vs lrgrad optimizers",
        "",
        f"`{meta['command']}` — {meta['config']} ({meta['params'] / 1e6:.2f}M params, byte-level vocab 256) "
        f"on the embedded corpus (Python {platform.python_version()} standard library, "
        f"{meta['train_bytes'] / 1e6:.1f} MB train / {meta['val_bytes'] / 1e6:.2f} MB validation, split by file); "
        f"{meta['steps']} steps x {meta['batch_size']} x {meta['seq_len']} tokens = {meta['tokens']:,} tokens, "
        f"seed {meta['seed']}, cosine schedule with 10% warmup to 10%, clip 1.0, rank {meta['rank']} "
        f"(GaLore-family refresh gap {meta['gap']}). Machine: {meta['machine']}; "
        f"total wall time {meta['wall_s'] / 60:.1f} min.",
        "",
        "| optimizer | lr | final val loss | vs AdamW | bits/byte | optimizer state | state vs AdamW "
        "| train step | vs AdamW | optimizer.step | vs AdamW |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rel = r["final_val_loss"] / base["final_val_loss"] - 1
        if r.get("separate_run"):  # merged from another run: its times met another machine load
            times = (f"| {r['step_time_s'] * 1e3:.0f} ms† | — | {r['opt_step_time_s'] * 1e3:.1f} ms† | — |")
        else:
            times = (f"| {r['step_time_s'] * 1e3:.0f} ms | {r['step_time_s'] / base['step_time_s']:.2f}x "
                     f"| {r['opt_step_time_s'] * 1e3:.1f} ms | {r['opt_step_time_s'] / base['opt_step_time_s']:.1f}x |")
        lines.append(
            f"| {REGISTRY[r['optimizer']].label} (`{r['optimizer']}`) | {r['lr']:g} | {r['final_val_loss']:.4f} "
            f"| {rel:+.1%} | {r['final_val_bpb']:.3f} | {_fmt_bytes(r['state_bytes'])} "
            f"| {r['state_bytes'] / base['state_bytes']:.2f}x " + times
        )
    separate = sorted({r["separate_run"] for r in results if r.get("separate_run")})
    if separate:
        lines += ["", "† Rows merged (`--merge`) from a separate run with the same tokens, seed and schedule: "
                  + "; ".join(f"`{c}`" for c in separate) + ". Their losses and state compare directly; "
                  "their times met another load on the shared machine, so no time ratio is given."]
    lines += [
        "",
        "State bytes are `lrgrad.optimizer_state_bytes` after the run (every tensor in `optimizer.state`, "
        "shared buffers once). Times are medians over each run; `train step` is forward + backward + "
        "clipping + `optimizer.step`, `optimizer.step` the part after backward (clipping included, refresh "
        "steps included in the run). Forward/backward are the same for every optimizer, so on a shared "
        "machine the train-step ratio mostly shows the load during each run; the `optimizer.step` ratio "
        "is the optimizer's own cost (see `experiments/bench/bench_step.py` for interleaved, steady-state timings).",
        "",
        "![validation loss](demo_loss.png)",
        "",
    ]
    galore = next((r for r in results if r["optimizer"] == "galore_adamw"), None)
    if galore is not None and base["optimizer"] == "adamw":
        gap = galore["final_val_loss"] / base["final_val_loss"] - 1
        verdict = "passes: no more than 5% above AdamW" if gap <= 0.05 else "FAILS: more than 5% above AdamW"
        lines += [f"Quality check: GaLore-AdamW (lr 0.01, scale 0.25) ends {gap:+.1%} from AdamW's "
                  f"validation loss ({verdict}).", ""]
    (out_dir / "demo.md").write_text("\n".join(lines))
    (out_dir / "demo.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for r in results:
        xs = [h["tokens"] / 1e3 for h in r["history"]]
        ys = [h["val_loss"] for h in r["history"]]
        ax.plot(xs, ys, marker="o", markersize=3, label=f"{REGISTRY[r['optimizer']].label} ({ys[-1]:.3f})",
                linewidth=2.2 if r["optimizer"] in ("adamw", "galore_adamw") else 1.2)
    ax.set_xlabel("training tokens (thousands)")
    ax.set_ylabel("validation loss (nats / byte)")
    ax.set_title(f"{meta['config']} on the Python stdlib, {meta['steps']} steps, seed {meta['seed']}")
    finals = [r["final_val_loss"] for r in results]
    ax.set_ylim(min(finals) - 0.15, max(max(finals) + 0.6, min(finals) + 1.0))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "demo_loss.png")
    plt.close(fig)


def merge_reports(extra_json: Path, out_dir: Path) -> int:
    """Rewrite ``out_dir``'s report with the runs of ``extra_json`` added (replacing same-named ones):
    adding optimizers to the demo without rerunning all of them. Both runs must share the recipe."""
    base, extra = json.loads((out_dir / "demo.json").read_text()), json.loads(extra_json.read_text())
    keys = ("config", "steps", "batch_size", "seq_len", "seed", "gap")
    if any(base["meta"][k] != extra["meta"][k] for k in keys):
        raise SystemExit(f"--merge: the runs differ in {[k for k in keys if base['meta'][k] != extra['meta'][k]]}")
    added = {r["optimizer"] for r in extra["results"]}
    results = [r for r in base["results"] if r["optimizer"] not in added]
    results += [{**r, "separate_run": extra["meta"]["command"]} for r in extra["results"]]
    meta = {**base["meta"], "wall_s": base["meta"]["wall_s"] + extra["meta"]["wall_s"]}
    write_report(results, meta, out_dir)
    print(f"merged {sorted(added)} into {out_dir / 'demo.md'}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="llama_9m")
    p.add_argument("--optimizers", default=None, help="comma-separated subset (default: every available one)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: fit --budget-minutes)")
    p.add_argument("--budget-minutes", type=float, default=12.0, help="target for all training runs together")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--n-evals", type=int, default=10, help="evaluations per run (the curve's points)")
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--gap", type=int, default=None, help="refresh gap (default max(10, steps // 10))")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-bytes", type=int, default=None, help="cap on the corpus read")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: reproducible, and on a shared CPU much faster than oversubscribing)")
    p.add_argument("--out", default=str(ROOT / "results"))
    p.add_argument("--runs-dir", default=str(ROOT / "runs" / "demo"))
    p.add_argument("--progress", action="store_true", help="tqdm bar per run")
    p.add_argument("--merge", default=None, metavar="DEMO_JSON",
                   help="no training: add the runs of another report (same --steps/--config) to --out's report")
    opts = p.parse_args(argv)
    if opts.merge:
        return merge_reports(Path(opts.merge), Path(opts.out))

    names = available_optimizers() if opts.optimizers is None else opts.optimizers.split(",")
    for n in names:
        get_spec(n)  # clear error for unknown names
    missing = [n for n in REGISTRY if n not in available_optimizers()]
    t_start = time.time()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    if opts.steps is None:
        step_s = calibrate(opts)
        opts.steps = pick_steps(step_s, len(names), opts.budget_minutes * 60, opts.n_evals, opts.eval_batches)
        print(f"calibration: {step_s * 1e3:.0f} ms per AdamW step -> {opts.steps} steps per optimizer", flush=True)
    results = []
    meta: dict[str, Any] = {}
    for name in names:
        t0 = time.time()
        args = parse_args(_train_args(opts, name, opts.steps, Path(opts.runs_dir)))
        summary = run(args)
        if summary["stopped_by_signal"] is not None:  # SIGINT/SIGTERM: the run saved a checkpoint; stop here
            print(f"{name}: stopped by signal {summary['stopped_by_signal']} at step {summary['steps']}", flush=True)
            return 130
        opt = summary.pop("optimizer_obj")
        model = summary.pop("model")
        summary["lr"] = opt.param_groups[0]["initial_lr"]
        summary["wall_s"] = time.time() - t0
        results.append(summary)
        if not meta:
            from lrgrad_experiments.pretrain.data import load_corpus

            corpus = load_corpus(args.data, args.val_percent, args.max_bytes)
            meta = {"config": opts.config, "params": sum(p.numel() for p in model.parameters()),
                    "steps": opts.steps, "batch_size": opts.batch_size, "seq_len": opts.seq_len,
                    "tokens": summary["tokens"], "seed": opts.seed, "rank": summary["rank"],
                    "gap": opts.gap or max(10, opts.steps // 10),
                    "train_bytes": len(corpus.train), "val_bytes": len(corpus.val)}
        print(f"{name:24s} val loss {summary['final_val_loss']:.4f}  bpb {summary['final_val_bpb']:.3f}  "
              f"state {_fmt_bytes(summary['state_bytes'])}  step {summary['step_time_s'] * 1e3:.0f} ms  "
              f"({summary['wall_s']:.0f} s)", flush=True)
    meta["wall_s"] = time.time() - t_start
    meta["machine"] = machine.describe()
    shown = sys.argv[1:] if argv is None else argv
    meta["command"] = "python experiments/compare.py" + (" " + " ".join(shown) if shown else "")
    meta["missing"] = missing
    write_report(results, meta, Path(opts.out))
    print(f"wrote {Path(opts.out) / 'demo.md'} and demo_loss.png in {meta['wall_s'] / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
