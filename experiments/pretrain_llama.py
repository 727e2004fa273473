"""Pretrain a LLaMA model with any lrgrad optimizer (or torch AdamW), the GaLore paper's recipe.

    python experiments/pretrain_llama.py --config llama_9m --optimizer galore_adamw --max-steps 200
    python experiments/pretrain_llama.py --config llama_60m --optimizer galore_adamw --data c4 \\
        --seq-len 256 --batch-size 128 --grad-accum 4 --max-steps 10000 --update-proj-gap 200 --bf16 on

Recipe (arXiv:2403.03507): cosine schedule with 10% linear warmup down to 10% of the peak lr,
gradient clipping (global norm, default 1.0), gradient accumulation, bf16 autocast where supported
(CUDA with bf16; off on CPU unless ``--bf16 on``). The optimizer's defaults follow ``--recipe``:
``galore-paper`` (the default: the GaLore paper's lr 0.01, scale 0.25, no weight decay; each other
method its paper's lr and scale) or ``library`` (each optimizer's own defaults, as
``lrgrad.GaLoreAdamW(groups, rank=r)`` builds it: lr 1e-3, the RMS-matched scale, weight decay 0.01).
Explicit ``--lr``, ``--scale``, ``--weight-decay`` win over either.

Data: the embedded corpus (Python standard library sources, byte-level) by default, a folder
or a pre-tokenized ``.bin`` with ``--data PATH``, or C4 with ``--data c4`` (see ``data.py``).

Reliability: checkpoints are step folders under ``OUT/checkpoints/`` (``checkpoint.py``), each
published by one atomic rename after its sha256 manifest; ``--keep-checkpoints K`` keeps the
last K. ``--resume`` continues bit-identically from the newest checkpoint that verifies (and
says which); a kill at any moment, even mid-write, loses at most the steps since the last
checkpoint. SIGINT/SIGTERM finish the current step, write a checkpoint, print the command that
resumes, and stop. An out-dir that holds a run is not overwritten without ``--overwrite``.

Feedback: a tqdm bar (loss, tokens/s, memory), evaluation results on the terminal and in
``OUT/eval.jsonl`` (validation loss, perplexity, bits per byte), ``OUT/run.json`` (arguments,
resumes), and ``--wandb`` (offline when the wandb server is unreachable; imported only when asked).

The code reads top to bottom as the run goes: arguments, environment, data, model, optimizer,
checkpoint (save / resume), the training loop, and ``run()`` tying them together.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import signal
import socket
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lrgrad_experiments.pretrain import checkpoint as ckpt  # noqa: E402
from lrgrad_experiments.pretrain import data as data_mod  # noqa: E402
from lrgrad_experiments.pretrain import run_dir  # noqa: E402
from lrgrad_experiments.pretrain.checkpoint import DCP_NAME, STATE_NAME, CheckpointError, CheckpointStore  # noqa: E402
from lrgrad_experiments.pretrain.configs import MODEL_CONFIGS, build_model, count_params, get_config  # noqa: E402
from lrgrad_experiments.pretrain.optimizers import (  # noqa: E402
    RECIPES,
    REGISTRY,
    build_optimizer,
    get_spec,
    optimizer_class,
    uses_lrgrad,
)

import lrgrad  # noqa: E402

STATE_FORMAT = 2  # state.pt layout; 1 was the single OUT/checkpoint.pt of earlier versions

# ---------------------------------------------------------------------------- arguments
#: arguments a resume may change: honoured from the resumed step on, printed and recorded in run.json
RESUME_MAY_CHANGE = {
    "lr": "every param group's peak lr takes the new value; the schedule continues from the resumed step",
    "max_steps": "the cosine schedule is recomputed for the new length from the resumed step",
    "eval_every": "", "eval_batches": "", "save_every": "", "keep_checkpoints": "",
}
#: arguments added after runs were saved: the value a run.json that predates them stands for
ADDED_ARGS: dict[str, Any] = {"recipe": "galore-paper"}
#: how this process runs, not what it trains: never compared on resume
RUNTIME_ONLY = ("out_dir", "resume", "overwrite", "stop_after", "threads", "device", "no_progress", "quiet", "wandb",
                "wandb_project")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])

    def a(flag: str, help: str, default: Any = None, shown: str | None = None, **kw: Any) -> None:
        """Every option's help ends with its default, exactly once (``shown`` words a None default)."""
        if kw.get("action") == "store_true":
            text, default = shown or "off", False
        elif shown is not None:
            text = shown
        else:
            text = "%(default)s"
        p.add_argument(flag, default=default, help=f"{help} (default: {text})", **kw)

    a("--config", f"model size: {', '.join(MODEL_CONFIGS)}", "llama_9m")
    a("--optimizer", f"one of: {', '.join(REGISTRY)}", "galore_adamw")
    a("--recipe", "where the optimizer's unset defaults come from: 'galore-paper' (the GaLore paper's pretraining "
      "recipe: lr 0.01 (AuON 0.055, AdamW 0.003), scale 0.25 (Flora/APOLLO 1, APOLLO-Mini sqrt(128)), weight "
      "decay 0) or 'library' (each optimizer's own, as lrgrad builds it: lr 1e-3, RMS-matched scale, weight decay "
      "0.01; Muon lr 0.02)", "galore-paper", choices=list(RECIPES))
    a("--lr", "peak lr", type=float, shown="the recipe's")
    a("--rank", "projection rank", type=int, shown="the config's paper rank")
    a("--update-proj-gap", "steps between subspace refreshes / resamples", type=int,
      shown="the method's: GaLore 200, Flora 1000, ...")
    a("--scale", "GaLore scale alpha", type=float, shown="the recipe's")
    a("--weight-decay", "decoupled weight decay", type=float, shown="the recipe's: 0 for galore-paper, the "
      "optimizer's for library")
    a("--opt-arg", "extra optimizer option (value parsed as JSON when possible), repeatable", [],
      shown="none", action="append", metavar="KEY=VALUE")
    a("--adamw-impl", "torch AdamW variant", "foreach", choices=["foreach", "fused", "for-loop"])
    a("--max-steps", "optimizer steps", 100, type=int)
    a("--batch-size", "sequences per micro-batch (the global batch under --parallel)", 16, type=int)
    a("--grad-accum", "micro-batches per optimizer step", 1, type=int)
    a("--seq-len", "tokens per sequence", 256, type=int)
    a("--warmup-ratio", "share of the steps with linear warmup", 0.1, type=float)
    a("--min-lr-ratio", "the cosine ends at this share of the peak lr", 0.1, type=float)
    a("--grad-clip", "global-norm clipping; 0 disables", 1.0, type=float)
    a("--bf16", "bf16 autocast (auto: CUDA with bf16 only)", "auto", choices=["auto", "on", "off"])
    a("--layerwise", "per-layer updates from gradient hooks (lrgrad.LayerwiseOptimizer)", action="store_true")
    a("--weight-bits", "INT8 weights (lrgrad.quantize_weights)", type=int, choices=[8], shown="full-precision")
    a("--data", "'stdlib' (embedded), 'c4', a folder of text files or a .bin token file", "stdlib")
    a("--tokenizer", "Hugging Face tokenizer (hub name or local folder) for 'c4' or a folder of text files, whose "
      "documents are then tokenized and packed as C4's", shown="t5-base for c4, byte-level otherwise")
    a("--data-dtype", "token dtype of a .bin file", "uint16", choices=["uint16", "uint8"])
    a("--vocab-size", "vocabulary of a .bin file", type=int, shown="max id + 1")
    a("--bytes-per-token", "text bytes per token of a .bin file (bits per byte)", 1.0, type=float)
    a("--val-percent", "share of files (or tokens of a .bin) for validation, in percent", 5.0, type=float)
    a("--max-bytes", "cap on the corpus size read from a folder", type=int, shown="no cap")
    a("--eval-every", "evaluate every N steps (and at the last step)", 50, type=int)
    a("--eval-batches", "validation batches per evaluation", 8, type=int)
    a("--save-every", "checkpoint every N steps; 0: only at the end and on a signal", 0, type=int)
    a("--keep-checkpoints", "keep the newest K checkpoint folders", 2, type=int)
    a("--out-dir", "run folder: checkpoints/, eval.jsonl, run.json", "runs/pretrain")
    a("--resume", "continue from the newest checkpoint that verifies, or from CHECKPOINT (step-N, N or a "
      "folder)", False, shown="off", nargs="?", const=True, metavar="CHECKPOINT")
    a("--overwrite", "delete the run already in --out-dir and start over", action="store_true")
    a("--stop-after", "stop with a checkpoint after N steps of this invocation (preemptible jobs); 0: run to "
      "--max-steps", 0, type=int)
    a("--seed", "seed of the model init and the data order", 0, type=int)
    a("--threads", "torch CPU threads", type=int, shown="torch's")
    a("--device", "auto, cpu or cuda", "auto")
    a("--parallel", "data parallelism under torchrun (lrgrad.distributed)", "none", choices=["none", "ddp", "fsdp2"])
    a("--no-progress", "no tqdm bar", action="store_true")
    a("--wandb", "log to Weights & Biases (offline without network)", action="store_true")
    a("--wandb-project", "wandb project", "lrgrad")
    a("--quiet", "print only errors, warnings and the stop message", action="store_true")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.weight_decay is None and args.recipe == "galore-paper":
        args.weight_decay = 0.0  # the paper's; recorded as such in run.json
    validate_args(args)
    return args


