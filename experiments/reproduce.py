"""One command per paper row: the papers' C4 pretraining protocol for (paper, method, size), and its table.

    python experiments/reproduce.py --paper galore --method galore_adamw --size 60m          # 1 GPU
    torchrun --nproc_per_node 8 experiments/reproduce.py --paper galore --method galore_adamw --size 1b \\
        --parallel fsdp2
    python experiments/reproduce.py --paper galore --method galore_adamw --size 60m --plan   # estimate only
    python experiments/reproduce.py --table                                                  # rewrite the table

The protocol and the papers' numbers (each with its source, and whether it was verified) live in
``pretrain/recipes.py``. A row is an ordinary ``pretrain_llama.py`` run in ``runs/reproduce/<row>/``
(checkpoints every 1000 steps, ``eval.jsonl``, ``--wandb`` optional): the same command again resumes it
from its newest checkpoint, ``--stop-after N`` stops after N steps of this invocation (preemptible jobs;
the row is then marked partial). Before it starts, the command prints the plan and the estimated GPU
time and memory (model FLOPs at an assumed utilisation; ``lrgrad.estimate_memory``). At the end (rank 0)
it writes ``results/reproduce.md``/``.json``: every row run so far beside the paper's perplexity and the gap.

``--data PATH --tokenizer PATH`` run the same pipeline on a local folder of text files with a local
tokenizer (how the tests run it without a network); any change to the protocol (``--steps``,
``--config``, ``--global-batch``, ``--seq-len``, ``--eval-tokens``, ``--data``, ...) is named in the row.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from lrgrad_experiments import machine
from lrgrad_experiments.paths import REPO, RESULTS
from lrgrad_experiments.pretrain import recipes
from lrgrad_experiments.pretrain.configs import get_config
from lrgrad_experiments.pretrain.optimizers import get_spec
from lrgrad_experiments.pretrain_llama import parse_args, run_and_close_group

import lrgrad

T5_VOCAB = 32100  # len(t5-base tokenizer): the model's vocabulary on C4


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--paper", choices=recipes.papers(), help="whose table: galore, apollo or fira")
    p.add_argument("--method", help="the row's optimizer (registry name, e.g. galore_adamw, adamw)")
    p.add_argument("--size", choices=list(recipes.SIZES), help="LLaMA size")
    p.add_argument("--plan", action="store_true", help="print the plan and the estimate, run nothing")
    p.add_argument("--table", action="store_true", help="rewrite results/reproduce.md from the run folders")
    p.add_argument("--parallel", default="none", choices=["none", "ddp", "fsdp2"], help="under torchrun")
    p.add_argument("--micro-batch", type=int, help="sequences per process per micro-step (default: the scripts')")
    p.add_argument("--stop-after", type=int, default=0, help="stop after N steps of this invocation (0: to the end)")
    p.add_argument("--seed", type=int, default=0, help="model init and data order (default: %(default)s)")
    p.add_argument("--wandb", action="store_true", help="log to Weights & Biases")
    p.add_argument("--out-root", default=str(REPO / "runs" / "reproduce"), help="row folders (default: %(default)s)")
    p.add_argument("--results", default=str(RESULTS), help="where reproduce.md/.json go (default: %(default)s)")
    p.add_argument("--gpu-tflops", type=float, default=989.0,
                   help="the GPU's dense bf16 peak for the estimate (default: %(default)s, H100 SXM)")
    p.add_argument("--mfu", type=float, default=0.25, help="assumed model-FLOPs utilisation (default: %(default)s)")
    p.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory per GPU (default: %(default)s)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no evaluation lines")
    # deviations from the protocol (named in the row)
    dev = p.add_argument_group("deviations from the protocol (tests, smoke runs; each one is named in the row)")
    dev.add_argument("--data", default="c4", help="'c4' or a folder of text files (default: %(default)s)")
    dev.add_argument("--tokenizer", default=recipes.TOKENIZER, help="hub name or local folder (default: %(default)s)")
    dev.add_argument("--config", help="model config instead of the size's")
    dev.add_argument("--steps", type=int, help="steps instead of the protocol's (the schedule follows)")
    dev.add_argument("--rank", type=int, help="projection rank instead of the recipe's")
    dev.add_argument("--global-batch", type=int, help=f"instead of {recipes.GLOBAL_BATCH}")
    dev.add_argument("--seq-len", type=int, help=f"instead of {recipes.SEQ_LEN}")
    dev.add_argument("--eval-tokens", type=int, help=f"instead of {recipes.EVAL_TOKENS:,}")
    dev.add_argument("--eval-every", type=int, help=f"instead of {recipes.EVAL_EVERY}")
    dev.add_argument("--save-every", type=int, help="instead of the eval interval")
    return p


# ---------------------------------------------------------------------------- the plan
def plan(opts: argparse.Namespace, world: int) -> dict[str, Any]:
    """Everything a row trains with, resolved, and how it deviates from the protocol."""
    recipe = recipes.get_recipe(opts.paper, opts.method)
    config, steps = recipes.SIZES[opts.size]
    deviations = {}
    for key, default in (("data", "c4"), ("tokenizer", recipes.TOKENIZER), ("config", None), ("steps", None),
                         ("rank", None),
                         ("global_batch", None), ("seq_len", None), ("eval_tokens", None), ("eval_every", None)):
        value = getattr(opts, key)
        if value is not None and value != default:
            deviations[key] = value
    config = opts.config or config
    steps = opts.steps or steps
    global_batch = opts.global_batch or recipes.GLOBAL_BATCH
    seq_len = opts.seq_len or recipes.SEQ_LEN
    micro = opts.micro_batch or min(recipes.MICRO_BATCH[opts.size], global_batch // world)
    if micro < 1 or global_batch % (micro * world):
        raise ValueError(f"Invalid micro_batch: {micro} x {world} processes does not divide the global batch "
                         f"{global_batch}")
    eval_tokens = opts.eval_tokens or recipes.EVAL_TOKENS
    eval_every = opts.eval_every or recipes.EVAL_EVERY
    rank = opts.rank or (recipe.rank[opts.size] if recipe.rank else None)
    scale = recipe.scale[opts.size] if recipe.scale else None
    return {
        "paper": opts.paper, "method": opts.method, "size": opts.size, "config": config, "steps": steps,
        "lr": recipe.lr, "rank": rank, "scale": scale, "update_proj_gap": recipes.UPDATE_PROJ_GAP,
        "global_batch": global_batch, "micro_batch": micro, "world": world,
        "grad_accum": global_batch // (micro * world), "seq_len": seq_len, "eval_tokens": eval_tokens,
        "eval_batches": max(1, math.ceil(eval_tokens / (micro * world * seq_len))),  # --batch-size = micro x world
        "eval_every": eval_every, "save_every": opts.save_every or eval_every, "seed": opts.seed,
        "recipe_source": recipe.source, "recipe_verified": recipe.verified, "deviations": deviations,
    }


def row_tag(p: dict[str, Any]) -> str:
    """The row's folder name; a run that deviates from the protocol gets its own (a hash of the deviations)."""
    tag = f"{p['paper']}-{p['method']}-{p['size']}-s{p['seed']}"
    if p["deviations"]:
        digest = hashlib.sha256(json.dumps(p["deviations"], sort_keys=True).encode()).hexdigest()[:8]
        tag += f"-custom-{digest}"
    return tag


