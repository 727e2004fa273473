"""Routing of fused MoE expert stacks (lrgrad.groups.projected_params, the one decision) on tiny transformers
MoE models built from configs (no hub), training them, and the memory estimator's count of their state."""

from __future__ import annotations

import os
import types

import pytest
import torch
from torch import nn

import lrgrad
from lrgrad.groups import param_groups

os.environ.setdefault("HF_HUB_OFFLINE", "1")
RANK = 8


def tiny_moe(kind: str = "mixtral", experts: int = 4, top_k: int = 2, seed: int = 0) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  num_experts_per_tok=top_k, max_position_embeddings=64)
    torch.manual_seed(seed)
    if kind == "mixtral":
        return transformers.MixtralForCausalLM(transformers.MixtralConfig(
            **common, intermediate_size=48, num_local_experts=experts))
    return transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        **common, intermediate_size=48, moe_intermediate_size=24, num_experts=experts, head_dim=8))


def stack_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.dim() == 3]


def group_names(groups) -> list[tuple[list[str], bool, int | None]]:
    """(names, experts flag, rank) of each group (param_groups' dicts or an optimizer's)."""
    out = []
    for g in groups:
        names = g.get("param_names") or [n for n, _ in g["params"]]
        out.append((sorted(names), bool(g.get("experts")), g["rank"]))
    return out


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_all_linear_projects_the_expert_stacks(kind):
    model = tiny_moe(kind)
    low, stacks, full = group_names(param_groups(model, RANK))
    assert stacks == (sorted(stack_names(model)), True, RANK) and len(stacks[0]) == 4
    assert low[1:] == (False, RANK) and all(n.endswith("_proj.weight") for n in low[0])
    # the router stays full-rank (its weight is (num_experts, hidden): no linear module), as do the head
    assert full[2] is None and "model.layers.0.mlp.gate.weight" in full[0] and "lm_head.weight" in full[0]


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_named_parameters_route_like_param_groups(kind):
    model = tiny_moe(kind)
    expected = group_names(param_groups(model, RANK))
    by_model = lrgrad.GaLoreAdamW(model.named_parameters(), rank=RANK)
    by_name = lrgrad.GaLoreAdamW(list(model.named_parameters()), rank=RANK)  # no model: routed by name
    assert group_names(by_model.param_groups) == expected
    # by name, the stacks are the same; (as for any 2-D param) the router's (E, hidden) weight joins the
    # matrix group, where E <= rank runs it full-rank all the same
    routed = group_names(by_name.param_groups)
    assert routed[1] == expected[1]
    assert [n for n in routed[0][0] if not n.endswith("mlp.gate.weight")] == expected[0][0]


def test_named_groups_without_rank_split_their_stacks_off():
    """A decay / no-decay split of named params (no rank of their own) keeps the stacks projected."""
    model = tiny_moe()
    decay = [(n, p) for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [(n, p) for n, p in model.named_parameters() if p.dim() < 2]
    opt = lrgrad.GaLoreAdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], rank=RANK)
    stacks = [g for g in opt.param_groups if g["experts"]]
    assert len(stacks) == 1 and sorted(stacks[0]["param_names"]) == sorted(stack_names(model))
    assert stacks[0]["rank"] == RANK


def test_target_modules_select_stacks_by_module_or_param_name():
    model = tiny_moe()
    every = sorted(stack_names(model))
    for targets in (["experts"], ["mlp"], r".*\.experts", ["*.experts.*"]):
        groups = param_groups(model, RANK, target_modules=targets)
        # no empty matrix group first: torch refuses one beside groups of (name, tensor) pairs
        assert group_names(groups)[0] == (every, True, RANK), targets
        lrgrad.GaLoreAdamW(groups, lr=1e-2)
    down = param_groups(model, RANK, target_modules=["down_proj"])
    assert group_names(down)[0] == ([n for n in every if n.endswith("down_proj")], True, RANK)
    both = param_groups(model, RANK, target_modules=["self_attn", "experts.gate_up_proj"])
    assert len(group_names(both)[0][0]) == 8
    assert group_names(both)[1][0] == [n for n in every if n.endswith("gate_up_proj")]
    with pytest.raises(ValueError, match="'nothing'.*expert stack"):
        param_groups(model, RANK, target_modules=["nothing"])


