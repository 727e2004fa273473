"""Muon / AuON / Hybrid-AuON give recognised embeddings and output heads AdamW by default."""

from __future__ import annotations

import pytest
import torch
from tiny_model import TinyLM

import lrgrad
from lrgrad.optim.embedding_routing import is_embedding_or_head, route_embeddings_to_adamw

ADAMW = {"lr": 3e-3, "betas": (0.9, 0.95), "eps": 1e-8}


def model_with_grads(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = TinyLM()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    return model


def heads_of(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if is_embedding_or_head(n, p)}


def test_tiny_model_has_an_embedding_and_a_head():
    names = set(heads_of(TinyLM()))
    assert any("embed" in n for n in names) and any("head" in n for n in names)
    assert all(p.dim() >= 2 for p in heads_of(TinyLM()).values())


@pytest.mark.parametrize("cls", [lrgrad.Muon, lrgrad.AuON, lrgrad.HybridAuON])
def test_named_parameters_send_embeddings_and_head_to_adamw(cls):
    model = model_with_grads()
    heads = heads_of(model)
    opt = cls(model.named_parameters(), lr=0.02, weight_decay=0.0)
    [adamw] = [g for g in opt.param_groups if g["rule"] == "adamw"]
    assert {id(p) for p in adamw["params"]} == {id(p) for p in heads.values()}
    assert adamw["lr"] == 3e-3 and tuple(adamw["betas"]) == (0.9, 0.95)
    others = [g for g in opt.param_groups if g is not adamw]
    assert all(g["rule"] == cls(model.parameters()).defaults["rule"] for g in others)


def test_the_heads_step_exactly_as_torch_adamw():
    model = model_with_grads()
    heads = heads_of(model)
    copies = {n: p.detach().clone().requires_grad_() for n, p in heads.items()}
    for n, p in copies.items():
        p.grad = heads[n].grad.clone()
    opt = lrgrad.Muon(model.named_parameters(), lr=0.02, adamw_lr=3e-3, adamw_weight_decay=0.1)
    ref = torch.optim.AdamW(list(copies.values()), lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                            fused=True)
    for _ in range(3):
        opt.step()
        ref.step()
    for n, p in heads.items():
        assert torch.equal(p, copies[n]), n


def test_param_groups_are_routed_and_plain_parameters_are_not():
    model = model_with_grads()
    heads = {id(p) for p in heads_of(model).values()}
    opt = lrgrad.Muon(lrgrad.param_groups(model, rank=4), lr=0.02)
    routed = [g for g in opt.param_groups if g["rule"] == "adamw"]
    assert len(routed) == 1 and {id(p) for p in routed[0]["params"]} == heads and routed[0]["rank"] is None
    # nothing names a plain parameter list: every matrix stays with Muon (1-D ones take the fallback)
    plain = lrgrad.Muon(model.parameters(), lr=0.02)
    assert [g["rule"] for g in plain.param_groups] == ["muon"]
    off = lrgrad.Muon(model.named_parameters(), lr=0.02, adamw_for_embeddings=False)
    assert [g["rule"] for g in off.param_groups] == ["muon"]


def test_groups_that_name_a_rule_are_left_alone():
    model = model_with_grads()
    groups = [{"params": list(model.named_parameters()), "rule": "muon"}]
    assert route_embeddings_to_adamw(groups, ADAMW) == groups
    routed = route_embeddings_to_adamw([{"params": list(model.parameters()),
                                         "param_names": [n for n, _ in model.named_parameters()]}], ADAMW)
    assert sum(g.get("rule") == "adamw" for g in routed) == 1


def test_bad_flag_names_the_parameter():
    with pytest.raises(TypeError, match="adamw_for_embeddings"):
        lrgrad.Muon(TinyLM().named_parameters(), adamw_for_embeddings="yes")


#: embedding/head names of real checkpoints that a list of pairs carries (Meta LLaMA, BERT, T5, OPT, torchvision, timm)
TABLE_NAMES = ["tok_embeddings.weight", "output.weight", "bert.embeddings.word_embeddings.weight",
               "bert.embeddings.position_embeddings.weight", "shared.weight", "decoder.embed_positions.weight",
               "fc.weight", "head.fc.weight"]


@pytest.mark.parametrize("table", TABLE_NAMES)
@pytest.mark.parametrize("cls", [lrgrad.Muon, lrgrad.AuON, lrgrad.HybridAuON])
def test_a_list_of_pairs_sends_every_embedding_name_to_adamw_as_the_low_rank_route_does(cls, table):
    """``[(n, p) for n, p in model.named_parameters() if p.requires_grad]`` is a list, routed by name: the
    matrix-only rule's route must call the same names embeddings/heads as the low-rank presets' route (it
    missed Meta LLaMA's ``tok_embeddings``, BERT's ``word_embeddings``, T5's ``shared``, ... and ran
    Newton-Schulz on the vocabulary table)."""
    torch.manual_seed(0)
    block = torch.nn.Parameter(torch.randn(24, 16))
    tab = torch.nn.Parameter(torch.randn(40, 16))
    assert lrgrad.groups.is_embedding_or_head_name(table)
    opt = cls([("layers.0.attention.wq.weight", block), (table, tab)], lr=0.02)
    [adamw] = [g for g in opt.param_groups if g["rule"] == "adamw"]
    assert [id(p) for p in adamw["params"]] == [id(tab)]
    assert all(not any(p is tab for p in g["params"]) for g in opt.param_groups if g["rule"] != "adamw")
    assert any(p is block for g in opt.param_groups if g["rule"] != "adamw" for p in g["params"])