def validate_args(args: argparse.Namespace) -> None:
    """Fail fast with a message naming the bad argument."""
    get_config(args.config)
    get_spec(args.optimizer)
    if optimizer_class(args.optimizer) is None:
        raise RuntimeError(f"Optimizer {args.optimizer!r} needs lrgrad.{get_spec(args.optimizer).class_name}, "
                           "which this lrgrad does not provide")
    for name in ("max_steps", "batch_size", "grad_accum", "seq_len", "update_proj_gap", "eval_batches", "eval_every",
                 "keep_checkpoints"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"Invalid {name}: {getattr(args, name)} (must be >= 1)")
    if args.rank is not None and args.rank < 1:
        raise ValueError(f"Invalid rank: {args.rank} (must be >= 1)")
    if args.lr is not None and not args.lr > 0:
        raise ValueError(f"Invalid lr: {args.lr} (must be > 0)")
    if not 0 <= args.warmup_ratio < 1 or not 0 <= args.min_lr_ratio <= 1:
        raise ValueError(f"Invalid warmup_ratio/min_lr_ratio: {args.warmup_ratio}/{args.min_lr_ratio}")
    if args.resume and args.overwrite:
        raise ValueError("Invalid --resume with --overwrite: continue the run in --out-dir, or replace it, not both")
    if args.data not in ("stdlib", "c4") and not Path(args.data).exists():
        raise ValueError(f"Invalid data path: {args.data!r} does not exist (expected 'stdlib', 'c4', a folder "
                         "or a .bin token file)")
    if args.tokenizer is not None and (args.data == "stdlib" or not (args.data == "c4" or Path(args.data).is_dir())):
        raise ValueError(f"Invalid --tokenizer with --data {args.data!r}: a tokenizer applies to 'c4' or a folder of "
                         "text files")
    if args.layerwise and get_spec(args.optimizer).class_name is None:
        raise ValueError("Invalid optimizer for --layerwise: torch AdamW has no per-layer mode; "
                         "use an lrgrad optimizer")
    if args.parallel != "none":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if args.batch_size % world:
            raise ValueError(f"Invalid batch_size: {args.batch_size} is not divisible by the world size {world} "
                             "(--batch-size is the global batch under --parallel)")
        if args.parallel == "fsdp2" and args.layerwise:
            raise ValueError("Invalid --layerwise with --parallel fsdp2: per-layer updates are supported under ddp")
        if args.weight_bits is not None:
            raise ValueError("Invalid --weight-bits with --parallel: INT8 weights are single-process for now")
    if args.weight_bits is not None:
        if not hasattr(lrgrad, "quantize_weights"):
            raise RuntimeError("--weight-bits needs lrgrad.quantize_weights, which this lrgrad does not provide")
        if get_spec(args.optimizer).class_name is None:
            raise ValueError("Invalid optimizer for --weight-bits: torch AdamW cannot update quantized weights; "
                             "use an lrgrad optimizer (e.g. qgalore_adamw)")


