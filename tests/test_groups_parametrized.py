"""Routing on the models vision users write: parametrized weights (spectral_norm, weight_norm), heads held in an
``nn.Sequential`` (torchvision's ``classifier.1``), a ViT's raw embedding params. Every route must agree, and
building an optimizer must not change the model."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

import lrgrad


class Parametrized(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = parametrizations.weight_norm(nn.Linear(32, 32))
        self.fc2 = parametrizations.spectral_norm(nn.Linear(32, 32))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the older weight_norm is deprecated, still used
            self.fc3 = nn.utils.weight_norm(nn.Linear(32, 32))
        self.fc4 = nn.Linear(32, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc4(self.fc3(self.fc2(self.fc1(x))))))


def _projected(opt: lrgrad.LowRankOptimizer, model: nn.Module) -> set[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)] for g in opt.param_groups for p in g["params"] if opt.is_projected(p, g)}


ROUTES = {
    "named_parameters": lambda model: lrgrad.GaLoreAdamW(model.named_parameters(), rank=4),
    "param_groups": lambda model: lrgrad.GaLoreAdamW(lrgrad.param_groups(model, rank=4)),
    "muon": lambda model: lrgrad.Muon(model.named_parameters()),
}


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_building_an_optimizer_leaves_a_spectral_norm_model_as_it_was(route):
    """Reading ``fc2.weight`` runs spectral_norm's power iteration, which moves its ``_u``/``_v`` buffers: an
    optimizer built after the weights were loaded made the resumed run differ from the uninterrupted one."""
    model = Parametrized().train()
    before = {n: b.clone() for n, b in model.named_buffers()}
    ROUTES[route](model)
    assert all(torch.equal(b, before[n]) for n, b in model.named_buffers())


@pytest.mark.parametrize("route", ["named_parameters", "param_groups"])
def test_parametrized_linear_weights_are_projected_through_the_params_that_hold_them(route):
    """A parametrized ``nn.Linear``'s matrix lives in ``parametrizations.weight.original`` (weight_norm:
    ``original1``, the direction; the older weight_norm: ``weight_v``); these were never projected. The
    magnitude g, ``(out, 1)``, is a vector and stays full-rank."""
    model = Parametrized()
    opt = ROUTES[route](model)
    assert _projected(opt, model) == {"fc1.parametrizations.weight.original1", "fc2.parametrizations.weight.original",
                                      "fc3.weight_v", "fc4.weight"}
    loss = model(torch.randn(8, 32)).square().mean()
    loss.backward()
    opt.step()
    state = opt.state[model.fc2.parametrizations.weight.original]
    assert state["proj_basis"].shape == (4, 32) and state["proj_refreshes"] == 1


class SequentialHead(nn.Module):
    """torchvision's MobileNet / EfficientNet layout: ``classifier = Sequential(Dropout, Linear)``."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32))
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(32, 20))


@pytest.mark.parametrize("cls", ["GaLoreAdamW", "Muon"])
@pytest.mark.parametrize("form", ["generator", "list of pairs", "decay groups"])
def test_a_head_held_in_a_sequential_is_a_head_on_every_route(cls, form):
    """``classifier.1`` was the head by structure (the generator) but not by name: a list of pairs, or the
    decay / no-decay groups a fine-tuning script writes, projected it (GaLore) or orthogonalized it (Muon)."""
    model = SequentialHead()
    pairs = list(model.named_parameters())
    params = {"generator": model.named_parameters(), "list of pairs": pairs,
              "decay groups": [{"params": [(n, p) for n, p in pairs if p.dim() >= 2]},
                               {"params": [(n, p) for n, p in pairs if p.dim() < 2], "weight_decay": 0.0}]}[form]
    opt = getattr(lrgrad, cls)(params, rank=4) if cls == "GaLoreAdamW" else lrgrad.Muon(params)
    head = model.classifier[1].weight
    group = next(g for g in opt.param_groups if any(p is head for p in g["params"]))
    assert group["rule"] == "adamw" and not opt.is_projected(head, group)
    hidden = model.features[2].weight
    hidden_group = next(g for g in opt.param_groups if any(p is hidden for p in g["params"]))
    assert hidden_group["rule"] == ("adamw" if cls == "GaLoreAdamW" else "muon")


class TinyViT(nn.Module):
    """timm's layout: a patch-embedding convolution, raw ``cls_token``/``pos_embed`` params, blocks, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, 32, 4, stride=4)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 32))
        self.pos_embed = nn.Parameter(torch.zeros(1, 17, 32))
        self.blocks = nn.ModuleList(nn.Linear(32, 32) for _ in range(2))
        self.head = nn.Linear(32, 10)


@pytest.mark.parametrize("form", ["generator", "list of pairs"])
def test_muon_gives_a_vits_raw_embeddings_adamw_on_both_named_routes(form):
    """The generator route decided by structure only (no ``nn.Embedding``), the list route by name: Muon then
    orthogonalized ``pos_embed`` and the patch embedding on one route and not on the other."""
    model = TinyViT()
    opt = lrgrad.Muon(model.named_parameters() if form == "generator" else list(model.named_parameters()))
    rule = {id(p): g["rule"] for g in opt.param_groups for p in g["params"]}
    embeddings_and_head = (model.pos_embed, model.patch_embed.proj.weight, model.head.weight)
    assert [rule[id(p)] for p in embeddings_and_head] == ["adamw"] * 3
    assert rule[id(model.blocks[0].weight)] == "muon"


def test_a_zero_size_linear_beside_parametrized_ones_routes_without_error():
    """The vector test on the params a routing projects reads their shape only: a layer of no outputs (shape
    (0, n)) routes full-rank, with no index error."""
    model = nn.Sequential(nn.Linear(8, 0), nn.Linear(0, 8), parametrizations.weight_norm(nn.Linear(8, 8)),
                          nn.Linear(8, 4))
    low, full = lrgrad.param_groups(model, rank=2)
    assert [name for name, _ in low["params"]] == ["2.parametrizations.weight.original1"]
    assert "0.weight" in [name for name, _ in full["params"]]