class ToyExperts(nn.Module):
    """gpt-oss's layout: (E, in, out) stacks with stacked biases (E, out)."""

    def __init__(self):
        super().__init__()
        self.num_experts = 3
        self.gate_up_proj = nn.Parameter(torch.randn(3, 16, 24))
        self.gate_up_proj_bias = nn.Parameter(torch.zeros(3, 24))
        self.down_proj = nn.Parameter(torch.randn(3, 12, 16))


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 16)
        self.experts = ToyExperts()
        self.bilinear = nn.Bilinear(16, 16, 16)  # a 3-D weight that is no expert stack
        self.conv = nn.Conv1d(16, 16, 3)  # a 3-D kernel: projected as (out, in * k) when named
        self.fc = nn.Linear(16, 4)  # the head


def test_stacked_biases_and_other_3d_weights_keep_their_routing():
    low, stacks, full = group_names(param_groups(Toy(), 4))
    assert low[0] == ["proj.weight"]
    assert stacks[0] == ["experts.down_proj", "experts.gate_up_proj"]
    assert {"experts.gate_up_proj_bias", "bilinear.weight", "conv.weight", "fc.weight"} <= set(full[0])
    named = param_groups(Toy(), 4, target_modules=["conv", "experts"])
    assert group_names(named)[0][0] == ["conv.weight"] and not named[0].get("experts")
    model = Toy()
    opt = lrgrad.GaLoreAdamW(param_groups(model, 4, target_modules=["conv", "experts"]), lr=1e-2)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[model.conv.weight]["exp_avg"].shape == (4, 48)  # the (16, 16*3) matrix, one state
    assert len(opt.state[model.experts.gate_up_proj]["experts"]) == 3


class ExpertsAndHead(nn.Module):
    """An MoE block whose only linear besides its experts is the output head."""

    def __init__(self):
        super().__init__()
        self.experts = ToyExperts()
        self.fc = nn.Linear(16, 4)


def test_a_model_whose_only_projected_weights_are_stacks_builds_an_optimizer():
    model = ExpertsAndHead()
    groups = param_groups(model, 4)
    # no empty matrix group: torch refuses one beside groups of (name, tensor) pairs
    assert [bool(g.get("experts")) for g in groups] == [True, False]
    opt = lrgrad.GaLoreAdamW(groups, lr=1e-2)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    assert len(opt.state[model.experts.down_proj]["experts"]) == 3
    for p in model.experts.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="target_modules.*requires_grad=False"):
        param_groups(model, 4)


def lm_batch(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(seed))


def test_tiny_mixtral_trains_with_projected_experts_and_the_estimate_is_exact():
    model = tiny_moe()
    estimate = lrgrad.estimate_memory(model, optimizer="galore", rank=RANK)
    opt = lrgrad.GaLoreAdamW(model.named_parameters(), rank=RANK, lr=1e-2, update_proj_gap=2)
    ids = lm_batch()
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    stacks = [p for p in model.parameters() if p.dim() == 3]
    experts = [s for p in stacks for s in opt.state[p]["experts"]]
    assert len(experts) == 16 and all(s["proj_refreshes"] > 0 for s in experts)  # every expert stepped
    for p in stacks:  # each expert's moments are rank x max(m, n), not m x n
        for s in opt.state[p]["experts"]:
            assert s["exp_avg"].shape == (RANK, max(p.shape[1:])) or s["exp_avg"].shape == (max(p.shape[1:]), RANK)
    assert estimate.optimizer_state + estimate.projector_state == lrgrad.optimizer_state_bytes(opt)
    full_rank_stack_moments = sum(2 * p.numel() * 4 for p in stacks)
    stack_state = sum(v.numel() * v.element_size() for p in stacks for s in opt.state[p]["experts"]
                      for v in s.values() if isinstance(v, torch.Tensor))
    assert stack_state < full_rank_stack_moments / 2