def resume_command(args: argparse.Namespace, world: int = 1) -> str:
    """The exact command line that resumes this run: every non-default argument, then ``--resume``."""
    argv: list[str] = []
    for action in build_parser()._actions:
        if not action.option_strings or action.dest in ("help", "resume", "overwrite"):
            continue
        value = getattr(args, action.dest)
        if value == action.default:
            continue
        flag = action.option_strings[0]
        if action.nargs == 0:  # store_true
            argv.append(flag)
        elif isinstance(value, list):  # append
            for v in value:
                argv += [flag, str(v)]
        else:
            argv += [flag, str(value)]
    script = Path(__file__).resolve()
    with contextlib.suppress(ValueError):
        script = script.relative_to(Path.cwd())
    launcher = [sys.executable or "python", str(script)] if world == 1 else [
        "torchrun", f"--nproc_per_node={world}", str(script)]
    return shlex.join([*launcher, *argv, "--resume"])


def _opt_args(pairs: list[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"Invalid opt_arg: {pair!r} (expected KEY=VALUE)")
        key, value = pair.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


# ---------------------------------------------------------------------------- building blocks: schedule, loss,
# evaluation, memory, wandb, signals
def lr_lambda_factory(max_steps: int, warmup_ratio: float, min_lr_ratio: float):
    """Linear warmup over ``warmup_ratio`` of the steps, then cosine decay to ``min_lr_ratio``."""
    warmup = int(round(warmup_ratio * max_steps))

    def lr_lambda(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return lr_lambda


def lm_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) of a ``B x (T+1)`` window batch."""
    logits = model(input_ids=batch[:, :-1]).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[torch.Tensor], device: torch.device, autocast) -> float:
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for b in batches:
        b = b.to(device)
        with autocast():
            total += float(lm_loss(model, b)) * b.shape[0]
        count += b.shape[0]
    model.train(was_training)
    return total / count


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    except ImportError:  # pragma: no cover - Windows
        return float("nan")


def _wandb_reachable(timeout: float = 2.0) -> bool:
    try:
        socket.create_connection(("api.wandb.ai", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def init_wandb(args: argparse.Namespace, config: dict[str, Any]):
    """Import wandb only here; offline mode when its server is unreachable."""
    import wandb  # noqa: PLC0415 - optional dependency, imported only when asked

    if "WANDB_MODE" not in os.environ and not _wandb_reachable():
        os.environ["WANDB_MODE"] = "offline"
    return wandb.init(project=args.wandb_project, config=config, dir=args.out_dir,
                      name=f"{args.config}-{args.optimizer}", resume="allow")


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint and stops after the current step."""

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):  # noqa: ARG002
        if self.signal is not None:  # second signal: give up immediately
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


