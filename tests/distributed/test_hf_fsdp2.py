"""Accelerate and the Hugging Face Trainer driving FSDP2 with an lrgrad optimizer (2 CPU processes, gloo).

Weights after N steps (subspace refreshes at steps 1, 3, ...) must equal the single-process
full-batch run to 1e-10 (fp64, as tests/distributed), and checkpoints saved through
Accelerate (``save_state``) and the Trainer (``resume_from_checkpoint``) must resume exactly.

CPU only: Accelerate turns ``fsdp_plugin`` on for accelerator devices (MULTI_GPU, XPU, ...)
and silently ignores it for MULTI_CPU, so :func:`fsdp_on_cpu` marks the process state as
multi-device before the Accelerator is built. Everything after that (``fully_shard``,
Accelerate's swap of the optimizer's params for DTensors, DCP checkpoints) is the code a
GPU run executes; with GPUs, ``accelerate launch --use_fsdp --fsdp_version 2`` needs no shim.
"""

from __future__ import annotations

import os

import pytest
import torch
from harness import run_distributed
from hf_tiny import GAP, RANK, TokenDataset, reset_accelerate, tiny_llama, weights

import lrgrad
from lrgrad.integrations.transformers import optimizer_cls_and_kwargs

STEPS = 5
SAVE_AT = 3
TRAINER_STEPS = 4
TRAINER_SAVE_AT = 2
BATCH = 8  # global rows per step; each of 2 ranks takes 4