def train_argv(opts: argparse.Namespace, p: dict[str, Any], out: Path) -> list[str]:
    """``pretrain_llama.py`` arguments of the row (``--resume`` when it has a checkpoint)."""
    argv = ["--config", p["config"], "--optimizer", p["method"], "--lr", repr(p["lr"]),
            "--max-steps", str(p["steps"]), "--batch-size", str(p["micro_batch"] * p["world"]),
            "--grad-accum", str(p["grad_accum"]), "--seq-len", str(p["seq_len"]),
            "--warmup-ratio", str(recipes.WARMUP_RATIO), "--min-lr-ratio", str(recipes.MIN_LR_RATIO),
            "--grad-clip", str(recipes.GRAD_CLIP), "--weight-decay", "0", "--eval-every", str(p["eval_every"]),
            "--eval-batches", str(p["eval_batches"]), "--save-every", str(p["save_every"]),
            "--data", opts.data, "--tokenizer", opts.tokenizer, "--seed", str(p["seed"]), "--out-dir", str(out),
            "--parallel", opts.parallel, "--device", opts.device, "--no-progress"]
    if get_spec(p["method"]).kind == "lowrank":
        argv += ["--update-proj-gap", str(p["update_proj_gap"])]
        if p["rank"] is not None:
            argv += ["--rank", str(p["rank"])]
        if p["scale"] is not None:
            argv += ["--scale", str(p["scale"])]
    if opts.threads:
        argv += ["--threads", str(opts.threads)]
    if opts.wandb:
        argv.append("--wandb")
    if opts.quiet:
        argv.append("--quiet")
    if opts.stop_after:
        argv += ["--stop-after", str(opts.stop_after)]
    checkpoints = out / "checkpoints"
    if checkpoints.is_dir() and any(c.name.startswith("step-") and not c.name.endswith(".damaged")
                                    for c in checkpoints.iterdir()):
        argv.append("--resume")
    elif (out / "eval.jsonl").exists():
        argv.append("--overwrite")  # started but never checkpointed: nothing to continue
    return argv


