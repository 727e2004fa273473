"""Accelerate and the Hugging Face Trainer driving FSDP2 over a tiny Mixtral's fused expert stacks (2 CPU processes).

The MoE counterpart of ``test_hf_fsdp2.py`` (same shim, batches and optimizers): a Mixtral with
``EXPERTS = 3`` experts, top-2 routing, fp64, optimizer built from ``lrgrad.param_groups`` (the stacks
``experts.gate_up_proj`` (3, 96, 32) and ``experts.down_proj`` (3, 32, 48) in the ``experts=True`` group).
FSDP2's ``Shard(0)`` gives rank 0 experts 0-1 and rank 1 expert 2.

* Accelerate, ``accumulate()`` over 2 micro-batches: weights equal one process stepping on the whole batch,
  and every expert's optimizer state lives on exactly the rank that holds the expert and equals the one
  process's state of that expert.
* Accelerate ``save_state`` after step 3 of 5, ``load_state`` in a fresh run: bit-identical to the
  uninterrupted run, weights and every expert's state.
* A tiny Qwen3-MoE (the same fused stacks behind its own, renormalised top-k router), GaLore: the same
  two checks under Accelerate.
* The Trainer with ``fsdp_config={"fsdp_version": 2, "state_dict_type": "SHARDED_STATE_DICT", ...}``: weights
  equal the single-process Trainer's; ``resume_from_checkpoint`` restores every expert's optimizer state exactly
  as saved and continues bit-identically. The sharded checkpoint holds the model as DCP under its own parameter
  names: transformers' MoE weight conversion, which makes one process's resume drop a Mixtral's experts and
  router (its safetensors hold ``block_sparse_moe.experts.N.w1``, not mapped back on load; see
  tests/integrations/test_transformers.py), is not on this route.
* ``FULL_STATE_DICT`` (the default) saves rank 0's optimizer state, which holds rank 0's experts only; a resume
  would give rank 1's experts torch's zero-gradient template state (docs/distributed.md):
  ``optimizer_cls_and_kwargs`` refuses it beside expert stacks before training (and the optimizer's
  ``load_state_dict`` refuses such a load: test_fsdp2_experts_dcp.py).
"""

from __future__ import annotations

import os

import pytest
import torch
from harness import run_distributed
from hf_tiny import TokenDataset, reset_accelerate, tiny_mixtral, tiny_qwen3_moe, weights
from test_fsdp2_experts import expert_states, same_tree
from test_hf_fsdp2 import (
    BATCH,
    SAVE_AT,
    STEPS,
    TRAINER_SAVE_AT,
    TRAINER_STEPS,
    assert_same_weights,
    batch,
    fsdp_on_cpu,
    make_optimizer,
    run_trainer,
    set_torchrun_env,
    train,
    trainer_args,
)

from lrgrad.integrations.transformers import optimizer_cls_and_kwargs

EXPERTS = 3  # 2 + 1 whole experts on 2 ranks (torch.chunk of the expert axis)
ACCUMULATION = 2
LAYER = "MixtralDecoderLayer"
#: the MoE families run under Accelerate: builder and the decoder layer FSDP2 wraps
FAMILIES = {"mixtral": (tiny_mixtral, LAYER), "qwen3_moe": (tiny_qwen3_moe, "Qwen3MoeDecoderLayer")}


def mixtral(family: str = "mixtral") -> torch.nn.Module:
    model = FAMILIES[family][0](experts=EXPERTS, top_k=2).to(torch.float64)
    model.set_experts_implementation("eager")  # a loop over experts: torch's grouped_mm refuses fp64
    return model


def held_experts(rank: int, world: int) -> list[int]:
    """The global indices of the experts FSDP2's ``Shard(0)`` leaves on ``rank``."""
    return torch.arange(EXPERTS).chunk(world)[rank].tolist()


