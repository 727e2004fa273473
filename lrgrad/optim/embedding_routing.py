"""Give embeddings and the output head AdamW in matrix-only optimizers, when they can be recognised.

Muon's own guidance (Jordan et al. 2024) and the AuON paper run the embedding and the output
head with AdamW: they are lookup tables / classifiers, not hidden linear maps, and
Newton–Schulz on a 32000 x 512 matrix costs more than the rest of a small model's step.
A plain ``model.parameters()`` carries no names, so nothing can be recognised there; named
parameters can:

* ``model.named_parameters()`` (``(name, tensor)`` pairs, ``torch.optim``'s named form);
* groups whose ``params`` are such pairs (``lrgrad.param_groups``) or that carry ``param_names``.

Given the generator ``model.named_parameters()``, the model's structure decides (an
``nn.Embedding``'s weight, and the head as ``lrgrad.groups.head_modules`` recognises it:
``get_output_embeddings()``, a tied weight, the last linear of a model without that API, then
names), as ``lrgrad.param_groups`` does; otherwise a matrix whose name is an embedding's or a head's
by the name rule of the low-rank presets' routing (``lrgrad.groups.is_embedding_or_head_name``: a
component containing ``embed``, ``wte``/``wpe``/``shared``, a head module such as ``lm_head`` or
``output``, a top-level ``fc``), so a list of pairs routes as ``model.named_parameters()``. Each such
matrix moves to a group of its own with ``rule="adamw"`` and the AdamW hyperparameters of
the matrix-only rule (``adamw_lr``, ``adamw_betas``, ``adamw_eps``, ``adamw_weight_decay``);
a group that already names a ``rule`` is left alone.

Mixture-of-Experts stacks ``(E, m, n)`` (recognised as ``lrgrad.param_groups`` recognises them) move to a
group with ``experts=True`` (a group that sets ``experts`` itself is left alone): the matrix-only rule then
orthogonalizes each expert's ``(m, n)`` matrix, not the ``(E, m·n)`` view of the stack (``lrgrad.experts``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lrgrad.groups import (
    EXPERTS,
    head_modules,
    is_embedding_or_head_name,
    is_expert_stack_name,
    low_rank_param_kinds,
    model_of_named_parameters,
    once_per_tensor,
    weight_params,
)


def _named(items: list[Any]) -> bool:
    return bool(items) and all(isinstance(i, tuple) and len(i) == 2 and isinstance(i[0], str) for i in items)


def is_embedding_or_head(name: str, param: torch.Tensor) -> bool:
    """A matrix whose name is an embedding's or the output head's by the rule the low-rank presets route
    named params with (:func:`lrgrad.groups.is_embedding_or_head_name`: Meta LLaMA's ``tok_embeddings``,
    BERT's ``word_embeddings``, T5's ``shared``, a top-level ``fc``, ... as well as ``DEFAULT_EXCLUDE``)."""
    return param.dim() >= 2 and is_embedding_or_head_name(name)


def embedding_and_head_ids(model: nn.Module) -> set[int]:
    """The ids of ``model``'s embedding and output-head matrices, recognised structurally."""
    heads = head_modules(model)
    weights = [w for name, m in model.named_modules() if name in heads or isinstance(m, nn.Embedding)
               for w in weight_params(m)]
    return {id(w) for w in weights if w.dim() >= 2}


def route_embeddings_to_adamw(params: Any, adamw: dict[str, Any]) -> Any:
    """``params`` with recognised embeddings/heads split into ``rule="adamw"`` groups.

    ``adamw`` holds the group keys the AdamW groups get (``lr``, ``betas``, ``eps`` and
    optionally ``weight_decay``). Unnamed params are returned unchanged (as a list).
    """
    if isinstance(params, torch.Tensor):
        return params  # torch.optim's own TypeError names the mistake
    model = model_of_named_parameters(params)
    structural = embedding_and_head_ids(model) if model is not None else None
    stacks = ({i for i, kind in low_rank_param_kinds(model).items() if kind == EXPERTS}
              if model is not None else None)
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
        # by structure where the model is known, and by name always: a raw embedding param (a ViT's pos_embed,
        # its patch_embed convolution) is no nn.Embedding, and the two routes must agree
        flags = [(structural is not None and id(p) in structural) or is_embedding_or_head(n, p) for n, p in members]
        # a tied tensor listed under each name (remove_duplicate=False) once, moved if any name is a table's
        members, stays = once_per_tensor(members, [not flag for flag in flags])
        keep = [pair for pair, stay in zip(members, stays) if stay]
        moved = [pair for pair, stay in zip(members, stays) if not stay]
        rest = {k: v for k, v in group.items() if k not in ("params", "param_names")}
        if "experts" not in group:  # expert stacks: one matrix per expert
            is_stack = [id(p) in stacks if stacks is not None else is_expert_stack_name(n, p) for n, p in keep]
            experts = [pair for pair, flag in zip(keep, is_stack) if flag]
            keep = [pair for pair, flag in zip(keep, is_stack) if not flag]
            if experts:
                routed.append({**rest, "params": experts, "experts": True})
        if keep:
            routed.append({**rest, "params": keep})
        if moved:
            routed.append({**rest, "params": moved, "rule": "adamw", "rank": None, **adamw})
    return routed
