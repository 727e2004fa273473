"""``results/long_run.md``, ``.png`` and ``.json`` from the run folders of ``long_run.py``.

Every difference to AdamW is paired by seed (same model init, same batches) and printed with the
seed spread of both sides (max - min over the seeds finished); a difference is called a win or a
loss only with two seeds or more and when it is larger than the two spreads together. The step at
which a curve crosses AdamW's is read from the mean validation curves over the seeds both finished.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from lrgrad_experiments import machine
from lrgrad_experiments.paths import RESULTS
from lrgrad_experiments.pretrain.optimizers import get_spec

DEMO_JSON = RESULTS / "demo.json"


def _final(run: dict[str, Any]) -> float | None:
    if run.get("diverged") or not run["done"] or not run["history"]:
        return None
    return run["history"][-1]["val_loss"]


def _curve(run: dict[str, Any]) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in run["history"]}


def _spread(values: list[float]) -> float:
    return max(values) - min(values) if len(values) > 1 else 0.0


def crossing(curve: dict[int, float], base: dict[int, float]) -> str:
    """Where ``curve`` ends up relative to ``base``: below/above throughout, or the step of its last crossing."""
    steps = sorted(set(curve) & set(base))
    if not steps:
        return "—"
    signs = [curve[s] < base[s] for s in steps]
    where = "below" if signs[-1] else "above"
    if all(x == signs[-1] for x in signs):
        return f"{where} from the first eval"
    last_change = max(i for i in range(1, len(signs)) if signs[i] != signs[i - 1])
    return f"{where} from step {steps[last_change]}"


def _mean_curve(runs: list[dict[str, Any]]) -> dict[int, float]:
    curves = [_curve(r) for r in runs]
    common = set.intersection(*(set(c) for c in curves)) if curves else set()
    return {s: statistics.fmean(c[s] for c in curves) for s in sorted(common)}


def _demo_gaps() -> dict[str, float]:
    """Short-run (``make demo``, 200 steps) loss gap to AdamW in percent, per method."""
    if not DEMO_JSON.is_file():
        return {}
    rows = json.loads(DEMO_JSON.read_text())["results"]
    by = {r["optimizer"]: r["final_val_loss"] for r in rows}
    base = by.get("adamw")
    return {m: 100 * (v / base - 1) for m, v in by.items() if base and v is not None}


def tuned_adamw(runs: list[dict[str, Any]], best: float | None) -> dict[int, dict[str, Any]]:
    """AdamW's 2000-step run at the sweep's best lr, by seed (its paper run where that is the best lr)."""
    if best is None:
        return {}
    return {r["spec"]["seed"]: r for r in runs
            if r["spec"]["method"] == "adamw" and r["spec"]["role"] != "sweep" and r["spec"]["lr"] == best}


def table(runs: list[dict[str, Any]], role: str, seeds: list[int], best: float | None = None,
          baseline: dict[int, dict[str, Any]] | None = None) -> tuple[list[str], list[dict[str, Any]]]:
    """Markdown rows of one variant (paper lr or AdamW's best lr), and the numbers behind them.

    The baseline of each seed is AdamW's run of the same variant, or ``baseline`` (seed -> run) when given:
    the paper-lr runs against tuned AdamW, where AdamW's own paper-lr run is a row like the others."""
    def in_table(spec: dict[str, Any]) -> bool:
        if role == "best" and spec["method"] == "adamw":  # AdamW's run at the best lr (its paper run if the same)
            return spec["role"] != "sweep" and spec["lr"] == best
        return spec["role"] == role

    of_role = [r for r in runs if in_table(r["spec"])]
    methods = list(dict.fromkeys(r["spec"]["method"] for r in of_role))
    by = {(r["spec"]["method"], r["spec"]["seed"]): r for r in of_role}
    # the run each row is compared with, by seed; `compared(m)`: whether row m has a baseline other than itself
    base_of = dict(baseline) if baseline is not None else {s: by[("adamw", s)] for s in seeds if ("adamw", s) in by}

    def compared(m: str) -> bool:
        return baseline is not None or m != "adamw"
    demo = _demo_gaps()
    lines = ["| method | lr | seeds done | final val loss (mean, seed spread) | Δ vs AdamW (paired mean, its spread) "
             "| verdict | curve vs AdamW | demo (200 steps) vs AdamW | same sign at length? | step s (noisy) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    numbers = []
    for m in methods:
        runs_m = [by[(m, s)] for s in seeds if (m, s) in by]
        done = [r for r in runs_m if r["done"] and not r.get("diverged")]
        diverged = [r for r in runs_m if r.get("diverged")]
        base_done = {s: r for s, r in base_of.items() if s in seeds and r["done"] and not r.get("diverged")}
        lr = runs_m[0]["spec"]["lr"] if runs_m else None
        finals = [_final(r) for r in done]
        partial = [r for r in runs_m if not r["done"] and r["history"]]
        if finals:
            loss = f"{statistics.fmean(finals):.4f} (spread {_spread(finals):.4f})" if len(finals) > 1 else \
                f"{finals[0]:.4f} (1 seed)"
        elif partial:
            h = partial[0]["history"][-1]
            loss = f"running: {h['val_loss']:.4f} at step {h['step']}"
            base = base_of.get(partial[0]["spec"]["seed"])
            at = _curve(base).get(h["step"]) if base and compared(m) else None
            if at is not None:
                loss += f" (AdamW {at:.4f})"
        elif not diverged:
            loss = "queued"
        else:
            loss = ""
        if diverged:  # a non-finite loss stopped these seeds: part of the result, not a missing run
            loss += ("; " if loss else "") + "; ".join(f"**diverged** (seed {r['spec']['seed']}: {r['diverged']})"
                                                        for r in diverged)
        paired = [_final(r) - _final(base_done[r["spec"]["seed"]]) for r in done if r["spec"]["seed"] in base_done]
        base_finals = [_final(r) for r in base_done.values()]
        delta, verdict = "—", "—"
        if paired and compared(m):
            mean = statistics.fmean(paired)
            spread = _spread(finals) + _spread(base_finals)
            delta = f"{mean:+.4f} ({100 * mean / statistics.fmean(base_finals):+.1f}%)"
            if len(paired) > 1:
                delta += f", spread {_spread(paired):.4f}"
                verdict = ("**win**" if mean < 0 else "**loss**") if abs(mean) > spread else "within seed spread"
                verdict += f" (seed spreads: {_spread(finals):.4f} + AdamW {_spread(base_finals):.4f})"
            else:
                verdict = "1 seed: no spread yet"
        # the curve of the seeds that finished: a running seed's few evals would cut the mean curve to its
        # first steps; only while no seed has finished do the running ones give an interim crossing
        finished = [r for r in runs_m if r["done"] and r["history"]]
        curve_runs = [r for r in (finished or partial) if r["spec"]["seed"] in base_done]
        cross = crossing(_mean_curve(curve_runs), _mean_curve([base_done[r["spec"]["seed"]] for r in curve_runs])) \
            if curve_runs and compared(m) else "—"
        times = [c["step_time_s"] for r in runs_m for c in r["chunks"] if c.get("step_time_s")]
        short = f"{demo[m]:+.1f}%" if m in demo and m != "adamw" else "—"
        holds = "—"
        if paired and m in demo and m != "adamw" and compared(m):  # does the 200-step order survive 10x the steps?
            holds = "yes" if (statistics.fmean(paired) < 0) == (demo[m] < 0) else "**no: the order flips**"
        label = get_spec(m).label or m
        step_s = f"{statistics.median(times):.2f}" if times else "—"
        n_done = len(done) + len(diverged)
        lines.append(f"| {label} (`{m}`) | {lr:g} | {n_done}/{len(seeds)} | {loss} | {delta} | {verdict} | {cross} "
                     f"| {short} | {holds} | {step_s} |")
        numbers.append({"method": m, "lr": lr, "finals": finals, "paired_deltas": paired, "crossing": cross,
                        "demo_gap_percent": demo.get(m), "short_run_order_holds": holds})
    return lines, numbers


def plot(path: Path, runs: list[dict[str, Any]], best: float | None) -> None:
    """Validation curves, paper lrs left, AdamW's best lr right; tuned AdamW (black) in both panels, the
    baseline every verdict of the tuned tables is against. One color per method (up to 20), seed 1 dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 6), sharey=True)
    panels = [("paper", "each method's paper lr"), ("best", f"AdamW's best lr ({best:g})" if best else
                                                      "AdamW's best lr (sweep not finished)")]
    cmap = plt.get_cmap("tab20")
    methods = [m for m in dict.fromkeys(r["spec"]["method"] for r in runs) if m != "adamw"]
    colors: dict[str, Any] = {m: cmap(i % 20) for i, m in enumerate(methods)}
    tuned = tuned_adamw(runs, best)
    finals, lows = [], []
    for ax, (role, title) in zip(axes, panels):
        for r in runs:
            spec = r["spec"]
            is_tuned = any(r is t for t in tuned.values())
            if not r["history"] or not (is_tuned or spec["role"] == role):
                continue
            if spec["method"] == "adamw":
                color, width = ("black", 2.2) if is_tuned else ("0.55", 2.0)
                label = f"AdamW, tuned lr {best:g}" if is_tuned else f"AdamW, lr {spec['lr']:g}"
            else:
                color, width, label = colors[spec["method"]], 1.2, get_spec(spec["method"]).label
            steps = [h["step"] for h in r["history"]]
            losses = [h["val_loss"] for h in r["history"]]
            lows.append(min(losses))
            finals.append(losses[-1])
            ax.plot(steps, losses, color=color, lw=width, ls="-" if spec["seed"] == 0 else "--",
                    label=label if label not in {h.get_label() for h in ax.get_lines()} else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation loss (nats/byte); seed 0 solid, seed 1 dashed")
    if lows:  # every curve's end in view (a method far above the rest included), the early descent cut
        axes[0].set_ylim(min(lows) - 0.05, max(max(finals) + 0.15, min(lows) + 1.5))
    handles = {}
    for ax in axes:
        for h in ax.get_lines():
            if not h.get_label().startswith("_"):
                handles.setdefault(h.get_label(), h)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=6, fontsize=8)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: Path, opts: argparse.Namespace, runs: list[dict[str, Any]], best: float | None,
          command: str) -> Path:
    """Rewrite ``long_run.md`` / ``.png`` / ``.json`` in ``results`` from ``runs`` (``long_run.write_report``)."""
    results.mkdir(parents=True, exist_ok=True)
    md, png, js = results / "long_run.md", results / "long_run.png", results / "long_run.json"
    params = next((c["params"] for r in runs for c in r["chunks"]), None)
    done = sum(r["done"] for r in runs)
    tokens = opts.steps * opts.batch_size * opts.seq_len
    out = [
        "# Long runs: every method at 10x the demo's steps",
        "",
        f"`{command}` — {opts.config} ({f'{params / 1e6:.1f}M params, ' if params else ''}byte-level) on "
        f"`{opts.data}`, {opts.steps} steps x {opts.batch_size} x {opts.seq_len} tokens = {tokens:,} tokens, "
        f"seeds {' '.join(map(str, opts.seeds))}, cosine with 10% warmup to 10%, clip 1.0, no weight decay, "
        f"refresh gap = each method's default (GaLore family 200), rank = the config's; validation on "
        f"{opts.eval_batches * opts.batch_size * opts.seq_len:,} fixed held-out tokens every {opts.eval_every} "
        f"steps. Machine: {machine.describe()}, shared with other jobs (step times are noisy; compare losses, "
        "not times).",
        "",
        f"Runs finished: {done} of {len(runs)} queued"
        + ("" if best is not None else " (the runs at AdamW's best lr join the queue when the sweep finishes)")
        + (". All finished; the command that ran them (run again, it restores every finished run from "
           "long_run.json and trains nothing; "
           if best is not None and done == len(runs) else
           ". Continue (resumes every unfinished run from its checkpoint; ")
        + (f"{opts.workers} runs at once, a process of {opts.threads} thread(s) each" if opts.workers > 1
           else f"one process, {opts.threads} thread(s)") + "):",
        "",
        f"    {command}",
        "",
        "A difference is called a **win**/**loss** only with 2+ seeds and when it is larger than both sides' seed "
        "spreads added (max - min over the seeds); \"curve vs AdamW\" is where the mean validation curve ends up "
        "relative to AdamW's and the step of its last crossing. \"demo\" is the same method's gap in "
        "`results/demo.md` (llama_9m, 200 steps, gap 20, each method at its paper lr); \"same sign at length?\" "
        "says whether the long run keeps the demo's order against AdamW.",
        "",
        "## Each method at its paper defaults",
        "",
    ]
    rows, paper_numbers = table(runs, "paper", opts.seeds)
    out += rows
    tuned = tuned_adamw(runs, best)
    paper_vs_tuned: list[dict[str, Any]] = []
    if tuned:
        out += ["", f"## Each method at its paper defaults against tuned AdamW (lr {best:g})", "",
                "The same runs as above, each seed against AdamW's run at the sweep's best lr, the stronger baseline "
                "(AdamW's own paper-lr run is a row here).", ""]
        rows, paper_vs_tuned = table(runs, "paper", opts.seeds, baseline=tuned)
        out += rows
    out += ["", f"## Each method at AdamW's best lr ({best:g})" if best is not None else
            "## Each method at AdamW's best lr (the sweep has not finished)", ""]
    best_numbers: list[dict[str, Any]] = []
    if best is not None:
        rows, best_numbers = table(runs, "best", opts.seeds, best)
        out += rows
    sweep = [r for r in runs if r["spec"]["role"] == "sweep"]
    out += ["", f"## AdamW lr sweep ({opts.sweep_steps} steps, seed {opts.seeds[0]}, schedule scaled to the length)",
            "", "| lr | final val loss |", "|---|---|"]
    for r in sweep:
        final = _final(r)
        out.append(f"| {r['spec']['lr']:g} | {f'{final:.4f}' if final is not None else 'not finished'} |")
    out += ["", "![validation loss curves](long_run.png)", ""]
    md.write_text("\n".join(out))
    plot(png, runs, best)
    options = {k: v for k, v in vars(opts).items() if k not in ("as_worker", "list", "report_only")}  # the queue's
    js.write_text(json.dumps({"options": options, "best_lr": best, "paper": paper_numbers,
                              "paper_vs_tuned": paper_vs_tuned, "best": best_numbers, "runs": runs}, default=str))
    return md
