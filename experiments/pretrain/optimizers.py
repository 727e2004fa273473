"""Optimizer registry for the experiments: name -> factory applying a recipe.

The names, classes, labels and each paper's lr/scale come from the preset table
(``lrgrad.optim.presets``: the rows with a ``paper_recipe``, under their last alias), plus
``adamw`` (``torch.optim.AdamW``, the baseline).

Two recipes fill what the caller does not give (``--recipe`` of ``pretrain_llama.py``):

* ``galore-paper`` (the default; see docs/experiments.md): the GaLore paper's pretraining recipe
  (arXiv:2403.03507) - lr 0.01, scale 0.25, no weight decay, refresh gap 200 (short runs pass a
  smaller gap), rank per model config; ``flora_adamw`` and ``apollo_adamw`` scale 1,
  ``apollo_mini_adamw`` rank 1 and α = √128, ``fira_adamw`` scale 0.25 (arXiv:2412.05270,
  arXiv:2410.01623); ``auon`` / ``hybrid_auon`` lr 0.055, ``muon`` lr 0.01 on the block matrices,
  embeddings/head/norms AdamW at 0.003 (arXiv:2509.24320); ``adamw`` lr 0.003 (the AuON paper's
  AdamW lr for small LLaMAs; GaLore's 60M baseline used 0.001 at 10x the steps), no weight decay.
* ``library``: each optimizer's own defaults, exactly what ``lrgrad.<Class>(groups, rank=r)`` builds
  (lr 1e-3, weight decay 0.01, the RMS-matched ``scale`` for the AdamW presets; Muon lr 0.02;
  ``torch.optim.AdamW``'s own for ``adamw``) - the one-liner the README measures.

The low-rank methods use :func:`lrgrad.param_groups`: the attention/MLP projections are
projected, embeddings/head/norms run full rank.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import lrgrad
from lrgrad.optim.presets import PRESETS, Preset, resolve

#: ``galore-paper``: the GaLore paper's recipe; ``library``: each optimizer's own defaults
RECIPES = ("galore-paper", "library")


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    class_name: str | None  # attribute of lrgrad; None = torch.optim.AdamW
    lr: float  # the paper recipe's
    kind: str  # "lowrank" (projected matrices, options rank/gap/scale), "normalized", "adamw"
    scale: float | None = None  # the paper recipe's
    extra: dict[str, Any] = field(default_factory=dict)
    label: str = ""


def _spec(row: Preset) -> OptimizerSpec:
    """A preset row with a paper recipe, under its last alias (``galore_adamw``, ``apollo_mini_adamw``, ...)."""
    recipe = dict(row.paper_recipe or {})
    kind = "normalized" if resolve(row).matrix_only else "lowrank"
    return OptimizerSpec(row.aliases[-1], row.name, recipe.pop("lr"), kind, recipe.pop("scale", None), recipe,
                         row.label)


ADAMW_SPEC = OptimizerSpec("adamw", None, 3e-3, "adamw", label="AdamW (torch)")
REGISTRY: dict[str, OptimizerSpec] = {
    "adamw": ADAMW_SPEC,
    **{spec.name: spec for spec in (_spec(row) for row in PRESETS if row.paper_recipe is not None)},
}

#: options that only make sense for the projected (low-rank) families
LOW_RANK_OPTIONS = ("rank", "update_proj_gap", "scale")


def optimizer_class(name: str) -> type | None:
    spec = get_spec(name)
    if spec.class_name is None:
        return torch.optim.AdamW
    return lrgrad.OPTIMIZERS.get(spec.class_name)


def get_spec(name: str) -> OptimizerSpec:
    if name not in REGISTRY:
        raise ValueError(f"Invalid optimizer: {name!r}; choose one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


def available_optimizers() -> list[str]:
    """Registry names whose class this ``lrgrad`` provides, in registry order."""
    return [n for n in REGISTRY if optimizer_class(n) is not None]


def build_optimizer(
    name: str,
    model: nn.Module,
    *,
    lr: float | None = None,
    rank: int | None = None,
    update_proj_gap: int | None = None,
    scale: float | None = None,
    weight_decay: float | None = None,
    adamw_impl: str = "foreach",
    recipe: str = "galore-paper",
    **options: Any,
) -> torch.optim.Optimizer:
    """Instantiate optimizer ``name`` for ``model``; what is not given comes from ``recipe``
    (``"galore-paper"``: the paper defaults, weight decay 0; ``"library"``: the optimizer's own)."""
    spec = get_spec(name)
    cls = optimizer_class(name)
    if cls is None:
        raise RuntimeError(
            f"Optimizer {name!r} needs lrgrad.{spec.class_name}, which this lrgrad does not provide "
            f"(available: {', '.join(available_optimizers())})"
        )
    if recipe not in RECIPES:
        raise ValueError(f"Invalid recipe: {recipe!r}; expected one of {', '.join(RECIPES)}")
    if recipe == "library":
        return _library_optimizer(spec, cls, model, lr, rank, update_proj_gap, scale, weight_decay, adamw_impl,
                                  options)
    weight_decay = 0.0 if weight_decay is None else weight_decay
    lr = spec.lr if lr is None else lr
    if spec.kind == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, **_adamw_impl(adamw_impl),
                                 **options)
    if spec.kind == "lowrank":
        rank = spec.extra.get("rank", rank)  # a preset whose rank is part of the method (APOLLO-Mini: 1)
        if rank is None:
            raise ValueError(f"Invalid rank: optimizer {name!r} needs a rank")
        low = {"update_proj_gap": update_proj_gap} if update_proj_gap is not None else {}
        low["scale"] = spec.scale if scale is None else scale
        groups = lrgrad.param_groups(model, rank=rank, **low)
        return cls(groups, lr=lr, weight_decay=weight_decay, **{**spec.extra, **options})
    # normalized-momentum methods: block matrices get the rule; embeddings/head/norms AdamW.
    # ``rank`` given -> the rule runs inside an SVD projector (GaLore-style).
    low = {}
    if rank is not None:
        low = {"update_proj_gap": update_proj_gap or 200, "scale": 1.0 if scale is None else scale}
    groups = lrgrad.param_groups(model, rank=rank, **low)
    adamw_lr = options.pop("adamw_lr", REGISTRY["adamw"].lr)
    for g in groups[1:]:
        g.update(rule="adamw", lr=adamw_lr, weight_decay=weight_decay)
    return cls(groups, lr=lr, weight_decay=weight_decay, adamw_lr=adamw_lr, **{**spec.extra, **options})


