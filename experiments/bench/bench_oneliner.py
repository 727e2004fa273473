"""The one-liner against torch.optim.AdamW at the same lr: does switching keep the loss?

    python experiments/bench/bench_oneliner.py --out results/oneliner.md   # both shapes, lr 1e-3 and 3e-3
    python experiments/bench/bench_oneliner.py --shapes byte --steps 300 --lrs 1e-3

For each model shape and each lr η, trains the same LLaMA (same init, same batches, same
warmup + cosine schedule) with ``torch.optim.AdamW(model.parameters(), lr=η)`` and with every
preset of ``lrgrad.OPTIMIZERS`` written the way a user switching from AdamW writes it::

    lrgrad.GaLoreAdamW(model.named_parameters(), rank=r, lr=η)    # no other argument

(``rank=r`` only for presets that need one: APOLLO-Mini keeps its rank 1, Muon/AuON/Hybrid-AuON
run unprojected; their AdamW fallback for 1-D params and the routed embeddings/head runs at its
own default ``adamw_lr``), and prints the final validation loss of each, relative to AdamW's at
the same lr (the goal: within +3%). A preset whose own default lr is not AdamW's (Adafactor 1e-2,
Lion 1e-4, Muon 0.02, AuON 0.055) and APOLLO-Mini at its paper's lr (1e-2) get one more row at
that lr, compared with AdamW's best loss of the shape. Two more rows show what the defaults
replace: ``model.parameters()`` (no names: embeddings and head projected too) and galore-torch's
``scale=0.25`` with ``model.parameters()``.

Shapes: ``byte`` is ``llama_9m`` (hidden 128, 4 layers, vocab 256) on the embedded corpus,
byte-level; ``vocab32k`` is the same blocks with a 32000-token vocabulary, on the embedded corpus
read as 2-byte tokens (``(b0·256 + b1) mod 32000``, exact for ASCII text), so the embedding and
the untied head hold 91% of the parameters, as in a real small LLM. One torch thread.
"""

from __future__ import annotations

import argparse
import inspect
import math
import platform
import sys
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lrgrad_experiments.pretrain.configs import build_model, get_config  # noqa: E402
from lrgrad_experiments.pretrain.data import BatchLoader, eval_batches, load_stdlib  # noqa: E402

import lrgrad  # noqa: E402

#: every registered preset, in registry order
PRESETS = tuple(lrgrad.OPTIMIZERS)
#: presets that run without a rank by default (matrix rules without a projector) or keep their own
OWN_RANK = ("APOLLOMiniAdamW", "Muon", "AuON", "HybridAuON")
#: a preset's own lr where it is not AdamW's: its constructor default, or the paper's (APOLLO-Mini)
PAPER_LR = {"APOLLOMiniAdamW": 1e-2}
#: the suffix of a row run at the preset's own lr
OWN_LR = " @ own lr"
#: shape -> (config, vocab, batch size, sequence length in tokens)
SHAPES: dict[str, tuple[str, int, int, int]] = {
    "byte": ("llama_9m", 256, 8, 64),
    "vocab32k": ("llama_9m", 32000, 4, 64),
}
GOAL = 0.03


def pair_tokens(stream: np.ndarray, vocab: int) -> np.ndarray:
    """Bytes -> 2-byte tokens ``(b0·256 + b1) mod vocab``."""
    n = len(stream) // 2 * 2
    pairs = stream[:n].astype(np.int64).reshape(-1, 2)
    return ((pairs[:, 0] << 8 | pairs[:, 1]) % vocab).astype(np.int64)


def own_lr(preset: str) -> float:
    """The lr a preset is meant to run at: the paper's (``PAPER_LR``) or its constructor default."""
    if preset in PAPER_LR:
        return PAPER_LR[preset]
    return float(inspect.signature(lrgrad.OPTIMIZERS[preset].__init__).parameters["lr"].default)


def build_optimizer(variant: str, model: torch.nn.Module, lr: float, rank: int) -> torch.optim.Optimizer:
    if variant == "AdamW":
        return torch.optim.AdamW(model.parameters(), lr=lr)
    if variant == "GaLoreAdamW, model.parameters()":
        return lrgrad.GaLoreAdamW(model.parameters(), rank=rank, lr=lr)
    if variant == "GaLoreAdamW, model.parameters(), scale=0.25 (old default)":
        return lrgrad.GaLoreAdamW(model.parameters(), rank=rank, lr=lr, scale=0.25)
    if variant.startswith("GaLoreAdamW, scale="):
        return lrgrad.GaLoreAdamW(model.named_parameters(), rank=rank, lr=lr, scale=float(variant.split("=")[1]))
    preset = variant.removesuffix(OWN_LR)
    kwargs = {} if preset in OWN_RANK else {"rank": rank}
    return lrgrad.OPTIMIZERS[preset](model.named_parameters(), lr=lr, **kwargs)


def lm_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=batch[:, :-1]).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    model.eval()
    loss = sum(float(lm_loss(model, b)) for b in batches) / len(batches)
    model.train()
    return loss