def test_experts_without_tokens_keep_their_weights():
    """8 experts, top-1, 6 tokens: some experts get no token, their gradient slices are exactly zero; they
    are skipped (weights and state unchanged), the others step, nothing is NaN."""
    model = tiny_moe(experts=8, top_k=1)
    opt = lrgrad.GaLoreAdamW(model.named_parameters(), rank=4, lr=1e-2, update_proj_gap=1, weight_decay=0.1)
    ids = lm_batch()[:1, :6]
    model(input_ids=ids, labels=ids).loss.backward()
    stack = model.model.layers[0].mlp.experts.down_proj
    idle = (stack.grad.reshape(8, -1) == 0).all(dim=1)
    assert idle.any() and not idle.all()
    before = stack.detach().clone()
    opt.step()
    assert torch.equal(stack.detach()[idle], before[idle])
    assert not torch.equal(stack.detach()[~idle], before[~idle])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert [s["step"] for s in opt.state[stack]["experts"]] == (~idle).int().tolist()


def test_transformers_integration_builds_the_experts_group():
    from lrgrad.integrations.transformers import build_param_groups

    model = tiny_moe()
    args = types.SimpleNamespace(optim_target_modules=None, optim_args=None, weight_decay=0.05)
    groups = build_param_groups(model, args, optimizer="GaLoreAdamW", rank=RANK)
    stacks = [g for g in groups if g.get("experts")]
    assert len(stacks) == 1 and stacks[0]["rank"] == RANK and stacks[0]["weight_decay"] == 0.05
    assert sorted(n for n, _ in stacks[0]["params"]) == sorted(stack_names(model))
    lrgrad.GaLoreAdamW(groups)  # accepted as built


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_distributed_checkpoint_resume_is_bit_identical(tmp_path):
    """lrgrad.distributed.save_checkpoint / load_checkpoint (DCP, one process) over per-expert state: DCP
    builds its state template with a zero-gradient step, which steps every expert of a stack."""
    from lrgrad.distributed import load_checkpoint, save_checkpoint

    ids = lm_batch(1)

    def train(model, opt, steps):
        for _ in range(steps):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()

    model = tiny_moe()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    opt = lrgrad.GaLoreAdamW(model.named_parameters(), rank=4, lr=1e-2, update_proj_gap=2)
    train(model, opt, 3)
    save_checkpoint(tmp_path / "ckpt", model, opt)
    train(model, opt, 3)
    resumed = tiny_moe(seed=1)
    resumed.load_state_dict(start)
    resumed_opt = lrgrad.GaLoreAdamW(resumed.named_parameters(), rank=4, lr=1e-2, update_proj_gap=2)
    load_checkpoint(tmp_path / "ckpt", resumed, resumed_opt)
    train(resumed, resumed_opt, 3)
    for (name, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name



def test_muon_orthogonalizes_each_expert():
    """Muon(model.named_parameters()) puts the stacks in an experts group: Newton-Schulz runs on each expert's
    (m, n) matrix, bit for bit as Muon on the experts as separate params, not on the stack's (E, m*n) view."""
    model = tiny_moe()
    opt = lrgrad.Muon(model.named_parameters(), lr=0.02)
    groups = [g for g in opt.param_groups if g["experts"]]
    assert len(groups) == 1 and sorted(groups[0]["param_names"]) == sorted(stack_names(model))
    stack = model.model.layers[0].mlp.experts.gate_up_proj
    separate = [nn.Parameter(stack.detach()[e].clone()) for e in range(stack.shape[0])]
    reference = lrgrad.Muon(separate, lr=0.02)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()))
    for e, p in enumerate(separate):
        p.grad = stack.grad[e].clone()
    opt.step()
    reference.step()
    for e, p in enumerate(separate):
        assert torch.equal(stack.detach()[e], p.detach()), e
