"""Optimizer registry for the experiments: name -> factory applying the paper recipe.

Classes are looked up in ``lrgrad.OPTIMIZERS`` (the package's one registry of optimizer
names) when a factory is called; a missing one gives a clear error naming the class.

Defaults (the papers' recipes; see docs/experiments.md):

* GaLore family (``galore_adamw``, ``dct_adamw``, ``online_subspace_adamw``, ``qgalore_adamw``):
  lr 0.01, scale 0.25, no weight decay, refresh gap 200 (the pretraining recipe of
  arXiv:2403.03507; short runs pass a smaller gap), rank per model config.
* ``flora_adamw``: the same lr/rank, scale 1 (its unbiased random projection), resampling
  every ``update_proj_gap`` steps.
* ``apollo_adamw`` (scale 1), ``apollo_mini_adamw`` (rank 1 whatever the config's rank, tensor-wise
  scale, α = √128), ``fira_adamw`` (scale 0.25): lr 0.01 as GaLore (arXiv:2412.05270, arXiv:2410.01623).
* ``auon`` / ``hybrid_auon``: lr 0.055, ``muon``: lr 0.01 — on the matrices of the
  transformer blocks; embeddings, head and norms get AdamW at 0.003 (arXiv:2509.24320).
* ``adamw``: ``torch.optim.AdamW``, lr 0.003 (the AuON paper's AdamW lr for small LLaMAs;
  GaLore's 60M baseline used 0.001 at 10x the steps), no weight decay.

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


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    class_name: str | None  # attribute of lrgrad; None = torch.optim.AdamW
    lr: float
    kind: str  # "lowrank" (projected matrices, options rank/gap/scale), "normalized", "adamw"
    scale: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    label: str = ""


REGISTRY: dict[str, OptimizerSpec] = {
    "adamw": OptimizerSpec("adamw", None, 3e-3, "adamw", label="AdamW (torch)"),
    "galore_adamw": OptimizerSpec("galore_adamw", "GaLoreAdamW", 1e-2, "lowrank", 0.25, label="GaLore-AdamW"),
    "galore_adafactor": OptimizerSpec("galore_adafactor", "GaLoreAdafactor", 1e-2, "lowrank", 0.25,
                                      label="GaLore-Adafactor"),
    "dct_adamw": OptimizerSpec("dct_adamw", "DCTAdamW", 1e-2, "lowrank", 0.25, label="DCT-AdamW"),
    "online_subspace_adamw": OptimizerSpec("online_subspace_adamw", "OnlineSubspaceAdamW", 1e-2, "lowrank", 0.25,
                                           label="OnlineSubspace-AdamW"),
    "qgalore_adamw": OptimizerSpec("qgalore_adamw", "QGaLoreAdamW", 1e-2, "lowrank", 0.25, label="Q-GaLore-AdamW"),
    "flora_adamw": OptimizerSpec("flora_adamw", "FloraAdamW", 1e-2, "lowrank", 1.0, label="Flora-AdamW"),
    "apollo_adamw": OptimizerSpec("apollo_adamw", "APOLLOAdamW", 1e-2, "lowrank", 1.0, label="APOLLO-AdamW"),
    "apollo_mini_adamw": OptimizerSpec("apollo_mini_adamw", "APOLLOMiniAdamW", 1e-2, "lowrank", 128**0.5,
                                       extra={"rank": 1}, label="APOLLO-Mini"),
    "fira_adamw": OptimizerSpec("fira_adamw", "FiraAdamW", 1e-2, "lowrank", 0.25, label="Fira-AdamW"),
    "auon": OptimizerSpec("auon", "AuON", 0.055, "normalized", label="AuON"),
    "hybrid_auon": OptimizerSpec("hybrid_auon", "HybridAuON", 0.055, "normalized", label="Hybrid-AuON"),
    "muon": OptimizerSpec("muon", "Muon", 1e-2, "normalized", label="Muon"),
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
    weight_decay: float = 0.0,
    adamw_impl: str = "foreach",
    **options: Any,
) -> torch.optim.Optimizer:
    """Instantiate optimizer ``name`` for ``model`` with the paper defaults; explicit arguments win."""
    spec = get_spec(name)
    cls = optimizer_class(name)
    if cls is None:
        raise RuntimeError(
            f"Optimizer {name!r} needs lrgrad.{spec.class_name}, which this lrgrad does not provide "
            f"(available: {', '.join(available_optimizers())})"
        )
    lr = spec.lr if lr is None else lr
    if spec.kind == "adamw":
        if adamw_impl not in ("foreach", "fused", "for-loop"):
            raise ValueError(f"Invalid adamw_impl: {adamw_impl!r}; expected 'foreach', 'fused' or 'for-loop'")
        impl = {"foreach": {"foreach": True}, "fused": {"fused": True}, "for-loop": {"foreach": False}}[adamw_impl]
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, **impl, **options)
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


def uses_lrgrad(opt: Any) -> bool:
    return isinstance(opt, lrgrad.LowRankOptimizer)


FACTORIES: dict[str, Callable[..., torch.optim.Optimizer]] = {
    n: (lambda model, _n=n, **kw: build_optimizer(_n, model, **kw)) for n in REGISTRY
}
