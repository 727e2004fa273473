"""Give embeddings and the output head AdamW in matrix-only optimizers, when they can be recognised.

Muon's own guidance (Jordan et al. 2024) and the AuON paper run the embedding and the output
head with AdamW: they are lookup tables / classifiers, not hidden linear maps, and
Newton–Schulz on a 32000 x 512 matrix costs more than the rest of a small model's step.
A plain ``model.parameters()`` carries no names, so nothing can be recognised there; named
parameters can:

* ``model.named_parameters()`` (``(name, tensor)`` pairs, ``torch.optim``'s named form);
* groups whose ``params`` are such pairs (``lrgrad.param_groups``) or that carry ``param_names``.

A matrix whose module name matches ``lrgrad.groups.DEFAULT_EXCLUDE`` (``embed_tokens``,
``lm_head``, ``wte``, ...) moves to a group of its own with ``rule="adamw"`` and the AdamW
hyperparameters of the matrix-only rule (``adamw_lr``, ``adamw_betas``, ``adamw_eps``,
``adamw_weight_decay``); a group that already names a ``rule`` is left alone.
"""

from __future__ import annotations

from typing import Any

import torch

from lrgrad.groups import DEFAULT_EXCLUDE, matches


def _named(items: list[Any]) -> bool:
    return bool(items) and all(isinstance(i, tuple) and len(i) == 2 and isinstance(i[0], str) for i in items)


def is_embedding_or_head(name: str, param: torch.Tensor) -> bool:
    """A matrix whose module (the name less its last part) matches ``DEFAULT_EXCLUDE``."""
    module = name.rsplit(".", 1)[0] if "." in name else name
    return param.dim() >= 2 and matches(module, DEFAULT_EXCLUDE)


def route_embeddings_to_adamw(params: Any, adamw: dict[str, Any]) -> Any:
    """``params`` with recognised embeddings/heads split into ``rule="adamw"`` groups.

    ``adamw`` holds the group keys the AdamW groups get (``lr``, ``betas``, ``eps`` and
    optionally ``weight_decay``). Unnamed params are returned unchanged (as a list).
    """
    if isinstance(params, torch.Tensor):
        return params  # torch.optim's own TypeError names the mistake
    items = list(params)
    if not items:
        return items
    if not isinstance(items[0], dict):
        if not _named(items):
            return items
        groups: list[dict[str, Any]] = [{"params": items}]
    else:
        groups = items
    routed: list[dict[str, Any]] = []
    for group in groups:
        if not isinstance(group, dict) or "rule" in group:
            routed.append(group)
            continue
        members = list(group["params"]) if not isinstance(group["params"], torch.Tensor) else [group["params"]]
        names = group.get("param_names")
        if names is not None and len(names) == len(members) and not _named(members):
            members = list(zip(names, members))
        if not _named(members):
            routed.append(group)
            continue
        keep = [(n, p) for n, p in members if not is_embedding_or_head(n, p)]
        moved = [(n, p) for n, p in members if is_embedding_or_head(n, p)]
        rest = {k: v for k, v in group.items() if k not in ("params", "param_names")}
        if keep:
            routed.append({**rest, "params": keep})
        if moved:
            routed.append({**rest, "params": moved, "rule": "adamw", "rank": None, **adamw})
    return routed
