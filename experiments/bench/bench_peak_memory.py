"""Peak memory of a training process, one fresh process per optimizer, measured as a user would.

    python experiments/bench/bench_peak_memory.py                          # LLaMA-350M (rank 256), then 1B (rank 512)
    python experiments/bench/bench_peak_memory.py --configs llama_350m     # the quicker run

Each row is a child process (``subprocess``) that builds a ``transformers`` LLaMA directly in bf16
(SDPA attention, vocab 32000), builds the optimizer, and runs two training steps on one batch of
1 x 256 random tokens on the CPU with one thread; the baseline row runs the same forward and
backward passes without an optimizer step. Reported per row:

* **peak RSS**: the process's high-water mark (``VmHWM`` of /proc/self/status, which
  ``resource.getrusage`` reports as ``ru_maxrss``), import of torch/transformers included;
* **live-tensor peak**: the most bytes of tensor storage alive at once, counted by a
  ``TorchDispatchMode`` that sees every op's outputs (a storage counts from its first appearance until
  its last view dies; the torch/Python runtime and allocator slack are not in it);
* **state**: ``lrgrad.optimizer_state_bytes`` after the two steps, and
* **estimate**: ``lrgrad.estimate_memory``'s ``peak`` for the same model, optimizer and batch.

Allocator settings of every child (the estimator models the process under these): glibc's mmap
threshold is fixed at 64 KiB (``MALLOC_MMAP_THRESHOLD_=65536``; by default glibc raises it whenever a
large block is freed, after which tensors come from the heap and freed memory stays resident), the
trim threshold at 128 KiB (``MALLOC_TRIM_THRESHOLD_``) and the arenas at two (``MALLOC_ARENA_MAX=2``);
``OMP_NUM_THREADS=1``. Children run one at a time (a 1B child needs ~10 GB).

Writes ``results/peak_memory.md`` (with the CPU's name), ``results/peak_memory.json`` and
``results/peak_memory.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import weakref
from pathlib import Path
from typing import Any

#: the child's allocator and threading environment (module docstring)
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072", "MALLOC_ARENA_MAX": "2",
             "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
#: row name -> (label, estimate_memory keyword arguments beyond model/batch)
ROWS: dict[str, tuple[str, dict[str, Any]]] = {
    "none": ("no optimizer step (model + grads + activations)", {}),
    "adamw": ("`torch.optim.AdamW`", {"optimizer": "adamw"}),
    "galore": ("`GaLoreAdamW(named_parameters(), rank=r)`", {"optimizer": "galore"}),
    "flora": ("`FloraAdamW(..., rank=r)`", {"optimizer": "flora"}),
    "apollo_mini": ("`APOLLOMiniAdamW(named_parameters())`", {"optimizer": "apollo_mini", "rank": 1}),
    "galore8bit": ("`GaLoreAdamW8bit(..., rank=r)`", {"optimizer": "galore8bit"}),
    "qgalore_int8": ("`QGaLoreAdamW` + INT8 weights", {"optimizer": "qgalore", "weight_bits": 8}),
    "galore_layerwise": ("per-layer GaLore (`LayerwiseOptimizer`)", {"optimizer": "galore", "layerwise": True}),
    # the same two with bf16 moments for the full-rank params (embeddings, head, norms), as torch.optim.AdamW
    # keeps them for bf16 params: docs/memory.md, "state_dtype", for what it costs in loss
    "galore_param": ("`GaLoreAdamW(..., state_dtype=\"param\")`", {"optimizer": "galore", "state_dtype": "param"}),
    "galore_layerwise_param": ("per-layer GaLore, `state_dtype=\"param\"`",
                               {"optimizer": "galore", "layerwise": True, "state_dtype": "param"}),
}
#: issue 28's targets: peak RSS over AdamW's at LLaMA-1B
TARGETS = {"galore": 0.90, "flora": 0.90, "galore8bit": 0.75, "apollo_mini": 0.70, "galore_layerwise": 0.70,
           "qgalore_int8": 0.65, "galore_param": 0.90, "galore_layerwise_param": 0.70}
RANKS = {"llama_1b": 512, "llama_350m": 256}
GIB = 2**30


# ---------------------------------------------------------------------------- the child
def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


class LiveBytes:
    """A dispatch mode counting the bytes of tensor storage alive at once, and their peak."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tracker.see(out)
                return out

        self.mode = Mode()
        self.live = 0
        self.peak = 0
        self._seen: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def see(self, out: Any) -> None:
        import torch

        if isinstance(out, torch.Tensor):
            self._add(out)
        elif isinstance(out, (list, tuple)):
            for item in out:
                self.see(item)

    def _add(self, t: Any) -> None:
        if t.device.type == "meta":
            return
        storage = t.untyped_storage()
        if storage in self._seen:
            return
        nbytes = storage.nbytes()
        self._seen[storage] = nbytes
        weakref.finalize(storage, self._free, nbytes)
        self.live += nbytes
        self.peak = max(self.peak, self.live)

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes


def _model(config: str, vocab: int):
    import torch
    from lrgrad_experiments.pretrain.configs import llama_config
    from transformers import LlamaForCausalLM

    cfg = llama_config(config, vocab_size=vocab, max_seq_len=256)
    cfg._attn_implementation = "sdpa"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: never a whole fp32 copy of the model
    try:
        return LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)


def _optimizer(row: str, model: Any, rank: int):
    import torch

    import lrgrad

    named = model.named_parameters()
    if row == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-4)
    if ROWS[row][1].get("optimizer") == "galore":  # the row's estimate options say its state_dtype too
        return lrgrad.GaLoreAdamW(named, rank=rank, lr=1e-4, state_dtype=ROWS[row][1].get("state_dtype", "fp32"))
    if row == "flora":
        return lrgrad.FloraAdamW(named, rank=rank, lr=1e-4)
    if row == "apollo_mini":
        return lrgrad.APOLLOMiniAdamW(named, lr=1e-4)
    if row == "galore8bit":
        return lrgrad.GaLoreAdamW8bit(named, rank=rank, lr=1e-4)
    if row == "qgalore_int8":
        return lrgrad.QGaLoreAdamW(named, rank=rank, lr=1e-4)
    raise ValueError(f"Invalid row: {row!r}")


def child(row: str, config: str, vocab: int, seq_len: int, steps: int) -> dict[str, Any]:
    """Measure one row in this process (run by :func:`run_child` in a fresh one)."""
    import torch

    import lrgrad

    rss_runtime = _status_kib("VmRSS") * 1024  # the interpreter, torch and transformers, before any tensor
    tracker = LiveBytes()
    started = time.perf_counter()
    with torch.no_grad(), tracker.mode:
        model = _model(config, vocab)
        if row == "qgalore_int8":
            lrgrad.quantize_weights(model, bits=8, group_size=256)
    rank = RANKS.get(config, 8)
    est_kwargs = dict(ROWS[row][1])
    estimate = None
    if est_kwargs:
        est_kwargs.setdefault("rank", rank)
        estimate = lrgrad.estimate_memory(model, batch_size=1, seq_len=seq_len, **est_kwargs)
    opt = None if row == "none" else _optimizer(row, model, rank)
    layerwise = lrgrad.LayerwiseOptimizer(opt) if ROWS[row][1].get("layerwise") else None
    tokens = torch.randint(0, vocab, (1, seq_len), generator=torch.Generator().manual_seed(0))
    losses = []
    with tracker.mode:
        for _ in range(steps):
            loss = model(input_ids=tokens, labels=tokens).loss
            loss.backward()
            losses.append(float(loss.detach()))
            del loss
            if layerwise is not None:
                layerwise.step()
            elif opt is not None:
                opt.step()
            model.zero_grad(set_to_none=True)
    out = {
        "row": row, "config": config, "rank": rank, "seconds": time.perf_counter() - started,
        "peak_rss": _status_kib("VmHWM") * 1024, "rss_runtime": rss_runtime, "live_peak": tracker.peak,
        "state": lrgrad.optimizer_state_bytes(opt) if opt is not None else 0, "losses": losses,
        "params": sum(p.numel() for p in model.parameters()),
    }
    if estimate is not None:
        out["estimate"] = estimate.as_dict()
    return out