# ---------------------------------------------------------------------------- environment
@dataclass
class Environment:
    """Where this process runs: device, its place in a ``--parallel`` run, bf16 autocast."""

    device: torch.device
    process_rank: int = 0  # (not the projection rank)
    world: int = 1
    use_bf16: bool = False

    @property
    def main(self) -> bool:
        return self.process_rank == 0

    def autocast(self):
        if self.use_bf16:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (a decision taken once: which checkpoint, an error)."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def setup_environment(args: argparse.Namespace) -> Environment:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    env = Environment(device)
    if args.parallel != "none":
        from lrgrad.distributed import init_from_env

        env.process_rank, env.world, env.device = init_from_env()
    env.use_bf16 = args.bf16 == "on" or (args.bf16 == "auto" and env.device.type == "cuda"
                                         and torch.cuda.is_bf16_supported())
    return env


def prepare_out_dir(args: argparse.Namespace, env: Environment, store: CheckpointStore) -> None:
    """Refuse to overwrite a run by accident, honour ``--overwrite``, clean what killed writes left."""
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    found = run_dir.check_out_dir(out_dir, bool(args.resume), args.overwrite)  # same files, same verdict everywhere
    env.barrier()
    if env.main:
        if args.overwrite and found:
            run_dir.remove_run(out_dir)
            _say(args, env, f"--overwrite: removed the previous run in {out_dir} ({', '.join(found)})")
        count, size = store.clean_temporaries()
        if count:
            _say(args, env, f"removed {count} temporary file(s)/folder(s) ({size / 2**20:.1f} MiB) left by an "
                            f"interrupted write in {out_dir}", always=True)
    env.barrier()
    ckpt.arm_faults(out_dir, env.process_rank)