# ---------------------------------------------------------------------------- the estimate
def estimate(p: dict[str, Any], opts: argparse.Namespace) -> dict[str, Any]:
    """GPU hours from model FLOPs at ``--mfu`` of ``--gpu-tflops``; memory per GPU from ``lrgrad.estimate_memory``."""
    shape = get_config(p["config"])
    d, layers, vocab = shape["hidden_size"], shape["num_hidden_layers"], T5_VOCAB
    per_layer = 4 * d * d + 3 * d * shape["intermediate_size"]
    matmul_params = layers * per_layer + vocab * d  # blocks + head (the embedding is a lookup)
    tokens = p["steps"] * p["global_batch"] * p["seq_len"]
    flops_per_token = 6 * matmul_params + 6 * layers * p["seq_len"] * d  # + attention scores and values
    rate = opts.gpu_tflops * 1e12 * opts.mfu
    train_s = tokens * flops_per_token / (rate * p["world"])
    evals = p["steps"] // p["eval_every"] + 1
    eval_s = evals * p["eval_tokens"] * 2 * matmul_params / rate  # every rank evaluates the whole set
    spec = get_spec(p["method"])
    name = spec.class_name or "adamw"
    model = {"hidden_size": d, "num_hidden_layers": layers, "intermediate_size": shape["intermediate_size"],
             "num_attention_heads": shape["num_attention_heads"], "vocab_size": vocab}
    kwargs: dict[str, Any] = {"batch_size": p["micro_batch"], "seq_len": p["seq_len"]}
    if spec.kind == "lowrank" and p["rank"] is not None:
        kwargs["rank"] = p["rank"]
    if p["world"] > 1 and p.get("parallel") == "fsdp2":
        kwargs["world_size"] = p["world"]
    try:
        mem = lrgrad.estimate_memory(model, name, **kwargs)
        memory_gib = mem.total / 2**30
        memory_note = f"{memory_gib:.1f} GiB per GPU (weights, gradients, optimizer state, activations)"
    except (ValueError, TypeError, KeyError) as exc:  # a method the estimator does not model
        memory_gib, memory_note = None, f"not modelled ({exc})"
    return {"tokens": tokens, "train_gpu_hours": train_s * p["world"] / 3600, "wall_hours": (train_s + eval_s) / 3600,
            "eval_hours": eval_s / 3600, "memory_gib": memory_gib, "memory_note": memory_note,
            "assumption": f"{opts.gpu_tflops:g} TFLOP/s bf16 peak x {opts.mfu:g} MFU, {p['world']} GPU(s); "
                          "optimizer step and data loading not included"}