def fsdp_on_cpu() -> None:
    """Make Accelerate honour ``fsdp_plugin`` on CPU (see the module docstring)."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    state = PartialState(cpu=True)
    assert state.distributed_type == DistributedType.MULTI_CPU and state.backend == "gloo"
    state.distributed_type = DistributedType.MULTI_GPU


def set_torchrun_env(rank: int, world: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="29500", ACCELERATE_USE_CPU="true")


# ---------------------------------------------------------------------------- Accelerate
def make_optimizer(name: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    # svd="randomized": FSDP2 refreshes with the seeded sketch, so the single process runs it too
    sketch = {"svd": "randomized"} if name.startswith("GaLore") else {}
    groups = lrgrad.param_groups(model, rank=RANK, update_proj_gap=GAP, moment_policy="project", **sketch)
    return lrgrad.OPTIMIZERS[name](groups, lr=1e-2)


def batch(step: int, rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
    tokens = TokenDataset(rows=BATCH * STEPS).tokens[step * BATCH:(step + 1) * BATCH]
    rows = BATCH // world
    tokens = tokens[rank * rows:(rank + 1) * rows]
    return {"input_ids": tokens, "labels": tokens}


def train(model, opt, start: int, stop: int, rank: int = 0, world: int = 1, backward=None, on_step=None) -> None:
    for step in range(start, stop):
        loss = model(**batch(step, rank, world)).loss
        (backward or torch.Tensor.backward)(loss)
        opt.step()
        opt.zero_grad()
        if on_step is not None:
            on_step(step + 1)


def accelerate_fsdp2(name: str, rank: int, world: int, state_dir: str | None = None, resume: bool = False):
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin

    reset_accelerate()
    fsdp_on_cpu()
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                            transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
                                            state_dict_type="SHARDED_STATE_DICT")
    accelerator = Accelerator(cpu=True, fsdp_plugin=plugin)
    model = tiny_llama()
    opt = make_optimizer(name, model)  # built on the plain model: prepare() swaps in the DTensors
    model, opt = accelerator.prepare(model, opt)
    start = 0
    if resume:
        accelerator.load_state(state_dir)
        start = SAVE_AT
    save = (lambda step: accelerator.save_state(state_dir) if step == SAVE_AT else None) if not resume else None
    train(model, opt, start, STEPS, rank, world, backward=accelerator.backward, on_step=save if state_dir else None)
    shard = model.model.layers[0].mlp.gate_proj.weight
    return {"weights": weights(model), "shard": (type(shard).__name__, tuple(shard.to_local().shape)),
            "optimizer": type(opt.optimizer).__name__}


# ---------------------------------------------------------------------------- Trainer
def trainer_args(out: str, world: int, **overrides):
    from transformers import TrainingArguments

    options = dict(output_dir=out, max_steps=TRAINER_STEPS, per_device_train_batch_size=BATCH // world,
                   learning_rate=1e-2, lr_scheduler_type="linear", save_strategy="steps",
                   save_steps=TRAINER_SAVE_AT, logging_steps=100, report_to="none", use_cpu=True, seed=0,
                   disable_tqdm=True, dataloader_num_workers=0, train_sampling_strategy="sequential",
                   optim="galore_adamw", optim_target_modules=["self_attn", "mlp"],
                   optim_args=f"rank={RANK}, update_proj_gap={GAP}, moment_policy=project, svd=randomized")
    options.update(overrides)
    return TrainingArguments(**options)


def run_trainer(args, fsdp: bool, resume: str | None = None, build=tiny_llama):
    from transformers import Trainer

    if fsdp:
        fsdp_on_cpu()
    model = build()
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(rows=BATCH * TRAINER_STEPS),
                      optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(model, args))
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def trainer_fsdp2(rank: int, world: int, out: str) -> dict:
    fsdp = {"fsdp": "full_shard",
            "fsdp_config": {"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                            "state_dict_type": "SHARDED_STATE_DICT"}}
    reset_accelerate()
    trainer = run_trainer(trainer_args(out, world, **fsdp), fsdp=True)
    result = {"weights": weights(trainer.model), "optimizer": type(trainer.optimizer.optimizer).__name__,
              "dtensor": type(trainer.optimizer.optimizer.param_groups[0]["params"][0]).__name__}
    reset_accelerate()
    resumed = run_trainer(trainer_args(out, world, **fsdp), fsdp=True,
                          resume=os.path.join(out, f"checkpoint-{TRAINER_SAVE_AT}"))
    result["resumed"] = weights(resumed.model)
    return result


# ---------------------------------------------------------------------------- the 2-process run
def hf_fsdp2_worker(rank: int, world: int, tmp: str) -> dict:
    set_torchrun_env(rank, world)
    state_dir = os.path.join(tmp, "accelerate_state")
    return {
        "GaLoreAdamW": accelerate_fsdp2("GaLoreAdamW", rank, world, state_dir),
        "GaLoreAdamW_resumed": accelerate_fsdp2("GaLoreAdamW", rank, world, state_dir, resume=True),
        "FloraAdamW": accelerate_fsdp2("FloraAdamW", rank, world),  # seeded per param position
        "trainer": trainer_fsdp2(rank, world, os.path.join(tmp, "trainer")),
    }


@pytest.fixture(scope="module")
def hf_results(tmp_path_factory):
    return run_distributed(hf_fsdp2_worker, str(tmp_path_factory.mktemp("hf_fsdp2")))


def assert_same_weights(got: dict, want: dict, atol: float = 1e-10) -> None:
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=atol, rtol=0, msg=lambda m, k=key: f"{k}: {m}")


def single_process(name: str) -> dict:
    model = tiny_llama()
    train(model, make_optimizer(name, model), 0, STEPS)
    return weights(model)


def test_accelerate_fsdp2_shards_unevenly_and_keeps_the_lrgrad_optimizer(hf_results):
    assert [r["GaLoreAdamW"]["shard"] for r in hf_results] == [("DTensor", (18, 32)), ("DTensor", (17, 32))]
    assert all(r["GaLoreAdamW"]["optimizer"] == "GaLoreAdamW" for r in hf_results)


# The seeded sketch (GaLore's sharded refresh) takes an eigen-decomposition of an all-reduced sum,
# whose rounding differs from the single process's: 1e-6, as tests/distributed/test_fsdp2_native.py.
# Flora's seeded basis needs no decomposition: 1e-10.
@pytest.mark.parametrize(("name", "atol"), [("GaLoreAdamW", 1e-6), ("FloraAdamW", 1e-10)])
def test_accelerate_fsdp2_weights_match_single_process(hf_results, name, atol):
    want = single_process(name)
    for rank_result in hf_results:
        assert_same_weights(rank_result[name]["weights"], want, atol=atol)


def test_accelerate_fsdp2_save_state_load_state_resumes_exactly(hf_results):
    for rank_result in hf_results:
        assert_same_weights(rank_result["GaLoreAdamW_resumed"]["weights"], rank_result["GaLoreAdamW"]["weights"],
                            atol=0)


def test_trainer_fsdp2_matches_the_single_process_trainer(hf_results, tmp_path):
    reset_accelerate()
    want = weights(run_trainer(trainer_args(str(tmp_path), world=1), fsdp=False).model)
    for rank_result in hf_results:
        assert rank_result["trainer"]["optimizer"] == "GaLoreAdamW"
        assert rank_result["trainer"]["dtensor"] == "DTensor"
        assert_same_weights(rank_result["trainer"]["weights"], want)


def test_trainer_fsdp2_resume_from_checkpoint_is_exact(hf_results):
    for rank_result in hf_results:
        assert_same_weights(rank_result["trainer"]["resumed"], rank_result["trainer"]["weights"], atol=0)