def _say(args: argparse.Namespace, env: Environment, line: str, always: bool = False) -> None:
    if env.main and (always or not args.quiet):
        print(line, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- data
@dataclass
class Data:
    loader: Any  # .next() -> a (batch x seq_len+1) tensor; state_dict/load_state_dict
    val_batches: list[torch.Tensor]
    vocab_size: int
    bytes_per_token: float


def build_data(args: argparse.Namespace) -> Data:
    if args.data == "c4" or args.tokenizer is not None:  # documents tokenized and packed (C4's pipeline)
        stream = dict(seed=args.seed, tokenizer=args.tokenizer or "t5-base", source=args.data,
                      val_percent=args.val_percent)
        loader = data_mod.C4Stream(args.batch_size, args.seq_len, **stream)
        val_stream = data_mod.C4Stream(args.batch_size, args.seq_len, split="validation", **stream)
        val_batches = [val_stream.next() for _ in range(args.eval_batches)]
        return Data(loader, val_batches, loader.vocab_size, args.bytes_per_token)
    corpus = data_mod.load_corpus(args.data, args.val_percent, args.max_bytes, args.data_dtype,
                                  args.vocab_size, args.bytes_per_token)
    loader = data_mod.BatchLoader(corpus.train, args.batch_size, args.seq_len, seed=args.seed)
    val_batches = data_mod.eval_batches(corpus.val, args.batch_size, args.seq_len, args.eval_batches)
    return Data(loader, val_batches, corpus.vocab_size, corpus.bytes_per_token)


# ---------------------------------------------------------------------------- model
def build_run_model(args: argparse.Namespace, env: Environment, vocab_size: int) -> torch.nn.Module:
    """The LLaMA of ``--config``, wrapped for ``--parallel``, with INT8 weights for ``--weight-bits``."""
    torch.manual_seed(args.seed)
    model = build_model(args.config, vocab_size=vocab_size, max_seq_len=args.seq_len).to(env.device)
    if args.parallel != "none":
        from lrgrad.distributed import setup_parallel

        model = setup_parallel(model, args.parallel)  # before the optimizer: it must see the wrapped params
    if args.weight_bits is not None:
        # one (scale, zero) per group of a row: the largest power of two <= 256 dividing every row length
        widths = [m.in_features for n, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
        group_size = 256
        while group_size > 1 and any(w % group_size for w in widths):
            group_size //= 2
        model = lrgrad.quantize_weights(model, bits=args.weight_bits, group_size=group_size, seed=args.seed)
    model.train()
    return model


# ---------------------------------------------------------------------------- optimizer
@dataclass
class Training:
    """What a step changes: model, optimizer, lr schedule, and the per-layer wrapper if any."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    layerwise: Any  # lrgrad.LayerwiseOptimizer or None
    clip: float | None
    rank: int  # projection rank

    @property
    def stepper(self) -> Any:
        """What owns the optimizer state: the per-layer wrapper when there is one."""
        return self.layerwise or self.optimizer


def build_training(args: argparse.Namespace, model: torch.nn.Module) -> Training:
    rank = args.rank if args.rank is not None else get_config(args.config)["rank"]
    spec = get_spec(args.optimizer)
    opt_kwargs: dict[str, Any] = dict(lr=args.lr, weight_decay=args.weight_decay, **_opt_args(args.opt_arg))
    if spec.kind == "lowrank":
        opt_kwargs.update(rank=rank, update_proj_gap=args.update_proj_gap, scale=args.scale)
    elif spec.kind == "adamw":
        opt_kwargs.update(adamw_impl=args.adamw_impl)
    optimizer = build_optimizer(args.optimizer, model, recipe=args.recipe, **opt_kwargs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda_factory(args.max_steps, args.warmup_ratio, args.min_lr_ratio))
    clip = args.grad_clip if args.grad_clip and args.grad_clip > 0 else None
    layerwise = None
    if args.layerwise:
        if not uses_lrgrad(optimizer):
            raise ValueError("Invalid optimizer for --layerwise: needs an lrgrad optimizer")
        layerwise = lrgrad.LayerwiseOptimizer(optimizer, accumulation_steps=args.grad_accum, max_grad_norm=clip,
                                              scheduler=scheduler)
        if args.parallel == "ddp":  # step each bucket after DDP's all-reduce, not on the local gradient
            from lrgrad.distributed import ddp_layerwise

            ddp_layerwise(model, layerwise)
    return Training(model, optimizer, scheduler, layerwise, clip, rank)


def training_args(args: argparse.Namespace, training: Training) -> dict[str, Any]:
    """What this run trains with, resolved (a None default replaced by the value in use): compared on resume."""
    out = {k: v for k, v in vars(args).items() if k not in RUNTIME_ONLY}
    groups = training.optimizer.param_groups
    out["rank"] = training.rank
    out["lr"] = [float(g["initial_lr"]) for g in groups]
    for key in ("update_proj_gap", "scale"):
        values = sorted({g[key] for g in groups if g.get(key) is not None and g.get("rank") is not None})
        if values:
            out[key] = values
    return out


# ---------------------------------------------------------------------------- checkpoint
@dataclass
class Progress:
    """Where the run is: what a checkpoint saves besides model, optimizer, schedule and data position."""

    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # evaluation records
    train_losses: list[float] = field(default_factory=list)
    resumes: list[dict[str, Any]] = field(default_factory=list)
    last_saved: int = -1
    step_times: list[float] = field(default_factory=list)
    opt_times: list[float] = field(default_factory=list)


def save_run_checkpoint(args: argparse.Namespace, env: Environment, store: CheckpointStore, data: Data,
                        training: Training, progress: Progress) -> Path:
    """Write ``step-N`` (every rank its DCP shards under --parallel; rank 0 the rest) and publish it."""
    step = progress.step
    published = store.root / ckpt.step_dir_name(step)
    if progress.last_saved == step:
        return published
    tmp = store.temporary(step)
    if env.main:
        store.begin(step)
    env.barrier()
    if args.parallel == "none":
        model_state, optimizer_state = training.model.state_dict(), training.stepper.state_dict()
    else:  # model and optimizer: every rank writes its shards (reshardable); the counters go to state.pt
        from lrgrad.distributed import save_checkpoint as save_distributed

        ckpt.write_point(DCP_NAME)
        save_distributed(tmp / DCP_NAME, training.model, training.optimizer, manifest=False)
        layerwise = training.layerwise
        model_state = None
        optimizer_state = {"micro_step": layerwise.micro_step if layerwise else 0,
                           "skipped_steps": layerwise.skipped_steps if layerwise else 0}
    if env.main:
        ckpt.write_point(STATE_NAME)
        ckpt.save_checkpoint({
            "format": STATE_FORMAT, "step": step, "args": training_args(args, training),
            "config": args.config, "optimizer_name": args.optimizer, "parallel": args.parallel,
            "model": model_state, "optimizer": optimizer_state,
            "scheduler": training.scheduler.state_dict(), "data": data.loader.state_dict(), "rng": ckpt.rng_state(),
            "history": progress.history, "train_losses": progress.train_losses, "resumes": progress.resumes,
        }, tmp / STATE_NAME)
        store.publish(tmp, step)
    env.barrier()  # every rank sees the published folder before it goes on (or exits)
    progress.last_saved = step
    return published


class ResumeMismatchError(ValueError):
    """Resuming with an argument that would be silently reinterpreted (refused)."""


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def compare_resume_args(saved: dict[str, Any], now: dict[str, Any], path: Path) -> dict[str, list[Any]]:
    """The honoured changes ``{arg: [old, new]}``; refuse every other difference in one message."""
    saved = {**ADDED_ARGS, **saved}
    changed = {k: [saved.get(k), v] for k, v in now.items() if saved.get(k) != v}
    refused = {k: ov for k, ov in changed.items() if k not in RESUME_MAY_CHANGE}
    if refused:
        diffs = "; ".join(f"{_flag(k)} was {old!r}, now {new!r}" for k, (old, new) in sorted(refused.items()))
        allowed = ", ".join(_flag(k) for k in RESUME_MAY_CHANGE)
        raise ResumeMismatchError(
            f"Invalid resume from {path}: {diffs}. These would change what the checkpoint means (data position, "
            f"optimizer state, schedule); resume with the checkpoint's values (only {allowed} may change) or start "
            "a new run with --overwrite")
    return changed


def _load_model_and_optimizer(args: argparse.Namespace, state: dict[str, Any], folder: Path,
                              training: Training) -> None:
    """Model and optimizer state, as one error naming the file when they do not fit this run."""
    state_path = folder / STATE_NAME
    try:
        if args.parallel == "none":
            if state["model"] is None:
                raise CheckpointError(state_path, "written by a --parallel run: model and optimizer are in dcp/")
            training.model.load_state_dict(state["model"])
            training.stepper.load_state_dict(state["optimizer"])
        else:  # resharded to this run by DCP; the manifest was verified before anything is unpickled
            from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

            from lrgrad.distributed import load_checkpoint as load_distributed

            dcp_path = folder / DCP_NAME
            if not dcp_path.is_dir():
                raise CheckpointError(dcp_path, "missing: written by a single-process run (resume without "
                                                "--parallel)")
            try:
                load_distributed(dcp_path, training.model, training.optimizer, verify=False)
            except CheckpointError:
                raise
            except (Exception, CheckpointException) as exc:
                raise CheckpointError(dcp_path, f"does not fit this run ({type(exc).__name__}: "
                                                f"{_first_line(exc)})") from None
            if training.layerwise is not None:
                training.layerwise.micro_step = int(state["optimizer"]["micro_step"])
                training.layerwise.skipped_steps = int(state["optimizer"].get("skipped_steps", 0))
    except CheckpointError:
        raise
    except Exception as exc:  # load_state_dict: KeyError, ValueError, RuntimeError (shapes) ...
        raise CheckpointError(state_path, f"does not fit this run ({type(exc).__name__}: {_first_line(exc)})") \
            from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else ""


def choose_checkpoint(args: argparse.Namespace, env: Environment,
                      store: CheckpointStore) -> tuple[Path, list[tuple[str, str, str]]]:
    """The folder ``--resume`` names (default: the newest that verifies) and the damaged ones skipped.

    Runs before the data and the model are built, so a run with nothing to resume fails at once.
    """
    choice: tuple[Any, ...]
    if env.main:  # rank 0 verifies (a shared file system), every rank loads what it chose
        try:
            folder, skipped = store.select(None if args.resume is True else str(args.resume))
            choice = ("ok", str(folder), [(str(f), e.path, e.cause) for f, e in skipped])
        except CheckpointError as exc:
            choice = ("error", type(exc).__name__, exc.path, exc.cause)
    else:
        choice = ()
    choice = env.broadcast(choice)
    legacy = Path(args.out_dir) / run_dir.LEGACY[0]
    if choice[0] == "error" and choice[1] == "NoCheckpointError" and legacy.is_file():
        raise CheckpointError(legacy, "a checkpoint of an earlier pretrain_llama.py (one file, no manifest, no "
                                      "step folder): resume it with that version, or start over with --overwrite")
    if choice[0] == "error":
        kind = ckpt.NoCheckpointError if choice[1] == "NoCheckpointError" else CheckpointError
        raise kind(choice[2], choice[3])
    return Path(choice[1]), choice[2]


def resume_run(args: argparse.Namespace, env: Environment, store: CheckpointStore, folder: Path,
               skipped: list[tuple[str, str, str]], data: Data, training: Training, progress: Progress) -> None:
    """Load ``folder`` (from :func:`choose_checkpoint`) into this run, honouring or refusing changed arguments."""
    state_path = folder / STATE_NAME
    state = ckpt.load_checkpoint(state_path)
    if state.get("format") != STATE_FORMAT or not isinstance(state.get("args"), dict):
        raise CheckpointError(state_path, f"not a state file of this script (format {state.get('format')!r}, "
                                          f"expected {STATE_FORMAT})")
    named = folder.name.removeprefix("step-")
    if named.isdigit() and int(named) != state.get("step"):
        raise CheckpointError(state_path, f"holds step {state.get('step')!r} but its folder is {folder.name} "
                                          "(renamed or mixed up)")
    fresh = training_args(args, training)
    changed = compare_resume_args(state["args"], fresh, state_path)
    _load_model_and_optimizer(args, state, folder, training)
    try:
        training.scheduler.load_state_dict(state["scheduler"])
        data.loader.load_state_dict(state["data"])
        ckpt.set_rng_state(state["rng"])
        progress.step = int(state["step"])
        progress.history = list(state["history"])
        progress.train_losses = list(state["train_losses"])
        progress.resumes = list(state.get("resumes", []))
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise CheckpointError(state_path, f"does not fit this run ({type(exc).__name__}: {_first_line(exc)})") \
            from None
    if "lr" in changed or "max_steps" in changed:  # honoured: the new peak lr / schedule from this step on
        scheduler = training.scheduler
        scheduler.base_lrs = list(fresh["lr"])
        for group, base, fn in zip(training.optimizer.param_groups, fresh["lr"], scheduler.lr_lambdas):
            group["initial_lr"] = base
            group["lr"] = base * fn(scheduler.last_epoch)
    progress.last_saved = progress.step
    progress.resumes.append({"step": progress.step, "checkpoint": folder.name, "changed": changed})
    if env.main:
        for damaged, path, cause in skipped:
            aside = store.set_aside(Path(damaged))
            _say(args, env, f"skipped damaged checkpoint {path}: {cause} (moved to {aside.name})", always=True)
        store.prune()  # finish a prune a kill interrupted
        dropped = run_dir.truncate_eval_log(Path(args.out_dir), progress.step)
        note = f"; dropped {dropped} eval.jsonl record(s) past step {progress.step}" if dropped else ""
        _say(args, env, f"resuming from {folder} (step {progress.step}){note}", always=bool(skipped))
        for key, (old, new) in changed.items():
            why = RESUME_MAY_CHANGE[key]
            _say(args, env, f"resume: {_flag(key)} changed {old!r} -> {new!r} (honoured{': ' + why if why else ''}; "
                            "recorded in run.json)", always=True)
    env.barrier()


# ---------------------------------------------------------------------------- the training loop
def train_step(args: argparse.Namespace, env: Environment, data: Data, training: Training,
               progress: Progress) -> float:
    """One optimizer step over ``--grad-accum`` micro-batches; returns the global batch's mean loss."""
    model, t0 = training.model, time.perf_counter()
    loss_sum = 0.0
    for micro in range(args.grad_accum):
        # every rank draws the same global batch and trains on its slice: the averaged
        # gradient is the single-process gradient of the global batch
        batch = data.loader.next()[env.process_rank::env.world].to(env.device)
        last = micro == args.grad_accum - 1
        sync = model.no_sync() if args.parallel == "ddp" and not last else contextlib.nullcontext()
        with sync:
            with env.autocast():
                loss = lm_loss(model, batch)
            (loss / args.grad_accum).backward()
        loss_sum += float(loss.detach())
        if training.layerwise is not None:
            training.layerwise.step()
    t1 = time.perf_counter()
    if training.layerwise is None:
        if training.clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), training.clip)
        training.optimizer.step()
        training.scheduler.step()
        training.optimizer.zero_grad(set_to_none=True)
    if env.device.type == "cuda":
        torch.cuda.synchronize(env.device)
    t2 = time.perf_counter()
    progress.step += 1
    progress.step_times.append(t2 - t0)
    progress.opt_times.append(t2 - t1)
    if env.world > 1:  # the global batch's loss, not this rank's slice
        import torch.distributed as dist

        total = torch.tensor([loss_sum], dtype=torch.float64, device=env.device)
        dist.all_reduce(total)
        loss_sum = float(total) / env.world
    train_loss = loss_sum / args.grad_accum
    progress.train_losses.append(train_loss)
    if not math.isfinite(train_loss):
        raise FloatingPointError(f"training loss became {train_loss} at step {progress.step}")
    return train_loss