def print_plan(p: dict[str, Any], est: dict[str, Any], opts: argparse.Namespace) -> None:
    lines = [
        f"row: {p['paper']} / {p['method']} / {p['size']} ({p['config']}), seed {p['seed']}",
        f"  {p['steps']} steps x {p['global_batch']} x {p['seq_len']} tokens = {est['tokens'] / 1e9:.2f}B tokens; "
        f"micro-batch {p['micro_batch']} x {p['world']} process(es) x accumulation {p['grad_accum']}",
        f"  lr {p['lr']:g}, rank {p['rank']}, scale {p['scale']}, gap {p['update_proj_gap']}, warmup "
        f"{recipes.WARMUP_RATIO:.0%} + cosine to {recipes.MIN_LR_RATIO:.0%}, clip {recipes.GRAD_CLIP:g}, "
        f"eval {p['eval_tokens']:,} tokens every {p['eval_every']} steps",
        f"  recipe: {p['recipe_source']} ({'verified' if p['recipe_verified'] else 'NOT verified'})",
        f"  estimated: {est['wall_hours']:.1f} h wall ({est['train_gpu_hours']:.1f} GPU-hours of training, "
        f"{est['eval_hours']:.2f} h of evaluation) at {est['assumption']}",
        f"  memory: {est['memory_note']}",
    ]
    if est["memory_gib"] is not None and est["memory_gib"] > opts.gpu_memory_gib:
        lines.append(f"  WARNING: {est['memory_gib']:.1f} GiB > {opts.gpu_memory_gib:g} GiB per GPU: lower "
                     "--micro-batch (the accumulation grows) or add GPUs")
    if p["deviations"]:
        lines.append(f"  deviations from the protocol: {p['deviations']}")
    print("\n".join(lines), flush=True)