# ---------------------------------------------------------------------------- the parent
def run_child(row: str, config: str, vocab: int, seq_len: int, steps: int) -> dict[str, Any]:
    """One fresh process for ``row`` (module docstring's environment); its JSON result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", row, "--configs", config,
           "--vocab", str(vocab), "--seq-len", str(seq_len), "--steps", str(steps)]
    env = {**os.environ, **CHILD_ENV}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{row} on {config} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(results: list[dict[str, Any]], config: str) -> list[str]:
    rows = [r for r in results if r["config"] == config]
    base = next((r for r in rows if r["row"] == "adamw"), None)
    name = config.replace("llama_", "LLaMA-").upper().replace("LLAMA", "LLaMA")
    first = rows[0]
    lines = [f"### {name} (bf16, batch 1 x {first.get('seq_len', 256)}, rank {first['rank']}, "
             f"{first['params'] / 1e9:.2f}B params)",
             "",
             "| optimizer | peak RSS (GiB) | vs AdamW | target | live-tensor peak (GiB) | state (GiB) | estimate (GiB) "
             "| estimate / RSS | seconds |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = r["peak_rss"] / base["peak_rss"] if base else float("nan")
        est = _estimate_or_saved(r)
        target = TARGETS.get(r["row"]) if config == "llama_1b" else None
        target_text = (f"<= {target:.2f} ({'met' if ratio <= target + 0.005 else 'missed'})"  # ratios print at 2 places
                       if target and base else "—")
        est_text = f"{est / GIB:.2f}" if est else "—"
        est_ratio = f"{est / r['peak_rss']:.2f}" if est else "—"
        lines.append(f"| {ROWS[r['row']][0]} | {r['peak_rss'] / GIB:.2f} | {ratio:.2f} | {target_text} | "
                     f"{r['live_peak'] / GIB:.2f} | {r['state'] / GIB:.2f} | {est_text} | {est_ratio} | "
                     f"{r['seconds']:.0f} |")
    missing = [row for row in ROWS if row not in {r["row"] for r in rows} and ROWS[row][1]]
    if missing and base:
        lines += ["", "Not measured in this run (estimates only; ratio to the measured AdamW row):", "",
                  "| optimizer | estimated peak (GiB) | vs AdamW (measured) | target |", "|---|---:|---:|---:|"]
        for row in missing:
            est = _estimate(config, row, first["seq_len"] if "seq_len" in first else 256)
            target = TARGETS.get(row) if config == "llama_1b" else None
            lines.append(f"| {ROWS[row][0]} | {est / GIB:.2f} | {est / base['peak_rss']:.2f} | "
                         f"{f'<= {target:.2f}' if target else '—'} |")
    return lines


def _estimate_or_saved(r: dict[str, Any]) -> int | None:
    """The current estimator's peak for a measured row of a named LLaMA config, else the one the child saved."""
    try:
        return _estimate(r["config"], r["row"], r.get("seq_len", 256)) if ROWS[r["row"]][1] else None
    except ValueError:
        return r.get("estimate", {}).get("peak")


def _estimate(config: str, row: str, seq_len: int) -> int:
    """``estimate_memory(...).peak`` of ``row`` for a named LLaMA config (``llama_1b`` -> ``"llama-1b"``)."""
    import lrgrad

    kwargs = dict(ROWS[row][1])
    kwargs.setdefault("rank", RANKS.get(config, 8))
    return lrgrad.estimate_memory(config.replace("_", "-"), batch_size=1, seq_len=seq_len, **kwargs).peak