def _adamw_impl(adamw_impl: str) -> dict[str, bool]:
    if adamw_impl not in ("foreach", "fused", "for-loop"):
        raise ValueError(f"Invalid adamw_impl: {adamw_impl!r}; expected 'foreach', 'fused' or 'for-loop'")
    return {"foreach": {"foreach": True}, "fused": {"fused": True}, "for-loop": {"foreach": False}}[adamw_impl]


def _library_optimizer(spec: OptimizerSpec, cls: type, model: nn.Module, lr: float | None, rank: int | None,
                       update_proj_gap: int | None, scale: float | None, weight_decay: float | None,
                       adamw_impl: str, options: dict[str, Any]) -> torch.optim.Optimizer:
    """``recipe="library"``: only what is given is passed; the class (or ``torch.optim.AdamW``) fills the rest."""
    given = {k: v for k, v in (("lr", lr), ("weight_decay", weight_decay)) if v is not None}
    if spec.kind == "adamw":
        return torch.optim.AdamW(model.parameters(), **given, **_adamw_impl(adamw_impl), **options)
    own_rank = cls.preset.defaults["rank"]  # a preset whose rank is part of the method (APOLLO-Mini: 1)
    rank = own_rank if own_rank is not None else (rank if spec.kind == "lowrank" else None)
    low = {k: v for k, v in (("update_proj_gap", update_proj_gap), ("scale", scale)) if v is not None}
    return cls(lrgrad.param_groups(model, rank=rank, **low), **given, **options)


def uses_lrgrad(opt: Any) -> bool:
    return isinstance(opt, lrgrad.LowRankOptimizer)


FACTORIES: dict[str, Callable[..., torch.optim.Optimizer]] = {
    n: (lambda model, _n=n, **kw: build_optimizer(_n, model, **kw)) for n in REGISTRY
}
