"""Long runs on one CPU thread: which method wins after 2000+ steps, not 200.

    nohup setsid .venv/bin/python experiments/bench/long_run.py --workers 2 >> runs/long_run.log 2>&1 &

A byte-level LLaMA (``llama_35m``: 10.8M params at vocab 256; 6 layers, hidden 384, rank 96) on the
embedded corpus, sequence 256, batch 4, 2000 steps, cosine with 10% warmup, clip 1.0, every method at
its paper defaults (``pretrain/optimizers.py``; refresh gap 200 as the papers) and at AdamW's best lr
from a short sweep, two seeds. Each run is an ordinary ``pretrain_llama.py`` run in its own folder
``runs/long_run/<method>-lr<lr>-s<seed>-<steps>/`` (checkpoints, ``eval.jsonl``), stepped in chunks of
``--chunk-steps`` with ``--stop-after`` and ``--resume``, so the queue survives a kill at any moment
(at most ``--save-every`` steps are lost) and continues where it stopped when the same command is run
again. After every chunk ``results/long_run.md``, ``.png`` and ``.json`` are rewritten
(``long_run_report.py``), so the table fills in as runs finish. On a fresh clone (no ``runs/``) the finished
runs are restored from the committed ``results/long_run.json`` and only the unfinished ones train.

The queue, most informative first: AdamW at its default lr, the short AdamW lr sweep (``--sweep-steps``
steps per lr, the schedule scaled to that length) and AdamW at the sweep's best lr; GaLore, APOLLO-Mini,
Fira and Muon at their paper defaults; the same five (AdamW at both lrs) for the other seeds, so their
verdicts (which need a seed spread) come first; then the other methods at their paper defaults, seed by
seed (the 2024-25 methods last); then every other method at the sweep's best lr, seed by seed.
``--budget-minutes`` stops starting chunks after that long; ``--list`` prints the queue and its state.

``--workers N`` trains N runs at once, one process each (one per core: every run is one thread). A worker
claims a run with an exclusive lock on ``<out-root>/.claims/<run>.lock`` before each chunk, so no run is
ever trained by two processes, and the OS drops the lock when a worker dies; a worker with nothing left
to claim waits while another still trains (a finished sweep may yet add runs). Runs are independent, so
their losses do not depend on N; only the seconds per step in the report grow with the cores' contention.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:  # the run claims of --workers; without it (Windows) a single worker needs none
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

import torch
from lrgrad_experiments.bench import long_run_report as report
from lrgrad_experiments.paths import REPO, RESULTS
from lrgrad_experiments.pretrain.optimizers import available_optimizers, get_spec
from lrgrad_experiments.pretrain_llama import parse_args, run

#: the order runs start in: the baseline, the paper's method, then what a short run cannot tell apart
METHOD_ORDER = ("adamw", "galore_adamw", "apollo_mini_adamw", "fira_adamw", "muon", "apollo_adamw",
                "online_subspace_adamw", "dct_adamw", "flora_adamw", "qgalore_adamw",
                # the 2024-25 methods, after the ones the papers compare
                "grass_adamw", "frugal_adamw", "golore_adamw", "conda_adamw", "ldadamw")
#: the methods whose runs come first with every seed (a verdict needs the spread of two): AdamW and what
#: the papers' tables compare it with; the other methods follow, seed by seed
VERDICT_FIRST = ("adamw", "galore_adamw", "apollo_mini_adamw", "fira_adamw", "muon")


@dataclass(frozen=True)
class RunSpec:
    """One training run of the queue; its folder name is a function of what it trains."""

    method: str
    lr: float
    seed: int
    steps: int
    role: str  # "paper" (the method's own lr), "best" (AdamW's best lr), "sweep" (AdamW lr sweep)

    @property
    def tag(self) -> str:
        return f"{self.method}-lr{self.lr:g}-s{self.seed}-{self.steps}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="llama_35m", help="model size (default: %(default)s)")
    p.add_argument("--methods", nargs="+", default=list(METHOD_ORDER), help="optimizers, in queue order")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="seeds (default: %(default)s)")
    p.add_argument("--steps", type=int, default=2000, help="steps of a run (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per step (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default: %(default)s)")
    p.add_argument("--eval-every", type=int, default=100, help="evaluate every N steps (default: %(default)s)")
    p.add_argument("--eval-batches", type=int, default=20, help="validation batches (default: %(default)s)")
    p.add_argument("--sweep-lrs", nargs="+", type=float, default=[1e-3, 3e-3, 1e-2],
                   help="AdamW lrs of the sweep (default: %(default)s)")
    p.add_argument("--sweep-steps", type=int, default=400, help="steps of a sweep run (default: %(default)s)")
    p.add_argument("--chunk-steps", type=int, default=250, help="steps per invocation of a run (default: %(default)s)")
    p.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (default: %(default)s)")
    p.add_argument("--budget-minutes", type=float, default=0.0,
                   help="start no chunk after this many minutes; 0: run the whole queue (default: %(default)s)")
    p.add_argument("--data", default="stdlib", help="'stdlib' or a folder of text files (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    p.add_argument("--workers", type=int, default=1,
                   help="runs trained at once, a process each (default: %(default)s; one per free core)")
    p.add_argument("--as-worker", action="store_true", help=argparse.SUPPRESS)  # one of --workers' processes
    p.add_argument("--poll-seconds", type=float, default=30.0,
                   help="how often an idle worker looks for a run to claim (default: %(default)s)")
    p.add_argument("--out-root", default=str(REPO / "runs" / "long_run"), help="run folders (default: %(default)s)")
    p.add_argument("--results", default=str(RESULTS), help="where long_run.md/.png/.json go (default: %(default)s)")
    p.add_argument("--list", action="store_true", help="print the queue and each run's state, run nothing")
    p.add_argument("--report-only", action="store_true", help="rewrite the results from the run folders, run nothing")
    return p


def paper_lr(method: str) -> float:
    return get_spec(method).lr


# ---------------------------------------------------------------------------- run state
def run_dir(opts: argparse.Namespace, spec: RunSpec) -> Path:
    return Path(opts.out_root) / spec.tag


def is_done(opts: argparse.Namespace, spec: RunSpec) -> bool:
    return (run_dir(opts, spec) / "done.json").is_file()


def has_checkpoint(opts: argparse.Namespace, spec: RunSpec) -> bool:
    folder = run_dir(opts, spec) / "checkpoints"
    return folder.is_dir() and any(p.name.startswith("step-") and p.is_dir() and not p.name.endswith(".damaged")
                                   for p in folder.iterdir())


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line a kill cut short
                continue
    return out


def best_sweep_lr(opts: argparse.Namespace) -> float | None:
    """AdamW's lr with the lowest final validation loss in the sweep (first seed); None until it finished."""
    finals = {}
    for lr in opts.sweep_lrs:
        spec = RunSpec("adamw", lr, opts.seeds[0], opts.sweep_steps, "sweep")
        if not is_done(opts, spec):
            return None
        finals[lr] = json.loads((run_dir(opts, spec) / "done.json").read_text())["final_val_loss"]
    finite = {lr: loss for lr, loss in finals.items() if loss is not None}  # a diverged lr is not the best
    return min(finite, key=finite.get) if finite else None