def evaluate_and_report(args: argparse.Namespace, env: Environment, data: Data, training: Training,
                        progress: Progress, train_loss: float, wandb_run: Any, bar: Any) -> None:
    """Validation loss into history, eval.jsonl, wandb and the terminal."""
    step = progress.step
    val_loss = evaluate(training.model, data.val_batches, env.device, env.autocast)
    tokens_per_step = args.batch_size * args.seq_len * args.grad_accum
    record = {"step": step, "tokens": step * tokens_per_step, "train_loss": train_loss,
              "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)),
              "val_bpb": data_mod.bits_per_byte(val_loss, data.bytes_per_token),
              "lr": training.scheduler.get_last_lr()[0], "time": time.time()}
    progress.history.append(record)
    if env.main:
        run_dir.append_eval(Path(args.out_dir), record)
    if wandb_run is not None:
        wandb_run.log(record, step=step)
    if env.main and not args.quiet:
        line = (f"step {step}/{args.max_steps}: val loss {val_loss:.4f} (ppl {record['val_ppl']:.2f}, "
                f"{record['val_bpb']:.3f} bits/byte), train loss {train_loss:.4f}, lr {record['lr']:.3g}")
        if bar is not None:
            bar.write(line)
        else:
            print(line, flush=True)


def train_loop(args: argparse.Namespace, env: Environment, store: CheckpointStore, data: Data,
               training: Training, progress: Progress, wandb_run: Any, on_step: Any) -> Any:
    """Step to ``--max-steps``; returns what stopped it early (a signal number, ``"stop_after"``) or None."""
    bar = None
    if not args.no_progress and env.main:
        from tqdm.auto import tqdm

        bar = tqdm(total=args.max_steps, initial=progress.step, desc=f"{args.config} {args.optimizer}",
                   dynamic_ncols=True)
    tokens_per_step = args.batch_size * args.seq_len * args.grad_accum
    start_step = progress.step
    stopped_by = None
    with _StopFlag() as stop:
        while progress.step < args.max_steps:
            train_loss = train_step(args, env, data, training, progress)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tokens_per_step / progress.step_times[-1]:.0f}",
                                mem_mb=f"{memory_mb(env.device):.0f}")
            if progress.step % args.eval_every == 0 or progress.step == args.max_steps:
                evaluate_and_report(args, env, data, training, progress, train_loss, wandb_run, bar)
            if args.save_every and progress.step % args.save_every == 0:
                save_run_checkpoint(args, env, store, data, training, progress)
            if on_step is not None:
                on_step(progress.step)
            if stop.signal is not None:
                stopped_by = stop.signal
                break
            if args.stop_after and progress.step - start_step >= args.stop_after:
                stopped_by = "stop_after"
                break
    if bar is not None:
        bar.close()
    return stopped_by


