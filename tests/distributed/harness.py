"""Run a function on 2 CPU processes (gloo) from inside a test, and collect what each rank returns."""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, outdir: str, fn: Callable[..., Any], args: tuple) -> None:
    os.environ["TRITON_INTERPRET"] = "1"
    torch.set_num_threads(1)
    tests_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if tests_dir not in sys.path:
        sys.path.insert(0, tests_dir)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        torch.save(result, os.path.join(outdir, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears gloo down while another still reads from it
    except BaseException:
        with open(os.path.join(outdir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()
    # The rank's result is on disk and the group is gone: end the process here. torch 2.13's interpreter
    # finalization after gloo + FSDP2 aborts now and then ("terminate called without an active exception",
    # SIGABRT after atexit: about 1 spawn in 40 of test_fsdp2_refusals.py here, after both ranks had saved
    # their results), which would fail a test whose every check passed. A failing ``fn`` still raises
    # above, and so still exits non-zero with its traceback in rank<r>.err.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_distributed(fn: Callable[..., Any], *args: Any, world: int = WORLD) -> list[Any]:
    """``fn(rank, world, *args)`` on ``world`` spawned processes; returns every rank's result."""
    with tempfile.TemporaryDirectory() as outdir:
        try:
            mp.spawn(_entry, args=(world, free_port(), outdir, fn, args), nprocs=world, join=True)
        except Exception as exc:
            errors = [open(os.path.join(outdir, f)).read() for f in sorted(os.listdir(outdir)) if f.endswith(".err")]
            raise AssertionError("worker failed:\n" + "\n".join(errors)) from exc
        return [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False) for r in range(world)]


# ---------------------------------------------------------------------------- shared training helpers
#: optimizers exercised under DDP/FSDP2 when lrgrad exports them (projectors land over time)
CANDIDATES = ("GaLoreAdamW", "GaLoreAdafactor", "LowRankLion", "DCTAdamW", "FloraAdamW",
              "OnlineSubspaceAdamW", "GaLoreAdamW8bit", "QGaLoreAdamW", "GaLoreMuon", "GaLoreAuON",
              "APOLLOAdamW", "APOLLOMiniAdamW", "FiraAdamW")
STEPS = 5
GAP = 2  # refreshes on steps 1, 3, 5


def available(names=CANDIDATES) -> list[str]:
    import lrgrad

    return [n for n in names if n in lrgrad.OPTIMIZERS]


def make_model(hidden: int = 35, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    """TinyLM with an FFN width not divisible by 2: uneven FSDP2 shards (18 + 17 rows)."""
    from tiny_model import TinyLM

    torch.manual_seed(0)
    return TinyLM(hidden=hidden).to(dtype)


def make_optimizer(name: str, model: torch.nn.Module, **options: Any) -> torch.optim.Optimizer:
    import lrgrad

    return lrgrad.OPTIMIZERS[name](lrgrad.param_groups(model, rank=8, update_proj_gap=GAP, **options), lr=1e-2)


def train_steps(model, opt, start: int, stop: int, rank: int = 0, world: int = 1, step=None) -> None:
    """Steps ``start..stop-1`` on global batches of 8; each rank takes its 8 / world rows.

    DDP and FSDP2 average gradients over ranks, so the mean loss of each half
    gives the gradient of the full batch's mean loss.
    """
    from tiny_model import lm_loss, make_batch

    for i in range(start, stop):
        tokens = make_batch(seed=i)
        rows = tokens.shape[0] // world
        opt.zero_grad()
        lm_loss(model, tokens[rank * rows:(rank + 1) * rows]).backward()
        (step or opt.step)()


def full_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters by name as plain full tensors (DTensors all-gathered; DDP's prefix dropped)."""
    out = {}
    for k, v in module.state_dict().items():
        v = v.full_tensor() if hasattr(v, "full_tensor") else v
        out[k.removeprefix("module.")] = v.detach().clone()
    return out


def projector_states(opt: torch.optim.Optimizer, names: dict[int, str]) -> dict[str, dict[str, Any]]:
    """Every param's optimizer state (DTensors gathered) keyed by param name."""
    out = {}
    for p, st in opt.state.items():
        out[names[id(p)]] = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in st.items()}
    return out


def make_batch_half_run(name: str = "GaLoreAdamW") -> dict[str, torch.Tensor]:
    """One process training on rank 0's half batch only (what an un-reduced hook would see)."""
    model = make_model()
    opt = make_optimizer(name, model)
    train_steps(model, opt, 0, STEPS, rank=0, world=2)
    return full_state(model)