def build_queue(opts: argparse.Namespace) -> tuple[list[RunSpec], float | None]:
    """Every run in start order (the best-lr runs appear once the sweep finished) and the best lr."""
    methods = [m for m in opts.methods if m in available_optimizers()]
    best = best_sweep_lr(opts)
    queue: list[RunSpec] = []

    def add(spec: RunSpec) -> None:
        if all(spec.tag != q.tag for q in queue):  # AdamW at its best lr may be its paper run
            queue.append(spec)

    # the methods the papers compare (VERDICT_FIRST) at their paper defaults for every seed first: their
    # seed spread is what turns a difference into a verdict; the short AdamW sweep right after the first
    # run (a few minutes; it names the lr of the best-lr runs) and AdamW at the best lr right after each
    # of AdamW's own runs (the fair baseline of every seed); then the other methods, seed by seed; the
    # best-lr runs of every other method last
    core = [m for m in methods if m in VERDICT_FIRST]
    rest = [m for m in methods if m not in VERDICT_FIRST]
    for block in (core, rest):
        for seed in opts.seeds:
            for m in block:
                add(RunSpec(m, paper_lr(m), seed, opts.steps, "paper"))
                if m == methods[0] and seed == opts.seeds[0]:
                    for lr in opts.sweep_lrs:
                        add(RunSpec("adamw", lr, seed, opts.sweep_steps, "sweep"))
                if m == "adamw" and best is not None:
                    add(RunSpec("adamw", best, seed, opts.steps, "best"))
    if best is not None:
        for seed in opts.seeds:
            for m in methods:
                add(RunSpec(m, best, seed, opts.steps, "best"))
    return queue, best