# ---------------------------------------------------------------------------- the run
def run(args: argparse.Namespace, on_step: Any = None) -> dict[str, Any]:
    """Train as ``args`` say; returns a summary (final validation loss, bits per byte, timings, history).

    ``on_step(step)``, if given, is called after every optimizer step (tests use it to send a signal).
    """
    validate_args(args)
    env = setup_environment(args)
    out_dir = Path(args.out_dir)
    store = CheckpointStore(out_dir, args.keep_checkpoints)
    prepare_out_dir(args, env, store)
    resume_from = choose_checkpoint(args, env, store) if args.resume else None
    data = build_data(args)
    model = build_run_model(args, env, data.vocab_size)
    training = build_training(args, model)
    progress = Progress()
    if resume_from is not None:
        resume_run(args, env, store, *resume_from, data, training, progress)
    elif env.main:
        run_dir.start_eval_log(out_dir)
    if env.main:
        run_dir.write_run_file(out_dir, training_args(args, training), progress.resumes)
    run_config = dict(vars(args), params=count_params(model), rank=training.rank, vocab_size=data.vocab_size,
                      device=str(env.device), bf16=env.use_bf16)
    wandb_run = init_wandb(args, run_config) if args.wandb and env.main else None

    stopped_by = train_loop(args, env, store, data, training, progress, wandb_run, on_step)

    checkpoint = None
    if stopped_by is not None or progress.step == args.max_steps or args.save_every:
        checkpoint = save_run_checkpoint(args, env, store, data, training, progress)
    if wandb_run is not None:
        wandb_run.finish()
    if training.layerwise is not None:
        training.layerwise.remove_hooks()
    if stopped_by is not None and checkpoint is not None:
        how = "--stop-after" if stopped_by == "stop_after" else signal.Signals(stopped_by).name
        _say(args, env, f"stopped by {how} at step {progress.step}/{args.max_steps}; checkpoint: {checkpoint}",
             always=stopped_by != "stop_after")
        _say(args, env, f"resume with: {resume_command(args, env.world)}", always=stopped_by != "stop_after")
    return summarize(args, training, progress, stopped_by)