# ---------------------------------------------------------------------------- Accelerate
def accelerate_moe(name: str, rank: int, world: int, state_dir: str | None = None, resume: bool = False,
                   state_dict_type: str = "SHARDED_STATE_DICT", family: str = "mixtral") -> dict:
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin

    reset_accelerate()
    fsdp_on_cpu()
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                            transformer_cls_names_to_wrap=[FAMILIES[family][1]],
                                            state_dict_type=state_dict_type)
    accelerator = Accelerator(cpu=True, fsdp_plugin=plugin, gradient_accumulation_steps=ACCUMULATION)
    model = mixtral(family)
    opt = make_optimizer(name, model)  # built on the plain model: prepare() swaps in the DTensors
    model, opt = accelerator.prepare(model, opt)
    start = 0
    if resume:
        accelerator.load_state(state_dir)
        start = SAVE_AT
    for step in range(start, STEPS):
        rows = batch(step)  # the global batch: ACCUMULATION micro-batches, each split over the ranks
        micro = BATCH // ACCUMULATION
        for j in range(ACCUMULATION):
            part = slice(j * micro + rank * micro // world, j * micro + (rank + 1) * micro // world)
            with accelerator.accumulate(model):
                accelerator.backward(model(**{k: v[part] for k, v in rows.items()}).loss)
                opt.step()
                opt.zero_grad()
        if step + 1 == SAVE_AT and state_dir is not None and not resume:
            accelerator.save_state(state_dir)
    stack = model.model.layers[0].mlp.experts.gate_up_proj
    return {"weights": weights(model), "experts": expert_states(model, opt.optimizer),
            "stack": (type(stack).__name__, tuple(stack.to_local().shape)),
            "optimizer": type(opt.optimizer).__name__}


# ---------------------------------------------------------------------------- Trainer
def expert_state_callback():
    """A Trainer callback keeping every held expert's optimizer state when a checkpoint is saved (``saved``, by
    step) and when training begins (``at_start``: after ``resume_from_checkpoint`` loaded the optimizer)."""
    from transformers import TrainerCallback

    class ExpertStates(TrainerCallback):
        def __init__(self):
            self.saved: dict[int, dict] = {}
            self.at_start: dict | None = None

        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            self.at_start = expert_states(model, optimizer.optimizer)

        def on_save(self, args, state, control, model=None, optimizer=None, **kwargs):
            self.saved[state.global_step] = expert_states(model, optimizer.optimizer)

    return ExpertStates()


def trainer_moe(rank: int, world: int, out: str) -> dict:
    from transformers import Trainer

    fsdp = {"fsdp": "full_shard",
            "fsdp_config": {"fsdp_version": 2, "transformer_layer_cls_to_wrap": [LAYER],
                            "state_dict_type": "SHARDED_STATE_DICT"}}
    # fsdp_config without state_dict_type: FULL_STATE_DICT, whose optimizer checkpoint is rank 0's state only
    full_state = {"fsdp": "full_shard", "fsdp_config": {"fsdp_version": 2, "transformer_layer_cls_to_wrap": [LAYER]}}
    reset_accelerate()
    try:
        optimizer_cls_and_kwargs(mixtral(), trainer_args(out, world, **full_state))
        result = {"refusal": None}
    except ValueError as exc:
        result = {"refusal": str(exc)}
    for label, resume in (("full", None), ("resumed", os.path.join(out, f"checkpoint-{TRAINER_SAVE_AT}"))):
        reset_accelerate()
        args = trainer_args(out, world, **fsdp)
        fsdp_on_cpu()  # after TrainingArguments, which sets the process state up
        callback = expert_state_callback()
        model = mixtral()
        trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(rows=BATCH * TRAINER_STEPS),
                          optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(model, args), callbacks=[callback])
        trainer.train(resume_from_checkpoint=resume)
        opt = trainer.optimizer.optimizer  # Accelerate's wrapper around the lrgrad optimizer
        result[label] = {"weights": weights(trainer.model), "experts": expert_states(trainer.model, opt),
                         "saved": callback.saved, "at_start": callback.at_start, "optimizer": type(opt).__name__}
    return result


# ---------------------------------------------------------------------------- the 2-process run
def hf_moe_worker(rank: int, world: int, tmp: str) -> dict:
    set_torchrun_env(rank, world)
    state_dir = os.path.join(tmp, "accelerate_state")
    qwen_dir = os.path.join(tmp, "accelerate_state_qwen3_moe")
    return {
        "GaLoreAdamW": accelerate_moe("GaLoreAdamW", rank, world, state_dir),
        "GaLoreAdamW_resumed": accelerate_moe("GaLoreAdamW", rank, world, state_dir, resume=True),
        "FloraAdamW": accelerate_moe("FloraAdamW", rank, world),
        # Qwen3-MoE: the same fused stacks behind its own router (top-k renormalised)
        "qwen3_moe/GaLoreAdamW": accelerate_moe("GaLoreAdamW", rank, world, qwen_dir, family="qwen3_moe"),
        "qwen3_moe/GaLoreAdamW_resumed": accelerate_moe("GaLoreAdamW", rank, world, qwen_dir, resume=True,
                                                        family="qwen3_moe"),
        "trainer": trainer_moe(rank, world, os.path.join(tmp, "trainer")),
    }


@pytest.fixture(scope="module")
def hf_results(tmp_path_factory):
    return run_distributed(hf_moe_worker, str(tmp_path_factory.mktemp("hf_fsdp2_moe")))


def single_process(name: str, family: str = "mixtral") -> dict:
    model = mixtral(family)
    opt = make_optimizer(name, model)
    train(model, opt, 0, STEPS)
    return {"weights": weights(model), "experts": expert_states(model, opt)}