def plan_table(opts: argparse.Namespace) -> str:
    """Every row's estimate (``--plan`` with no row): one GPU for 60M/130M, the scripts' 4/8 for 350M/1B."""
    gpus = {"60m": 1, "130m": 1, "350m": 4, "1b": 8}
    lines = ["| paper | method | size | GPUs | steps | tokens | est. wall h | est. GPU-h | est. GiB/GPU | paper ppl |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for paper, method in recipes.RECIPES:
        for size in recipes.SIZES:
            row_opts = argparse.Namespace(**{**vars(opts), "paper": paper, "method": method, "size": size})
            p = {**plan(row_opts, gpus[size]), "parallel": "fsdp2" if gpus[size] > 1 else "none"}
            est = estimate(p, row_opts)
            number = recipes.PAPER_PPL.get((paper, method), {}).get(size)
            mem = f"{est['memory_gib']:.1f}" if est["memory_gib"] is not None else "—"
            lines.append(f"| {paper} | {method} | {size} | {gpus[size]} | {p['steps']:,} | {est['tokens'] / 1e9:.2f}B "
                         f"| {est['wall_hours']:.1f} | {est['train_gpu_hours']:.1f} | {mem} | "
                         f"{f'{number.ppl:.2f}' if number else '—'} |")
    lines.append("")
    lines.append(f"Estimate: {est['assumption'].split(',')[0]}; the optimizer step, data loading and startup are not "
                 "included; memory from lrgrad.estimate_memory at the scripts' micro-batch (FSDP2 shards for 4/8 "
                 "GPUs).")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- the table
def read_row(folder: Path) -> dict[str, Any] | None:
    row_file = folder / "row.json"
    if not row_file.is_file():
        return None
    row = json.loads(row_file.read_text())
    evals = [json.loads(line) for line in (folder / "eval.jsonl").read_text().splitlines() if line.strip()] \
        if (folder / "eval.jsonl").is_file() else []
    row["last_eval"] = evals[-1] if evals else None
    return row


def write_table(results: Path, out_root: Path) -> Path:
    rows = [r for f in sorted(out_root.glob("*")) if f.is_dir() and (r := read_row(f)) is not None]
    lines = [
        "# The papers' C4 pretraining rows, reproduced with lrgrad",
        "",
        "`python experiments/reproduce.py --paper P --method M --size S` (torchrun + `--parallel ddp|fsdp2` for "
        "several GPUs) runs one row; `--table` rewrites this page from `runs/reproduce/`. Perplexity = exp(mean "
        "validation loss) on the evaluation tokens; gap = ours / paper - 1. Protocol and sources: "
        "`experiments/pretrain/recipes.py`.",
        "",
        "Known differences from the authors' pipeline, in every row: " + "; ".join(recipes.KNOWN_DIFFERENCES) + ".",
        "",
        "| paper | method | size | steps done / protocol | ppl (ours) | ppl (paper) | gap | paper number "
        "| recipe | tokens/s | peak GiB/GPU | deviations | machine |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p, last = r["plan"], r["last_eval"]
        number = recipes.PAPER_PPL.get((p["paper"], p["method"]), {}).get(p["size"])
        ours = last["val_ppl"] if last else None
        last_step = last["step"] if last else 0
        done = r.get("run", {}).get("steps") or last_step
        partial = "" if done >= p["steps"] else " (partial)"
        paper = f"{number.ppl:.2f}" if number else "—"
        # a gap only for the protocol itself; a partial row's gap is at an earlier point of the schedule
        gap = f"{100 * (ours / number.ppl - 1):+.1f}%{partial}" if number and ours and not p["deviations"] else "—"
        status = ("verified" if number.verified else f"unverified: {number.source}") if number else "none"
        run = r.get("run", {})
        lines.append(
            f"| {p['paper']} | {p['method']} | {p['size']} | {done} / {p['steps']}{partial} | "
            f"{f'{ours:.2f} (step {last_step})' if ours else '—'} | {paper} | "
            f"{gap} | {status} | "
            f"{'verified' if p['recipe_verified'] else 'unverified'} | "
            f"{run.get('tokens_per_s', 0):,.0f} | {run.get('peak_gib') or '—'} | "
            f"{p['deviations'] or 'none'} | {r.get('machine', '')} |")
    results.mkdir(parents=True, exist_ok=True)
    md = results / "reproduce.md"
    md.write_text("\n".join(lines) + "\n")
    (results / "reproduce.json").write_text(json.dumps(rows, indent=1, default=str))
    return md


# ---------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    opts = build_parser().parse_args(argv)
    out_root = Path(opts.out_root)
    if opts.table:
        print(write_table(Path(opts.results), out_root))
        return 0
    missing = [f"--{k}" for k in ("paper", "method", "size") if getattr(opts, k) is None]
    if opts.plan and len(missing) == 3:
        print(plan_table(opts))
        return 0
    if missing:
        print(f"error: {', '.join(missing)} required (or --table)", file=sys.stderr)
        return 2
    world = int(os.environ.get("WORLD_SIZE", "1")) if opts.parallel != "none" else 1
    main_rank = int(os.environ.get("RANK", "0")) == 0
    try:
        p = plan(opts, world)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    p["parallel"] = opts.parallel
    est = estimate(p, opts)
    if main_rank:
        print_plan(p, est, opts)
    if opts.plan:
        return 0
    out = out_root / row_tag(p)
    command = shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(["reproduce.py", *argv])
    if main_rank:
        out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    summary = run_and_close_group(parse_args(train_argv(opts, p, out)))
    if not main_rank:
        return 0
    peak = None
    try:
        import torch

        if torch.cuda.is_available():
            peak = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    except ImportError:  # pragma: no cover
        pass
    step_s = summary["step_time_s"]
    row = {"plan": p, "estimate": est, "machine": machine.describe(), "command": command,
           "run": {"steps": summary["steps"], "step_time_s": step_s, "wall_s": time.time() - t0, "peak_gib": peak,
                   "tokens_per_s": p["global_batch"] * p["seq_len"] / step_s if step_s else 0}}
    (out / "row.json").write_text(json.dumps(row, indent=1, default=str))
    md = write_table(Path(opts.results), out_root)
    print(f"row written to {md}", flush=True)
    if summary["stopped_by_signal"] not in (None, "stop_after"):
        print(f"stopped by a signal; the same command resumes: {command}", flush=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