def train(variant: str, shape: str, lr: float, steps: int, data: dict[str, Any], config: str,
          seed: int = 0) -> dict[str, Any]:
    _, vocab, batch_size, seq_len = SHAPES[shape]
    torch.manual_seed(seed)
    model = build_model(config, vocab_size=vocab, max_seq_len=seq_len)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the model.parameters() rows warn by design
        opt = build_optimizer(variant, model, lr, get_config(config)["rank"])
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup))))
    loader = BatchLoader(data["train"], batch_size, seq_len, seed=seed)
    start = time.perf_counter()
    for _ in range(steps):
        loss = lm_loss(model, loader.next())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if not math.isfinite(loss.item()):
            break
    return {"variant": variant, "shape": shape, "lr": lr, "val_loss": evaluate(model, data["val"]),
            "seconds": time.perf_counter() - start}


def load_data(shape: str, eval_n: int, max_bytes: int) -> dict[str, Any]:
    _, vocab, batch_size, seq_len = SHAPES[shape]
    corpus = load_stdlib(max_bytes=max_bytes)
    train_tokens, val_tokens = corpus.train, corpus.val
    if vocab != 256:
        train_tokens, val_tokens = pair_tokens(train_tokens, vocab), pair_tokens(val_tokens, vocab)
    return {"train": train_tokens, "val": eval_batches(val_tokens, batch_size, seq_len, eval_n)}


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| shape | lr | optimizer (one line, defaults) | final val loss | vs AdamW | within 3% |",
             "|---|---|---|---:|---:|---|"]
    base = {(r["shape"], r["lr"]): r["val_loss"] for r in results if r["variant"] == "AdamW"}
    best: dict[str, float] = {}
    for (shape, _), loss in base.items():
        best[shape] = min(loss, best.get(shape, math.inf))
    for r in results:
        own = r["variant"].endswith(OWN_LR)  # at the preset's own lr: against AdamW's best lr of the shape
        ref = best.get(r["shape"]) if own else base.get((r["shape"], r["lr"]))
        if not ref:  # AdamW not in this run (--skip-adamw): no verdict
            rel_cell, ok = "n/a", "n/a"
        else:
            rel = r["val_loss"] / ref - 1
            rel_cell = f"{rel:+.1%}"
            ok = "—" if r["variant"] == "AdamW" else ("yes" if rel <= GOAL else "**no**")
        lines.append(f"| {r['shape']} | {r['lr']:g} | {r['variant']} | {r['val_loss']:.4f} | {rel_cell} | {ok} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--lrs", nargs="+", type=float, default=[1e-3, 3e-3])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--variants", nargs="+", default=None,
                        help="optimizers to run besides AdamW (default: every preset + the two reference rows)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-adamw", action="store_true",
                        help="leave out the AdamW reference runs (to split a sweep over processes)")
    parser.add_argument("--config", default=None, help="model shape instead of each shape's llama_9m (tests)")
    parser.add_argument("--max-bytes", type=int, default=6_000_000, help="bytes of the corpus to read")
    parser.add_argument("--no-own-lr", action="store_true", help="leave out the rows at each preset's own lr")
    parser.add_argument("--out", default=None, help="also write the report (markdown) to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    variants = args.variants or [*PRESETS, "GaLoreAdamW, model.parameters()",
                                 "GaLoreAdamW, model.parameters(), scale=0.25 (old default)"]
    own_rows = [] if args.no_own_lr else [v for v in variants if v in lrgrad.OPTIMIZERS and own_lr(v) not in args.lrs]
    results = []
    start = time.time()
    for shape in args.shapes:
        data = load_data(shape, args.eval_batches, args.max_bytes)
        config = args.config or SHAPES[shape][0]
        runs = [(lr, variant) for lr in args.lrs for variant in ([] if args.skip_adamw else ["AdamW"]) + variants]
        runs += [(own_lr(v), v + OWN_LR) for v in own_rows]
        for lr, variant in runs:
            r = train(variant, shape, lr, args.steps, data, config)
            results.append(r)
            print(f"{shape} lr={lr:g} {variant}: val {r['val_loss']:.4f} ({r['seconds']:.0f} s)", flush=True)
    shapes = {s: (args.config or SHAPES[s][0], *SHAPES[s][1:]) for s in args.shapes}
    rank = get_config(args.config or "llama_9m")["rank"]
    command = " ".join(["python experiments/bench/bench_oneliner.py", *(argv if argv is not None else sys.argv[1:])])
    from lrgrad_experiments.machine import describe

    header = (f"`{command}` — "
              f"{args.steps} steps, warmup 10% + cosine to 10%, clip 1.0, wd 0.01 (AdamW's default), rank = "
              f"hidden/4 = {rank} (APOLLO-Mini: its own 1; Muon/AuON/Hybrid-AuON: unprojected), every other "
              f"argument at its default; a row `@ own lr` runs the preset at its own default lr (APOLLO-Mini: "
              f"the paper's 1e-2) and is compared with AdamW's best lr of its shape; shapes (config, vocab, batch, "
              f"seq) {shapes}; {describe()}, {platform.machine()}, {(time.time() - start) / 60:.1f} min.")
    report = f"{header}\n\n{table(results)}\n"
    print("\n" + report)
    if args.out:
        with open(args.out, "w") as f:
            f.write("# The one-liner against torch.optim.AdamW at the same lr\n\n" + report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