def summarize(args: argparse.Namespace, training: Training, progress: Progress, stopped_by: Any) -> dict[str, Any]:
    # steady-state timings: drop the first steps (allocation, first refresh) when there are enough
    skip = min(3, len(progress.step_times) // 4)
    final = progress.history[-1] if progress.history else {}
    return {
        "config": args.config, "optimizer": args.optimizer, "steps": progress.step,
        "tokens": progress.step * args.batch_size * args.seq_len * args.grad_accum,
        "params": count_params(training.model), "rank": training.rank,
        "final_val_loss": final.get("val_loss"), "final_val_bpb": final.get("val_bpb"),
        "final_val_ppl": final.get("val_ppl"),
        "state_bytes": lrgrad.optimizer_state_bytes(training.optimizer),
        "step_time_s": statistics.median(progress.step_times[skip:]) if progress.step_times else None,
        "opt_step_time_s": statistics.median(progress.opt_times[skip:]) if progress.opt_times else None,
        "history": progress.history, "train_losses": progress.train_losses, "stopped_by_signal": stopped_by,
        "model": training.model, "optimizer_obj": training.optimizer,
    }


def run_and_close_group(args: argparse.Namespace) -> dict[str, Any]:
    """:func:`run`, then ``destroy_process_group`` for the group the run made (``init_from_env``, under
    torchrun), as torch asks of every process before it exits (a group left to interpreter finalization can
    abort the process after the work is done). Not a group the caller made before (it may still need it),
    and not after an error: the exception passes through, since another rank may still wait in a collective."""
    import torch.distributed as dist

    def initialized() -> bool:
        return dist.is_available() and dist.is_initialized()

    made_here = not initialized()
    summary = run(args)
    if made_here and initialized():
        dist.destroy_process_group()
    return summary


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        summary = run_and_close_group(args)
    except (data_mod.DataSourceError, FileNotFoundError, CheckpointError, run_dir.RunExistsError,
            ResumeMismatchError) as exc:
        # every checkpoint problem: exit 2 with one line naming the file and the cause
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    if not args.quiet:
        keys = ("config", "optimizer", "steps", "tokens", "final_val_loss", "final_val_bpb", "state_bytes",
                "step_time_s")
        print(json.dumps({k: summary[k] for k in keys}))
    # a signal stop exits 130; --stop-after did what it was asked (and a non-zero exit
    # would make torchrun kill the other ranks)
    return 130 if summary["stopped_by_signal"] not in (None, "stop_after") else 0


if __name__ == "__main__":
    sys.exit(main())