# ---------------------------------------------------------------------------- running
def train_argv(opts: argparse.Namespace, spec: RunSpec) -> list[str]:
    """The ``pretrain_llama.py`` arguments of one chunk of ``spec``."""
    argv = ["--config", opts.config, "--optimizer", spec.method, "--lr", repr(spec.lr),
            "--max-steps", str(spec.steps), "--batch-size", str(opts.batch_size), "--seq-len", str(opts.seq_len),
            "--eval-every", str(opts.eval_every if spec.role != "sweep" else max(1, spec.steps // 10)),
            "--eval-batches", str(opts.eval_batches), "--save-every", str(opts.save_every),
            "--keep-checkpoints", "1", "--seed", str(spec.seed), "--data", opts.data,
            "--threads", str(opts.threads), "--out-dir", str(run_dir(opts, spec)),
            "--stop-after", str(opts.chunk_steps), "--no-progress", "--quiet"]
    if spec.role == "best" and get_spec(spec.method).kind == "normalized":
        argv += ["--opt-arg", f"adamw_lr={spec.lr!r}"]  # every group at AdamW's best lr
    argv.append("--resume" if has_checkpoint(opts, spec) else "--overwrite")
    return argv


def run_chunk(opts: argparse.Namespace, spec: RunSpec) -> Any:
    """Train ``spec`` for up to ``--chunk-steps`` steps; record timings; mark it done at its last step."""
    folder = run_dir(opts, spec)
    t0 = time.time()
    summary = run(parse_args(train_argv(opts, spec)))
    record = {"steps": summary["steps"], "step_time_s": summary["step_time_s"],
              "opt_step_time_s": summary["opt_step_time_s"], "wall_s": time.time() - t0,
              "params": summary["params"], "state_bytes": summary["state_bytes"], "time": time.time()}
    with open(folder / "chunks.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    if summary["steps"] >= spec.steps:
        mark_done(folder, {"spec": spec.__dict__, "final_val_loss": summary["final_val_loss"],
                           "final_val_bpb": summary["final_val_bpb"], "params": summary["params"],
                           "state_bytes": summary["state_bytes"]})
    return summary["stopped_by_signal"]


def mark_done(folder: Path, result: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".done.json.tmp"
    tmp.write_text(json.dumps(result))
    tmp.rename(folder / "done.json")


#: the options that make a run what it is: a finished run recorded under other values is another run
RUN_IDENTITY = ("config", "steps", "batch_size", "seq_len", "eval_every", "eval_batches", "sweep_steps", "data")


def restore_finished(opts: argparse.Namespace) -> list[str]:
    """Recreate the folders of the finished runs that ``results/long_run.json`` records and this machine lacks.

    The run folders live under ``runs/`` (checkpoints: not committed), so a fresh clone of the repository
    would otherwise train every finished run again. The committed report holds each finished run's whole
    validation history and timings, which is all the report and the queue read from a finished folder;
    a run that had not finished restarts (its checkpoints are gone with the machine). Nothing is restored
    when the results were written by a queue of other ``RUN_IDENTITY`` options. Returns the restored tags."""
    path = Path(opts.results) / "long_run.json"
    if not path.is_file():
        return []
    saved = json.loads(path.read_text())
    if any(saved.get("options", {}).get(k) != getattr(opts, k) for k in RUN_IDENTITY):
        return []
    restored = []
    for saved_run in saved.get("runs", []):
        if not saved_run.get("done"):
            continue
        spec = RunSpec(**saved_run["spec"])
        folder = run_dir(opts, spec)
        if spec.tag != saved_run.get("tag") or is_done(opts, spec):
            continue
        history = saved_run.get("history") or []
        chunks = saved_run.get("chunks") or []
        folder.mkdir(parents=True, exist_ok=True)
        for name, rows in (("eval.jsonl", history), ("chunks.jsonl", chunks)):
            (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        last = history[-1] if history else {}
        mark_done(folder, {"spec": spec.__dict__, "final_val_loss": last.get("val_loss"),
                           "final_val_bpb": last.get("val_bpb"), "diverged": saved_run.get("diverged"),
                           "params": chunks[-1]["params"] if chunks else None,
                           "state_bytes": chunks[-1]["state_bytes"] if chunks else None,
                           "restored_from": str(path)})
        restored.append(spec.tag)
    return restored


def read_done(opts: argparse.Namespace, spec: RunSpec) -> dict[str, Any] | None:
    path = run_dir(opts, spec) / "done.json"
    return json.loads(path.read_text()) if path.is_file() else None


def claim(opts: argparse.Namespace, spec: RunSpec) -> int | None:
    """An exclusive lock on ``spec`` for this process (a file descriptor; ``release`` it), or None when
    another worker holds it. The lock lives outside the run folder, which ``--overwrite`` may clear."""
    if fcntl is None:
        return -1
    folder = Path(opts.out_root) / ".claims"
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / f"{spec.tag}.lock", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def release(fd: int) -> None:
    if fd >= 0:
        os.close(fd)  # closing the descriptor drops its flock


def claim_next(opts: argparse.Namespace) -> tuple[RunSpec, int] | None:
    """The first unfinished run of the queue no other worker trains, claimed; None when there is none."""
    queue, _ = build_queue(opts)
    for spec in queue:
        if is_done(opts, spec):
            continue
        fd = claim(opts, spec)
        if fd is None:
            continue
        if is_done(opts, spec):  # finished by another worker between the two looks
            release(fd)
            continue
        return spec, fd
    return None


def unfinished(opts: argparse.Namespace) -> list[RunSpec]:
    queue, _ = build_queue(opts)
    return [s for s in queue if not is_done(opts, s)]


def continue_command(opts: argparse.Namespace) -> str:
    """The command that continues this queue (every non-default option), detached as the runs need."""
    parser = build_parser()
    argv = []
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "list", "report_only", "budget_minutes",
                                                         "poll_seconds", "as_worker"):
            continue
        value = getattr(opts, action.dest)
        if value == action.default:
            continue
        argv.append(action.option_strings[0])
        argv += [str(v) for v in value] if isinstance(value, list) else [str(value)]
    args = " ".join(argv)
    return ("nohup setsid .venv/bin/python experiments/bench/long_run.py" + (f" {args}" if args else "")
            + " >> runs/long_run.log 2>&1 &")


def write_report(opts: argparse.Namespace) -> Path:
    """Rewrite the results from the run folders; workers take turns (a lock), so no file is half written."""
    lock = Path(opts.out_root) / ".report.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX)
        return _write_report(opts)


def _write_report(opts: argparse.Namespace) -> Path:
    queue, best = build_queue(opts)
    runs = []
    for spec in queue:
        folder = run_dir(opts, spec)
        result = read_done(opts, spec) or {}
        runs.append({"spec": spec.__dict__, "tag": spec.tag, "done": bool(result), "diverged": result.get("diverged"),
                     "history": read_jsonl(folder / "eval.jsonl"), "chunks": read_jsonl(folder / "chunks.jsonl")})
    return report.write(Path(opts.results), opts, runs, best, continue_command(opts))


def main(argv: list[str] | None = None) -> int:
    opts = build_parser().parse_args(argv)
    for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches", "sweep_steps", "chunk_steps",
                 "save_every", "threads", "workers"):
        if getattr(opts, name) < 1:
            raise ValueError(f"Invalid {name}: {getattr(opts, name)} (must be >= 1)")
    unknown = [m for m in opts.methods if m not in available_optimizers()]
    if unknown:
        raise ValueError(f"Invalid methods: {unknown}; choose from {', '.join(available_optimizers())}")
    torch.set_num_threads(opts.threads)
    if not opts.as_worker:  # the parent restores once, before any worker looks at the queue
        restored = restore_finished(opts)
        if restored:
            print(f"restored {len(restored)} finished runs from {Path(opts.results) / 'long_run.json'}", flush=True)
    if opts.list:
        queue, best = build_queue(opts)
        print(f"best AdamW lr from the sweep: {best if best is not None else 'sweep not finished'}")
        for spec in queue:
            state = "done" if is_done(opts, spec) else ("started" if has_checkpoint(opts, spec) else "queued")
            if state != "done":
                fd = claim(opts, spec)
                if fd is None:
                    state = "training"  # a worker holds it now
                else:
                    release(fd)
            print(f"{state:8s} {spec.role:6s} {spec.tag}")
        return 0
    if opts.report_only:
        print(write_report(opts))
        return 0
    if opts.workers > 1 and not opts.as_worker:
        return run_workers(opts, sys.argv[1:] if argv is None else list(argv))
    return work(opts)


def work(opts: argparse.Namespace) -> int:
    """One worker: claim the next run, train one chunk of it, release it, rewrite the report; repeat."""
    t_start = time.time()
    while True:
        if opts.budget_minutes and time.time() - t_start > 60 * opts.budget_minutes:
            print(f"budget of {opts.budget_minutes} min spent; continue with: {continue_command(opts)}", flush=True)
            break
        claimed = claim_next(opts)
        if claimed is None:
            if not unfinished(opts):
                print("queue finished", flush=True)
                break
            time.sleep(opts.poll_seconds)  # every unfinished run is another worker's; it may add more
            continue
        spec, fd = claimed
        try:
            print(f"[{time.strftime('%H:%M:%S')}] {spec.tag} ({spec.role})", flush=True)
            try:
                stopped = run_chunk(opts, spec)
            except FloatingPointError as exc:  # the loss went non-finite: a result (the method diverged)
                print(f"{spec.tag} diverged: {exc}", flush=True)
                mark_done(run_dir(opts, spec), {"spec": spec.__dict__, "final_val_loss": None, "diverged": str(exc)})
                stopped = None
        finally:
            release(fd)
        write_report(opts)
        if stopped not in (None, "stop_after"):  # a signal: the chunk saved a checkpoint; stop the queue
            print(f"stopped by a signal; continue with: {continue_command(opts)}", flush=True)
            return 130
    write_report(opts)
    return 0


def run_workers(opts: argparse.Namespace, argv: list[str]) -> int:
    """``--workers`` single-worker processes of this queue; SIGINT/SIGTERM reach every one (each saves a
    checkpoint and stops), and the exit status is the worst of theirs."""
    # this file as a script, not ``-m``: ``-m`` puts the working directory first on sys.path, and from the
    # repository root its top-level kernels/ folder would shadow Hugging Face's `kernels` (transformers
    # imports it); PYTHONSAFEPATH keeps that entry off for whatever the child starts in turn
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--as-worker"]
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    children = []
    for i in range(opts.workers):
        children.append(subprocess.Popen(cmd, env=env))
        if i + 1 < opts.workers:
            time.sleep(1.0)  # each claims its first run before the next starts looking

    def forward(signum: int, _frame: Any) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        codes = [child.wait() for child in children]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return max(codes, key=lambda c: (c != 0, abs(c)))


if __name__ == "__main__":
    sys.exit(main())