def assert_close_tree(got, want, atol: float, where) -> None:
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.dtype == want.dtype, where
        torch.testing.assert_close(got, want, atol=atol, rtol=0, msg=lambda m: f"{where}: {m}")
    elif isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), (where, sorted(got), sorted(want))
        for key in want:
            assert_close_tree(got[key], want[key], atol, (*where, key))
    else:
        assert got == want, (where, got, want)


def test_accelerate_fsdp2_gives_each_rank_whole_experts(hf_results):
    for key in ("GaLoreAdamW", "qwen3_moe/GaLoreAdamW"):
        assert [r[key]["stack"] for r in hf_results] == [("DTensor", (2, 96, 32)), ("DTensor", (1, 96, 32))], key
    assert all(r[name]["optimizer"] == name for r in hf_results for name in ("GaLoreAdamW", "FloraAdamW"))


# Tolerances as test_hf_fsdp2.py: GaLore's sharded refresh of the dense matrices is the seeded sketch of an
# all-reduced sum, whose rounding differs from one process's (eigen-decompositions amplify it by the inverse
# spectral gap, which no bound ties to this data): 1e-6 (measured 3e-13 on weights, 5e-13 on expert states).
# Flora's seeded basis needs no decomposition: 1e-10 (measured 5e-16; fp64). The experts, held whole, refresh
# from their own gradient on both sides; it differs only by the order FSDP2 sums the half batches.
@pytest.mark.parametrize(("family", "name", "atol"), [("mixtral", "GaLoreAdamW", 1e-6),
                                                    ("mixtral", "FloraAdamW", 1e-10),
                                                    ("qwen3_moe", "GaLoreAdamW", 1e-6)])
def test_accelerate_fsdp2_moe_matches_one_process_and_keeps_each_experts_state_on_its_rank(hf_results, family, name,
                                                                                         atol):
    want = single_process(name, family)
    key = name if family == "mixtral" else f"{family}/{name}"
    for rank_result in hf_results:
        assert_same_weights(rank_result[key]["weights"], want["weights"], atol=atol)
    assert len(want["experts"]) == 4  # 2 layers x (gate_up_proj, down_proj)
    for stack, experts in want["experts"].items():
        assert sorted(experts) == list(range(EXPERTS))
        held = [r[key]["experts"][stack] for r in hf_results]
        for rank, mine in enumerate(held):  # each expert's state on the rank holding it, and only there
            assert sorted(mine) == held_experts(rank, len(hf_results)), (stack, rank, sorted(mine))
        merged = {**held[0], **held[1]}
        for e, state in experts.items():
            assert state["step"] == STEPS and state["proj_refreshes"] == 3, (stack, e)  # every expert stepped
            assert_close_tree(merged[e], state, atol, (name, stack, e))


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_accelerate_fsdp2_moe_save_state_load_state_resumes_exactly(hf_results, family):
    prefix = "" if family == "mixtral" else f"{family}/"
    for rank_result in hf_results:
        full, resumed = rank_result[f"{prefix}GaLoreAdamW"], rank_result[f"{prefix}GaLoreAdamW_resumed"]
        assert_same_weights(resumed["weights"], full["weights"], atol=0)
        assert full["experts"] and same_tree(resumed["experts"], full["experts"])


def test_trainer_fsdp2_moe_matches_the_single_process_trainer(hf_results, tmp_path):
    reset_accelerate()
    want = weights(run_trainer(trainer_args(str(tmp_path), world=1), fsdp=False, build=mixtral).model)
    for rank_result in hf_results:
        assert rank_result["trainer"]["full"]["optimizer"] == "GaLoreAdamW"
        assert_same_weights(rank_result["trainer"]["full"]["weights"], want)


def test_trainer_fsdp2_moe_refuses_a_full_state_dict_checkpoint(hf_results):
    """Each rank keeps its own experts' optimizer state; FULL_STATE_DICT (Accelerate's default) saves rank 0's,
    and a resume would give rank 1's expert torch's zero-gradient template state without an error."""
    for rank_result in hf_results:
        refusal = rank_result["trainer"]["refusal"]
        assert refusal is not None and "fsdp_config['state_dict_type']: FULL_STATE_DICT" in refusal
        assert "SHARDED_STATE_DICT" in refusal


def test_trainer_fsdp2_moe_resume_from_checkpoint_restores_every_expert_and_is_exact(hf_results):
    for rank, rank_result in enumerate(hf_results):
        full, resumed = rank_result["trainer"]["full"], rank_result["trainer"]["resumed"]
        saved = full["saved"][TRAINER_SAVE_AT]
        assert all(sorted(experts) == held_experts(rank, len(hf_results)) for experts in saved.values())
        assert len(saved) == 4 and same_tree(resumed["at_start"], saved)
        assert_same_weights(resumed["weights"], full["weights"], atol=0)
        assert same_tree(resumed["experts"], full["experts"])