def extrapolated_7b() -> list[str]:
    """The estimator's peak for LLaMA-7B (never measured here: it is the model the rows above test)."""
    import lrgrad

    lines = ["### Does LLaMA-7B fit? (extrapolated)", "",
             "`lrgrad.estimate_memory(\"llama-7b\", ..., batch_size=1, seq_len=256).peak`, bf16 weights, rank 1024: "
             "the estimator whose predictions the measured rows above check, not a measurement. 16 GB / 24 GB are "
             "taken as 16 / 24 GiB for the process; a GPU adds its CUDA context instead of the CPU runtime.", "",
             "| configuration | per-layer | state (GiB) | peak (GiB) | fits 16 GB | fits 24 GB |",
             "|---|---|---:|---:|---|---|"]
    for row, layerwise in (("adamw", False), ("galore", False), ("galore", True), ("galore8bit", True),
                           ("apollo_mini", True), ("flora", True), ("qgalore_int8", True)):
        kwargs = dict(ROWS[row][1])
        kwargs.setdefault("rank", 1024)
        if layerwise:
            kwargs["layerwise"] = True
        est = lrgrad.estimate_memory("llama-7b", batch_size=1, seq_len=256, **kwargs)
        state = (est.optimizer_state + est.projector_state) / GIB
        lines.append(f"| {ROWS[row][0]} | {'yes' if layerwise else 'no'} | {state:.2f} | {est.peak / GIB:.2f} | "
                     f"{'yes' if est.peak <= 16 * GIB else 'no'} | {'yes' if est.peak <= 24 * GIB else 'no'} |")
    return lines + [""]


def write(results: list[dict[str, Any]], out: Path, describe: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "peak_memory.json").write_text(json.dumps(results, indent=1))
    configs = list(dict.fromkeys(r["config"] for r in results))
    lines = ["# Peak memory of a training process", "",
             f"Machine: {describe}. Command: `python experiments/bench/bench_peak_memory.py"
             f" --configs {','.join(configs)}`.", "",
             "One fresh process per row, two training steps, CPU, one thread; allocator: "
             + ", ".join(f"`{k}={v}`" for k, v in CHILD_ENV.items()) + ". Peak RSS is the process's VmHWM; the "
             "live-tensor peak counts tensor storages only; the estimate is `lrgrad.estimate_memory(...).peak`.", ""]
    for config in configs:
        lines += table(results, config) + [""]
    lines += extrapolated_7b()
    (out / "peak_memory.md").write_text("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, len(configs), figsize=(6 * len(configs), 4), squeeze=False)
    for ax, config in zip(axes[0], configs):
        rows = [r for r in results if r["config"] == config]
        names = [r["row"] for r in rows]
        x = range(len(rows))
        ax.bar([i - 0.27 for i in x], [r["peak_rss"] / GIB for r in rows], 0.27, label="peak RSS")
        ax.bar(list(x), [r["live_peak"] / GIB for r in rows], 0.27, label="live tensors")
        ax.bar([i + 0.27 for i in x], [(_estimate_or_saved(r) or 0) / GIB for r in rows], 0.27,
               label="estimate")
        ax.set_xticks(list(x), names, rotation=30, ha="right")
        ax.set_ylabel("GiB")
        ax.set_title(config)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "peak_memory.png", dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="llama_350m,llama_1b")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from {', '.join(ROWS)}")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--out", default=None, help="results folder (default: the repository's results/)")
    p.add_argument("--append", action="store_true",
                   help="keep the rows already in --out's peak_memory.json that this run does not measure")
    p.add_argument("--report", action="store_true", help="only rewrite the pages from --out's peak_memory.json")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        import torch

        torch.set_num_threads(1)
        print(json.dumps(child(args.child, args.configs, args.vocab, args.seq_len, args.steps)))
        return 0
    from lrgrad_experiments.machine import describe
    from lrgrad_experiments.paths import REPO

    out = Path(args.out) if args.out else REPO / "results"
    results = []
    saved = out / "peak_memory.json"
    if args.report:
        write(json.loads(saved.read_text()), out, describe())
        return 0
    if args.append and saved.is_file():
        measured_now = {(c, r) for c in args.configs.split(",") for r in args.rows.split(",")}
        results = [r for r in json.loads(saved.read_text()) if (r["config"], r["row"]) not in measured_now]
    for config in args.configs.split(","):
        for row in args.rows.split(","):
            result = run_child(row, config, args.vocab, args.seq_len, args.steps)
            result["seq_len"] = args.seq_len
            results.append(result)
            print(f"{config} {row}: peak RSS {result['peak_rss'] / GIB:.2f} GiB, live {result['live_peak'] / GIB:.2f} "
                  f"GiB, state {result['state'] / GIB:.2f} GiB, {result['seconds']:.0f} s", flush=True)
            write(results, out, describe())  # after every row: a long run leaves what it measured
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
