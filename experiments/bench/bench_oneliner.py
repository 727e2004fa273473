"""The one-liner against torch.optim.AdamW at the same lr: does switching keep the loss?

    python experiments/bench/bench_oneliner.py                          # both shapes, lr 1e-3 and 3e-3
    python experiments/bench/bench_oneliner.py --shapes byte --steps 300 --lrs 1e-3

For each model shape and each lr η, trains the same LLaMA (same init, same batches, same
warmup + cosine schedule) with ``torch.optim.AdamW(model.parameters(), lr=η)`` and with every
projected preset written the way a user switching from AdamW writes it::

    lrgrad.GaLoreAdamW(model.named_parameters(), rank=r, lr=η)    # no other argument

and prints the final validation loss of each, relative to AdamW's (the goal: within +3%).
Two more rows show what the defaults replace: ``model.parameters()`` (no names: embeddings and
head projected too) and the old default ``scale=0.25`` with ``model.parameters()``.

Shapes: ``byte`` is ``llama_9m`` (hidden 128, 4 layers, vocab 256) on the embedded corpus,
byte-level; ``vocab32k`` is the same blocks with a 32000-token vocabulary, on the embedded corpus
read as 2-byte tokens (``(b0·256 + b1) mod 32000``, exact for ASCII text), so the embedding and
the untied head hold 91% of the parameters, as in a real small LLM. One torch thread.
"""

from __future__ import annotations

import argparse
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

PRESETS = ("GaLoreAdamW", "DCTAdamW", "FloraAdamW", "OnlineSubspaceAdamW", "QGaLoreAdamW", "GaLoreAdamW8bit")
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


def build_optimizer(variant: str, model: torch.nn.Module, lr: float, rank: int) -> torch.optim.Optimizer:
    if variant == "AdamW":
        return torch.optim.AdamW(model.parameters(), lr=lr)
    if variant == "GaLoreAdamW, model.parameters()":
        return lrgrad.GaLoreAdamW(model.parameters(), rank=rank, lr=lr)
    if variant == "GaLoreAdamW, model.parameters(), scale=0.25 (old default)":
        return lrgrad.GaLoreAdamW(model.parameters(), rank=rank, lr=lr, scale=0.25)
    if variant.startswith("GaLoreAdamW, scale="):
        return lrgrad.GaLoreAdamW(model.named_parameters(), rank=rank, lr=lr, scale=float(variant.split("=")[1]))
    return lrgrad.OPTIMIZERS[variant](model.named_parameters(), rank=rank, lr=lr)


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
    for r in results:
        ref = base.get((r["shape"], r["lr"]))
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
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    variants = args.variants or [*PRESETS, "GaLoreAdamW, model.parameters()",
                                 "GaLoreAdamW, model.parameters(), scale=0.25 (old default)"]
    results = []
    start = time.time()
    for shape in args.shapes:
        data = load_data(shape, args.eval_batches, args.max_bytes)
        config = args.config or SHAPES[shape][0]
        for lr in args.lrs:
            for variant in ([] if args.skip_adamw else ["AdamW"]) + variants:
                r = train(variant, shape, lr, args.steps, data, config)
                results.append(r)
                print(f"{shape} lr={lr:g} {variant}: val {r['val_loss']:.4f} ({r['seconds']:.0f} s)", flush=True)
    shapes = {s: (args.config or SHAPES[s][0], *SHAPES[s][1:]) for s in args.shapes}
    rank = get_config(args.config or "llama_9m")["rank"]
    command = " ".join(["python experiments/bench/bench_oneliner.py", *(argv if argv is not None else sys.argv[1:])])
    print(f"\n`{command}` — "
          f"{args.steps} steps, warmup 10% + cosine to 10%, clip 1.0, wd 0.01 (AdamW's default), rank = "
          f"hidden/4 = {rank}, every other argument at its default; shapes (config, vocab, batch, seq) {shapes}; "
          f"torch {torch.__version__}, {platform.machine()}, {args.threads} thread(s), "
          f"{(time.time() - start) / 60:.1f} min.\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
