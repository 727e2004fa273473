"""Build named param groups from a model: which weights run inside a projector.

    groups = lrgrad.param_groups(model, rank=128, target_modules="all-linear")
    opt = lrgrad.GaLoreAdamW(groups, lr=1e-2)

The low-rank group holds the weights of the targeted ``nn.Linear`` modules; the
full-rank group holds everything else (biases, norms, embeddings, the output
head). Names travel with the groups as ``param_names`` (``torch.optim``'s own
named-parameter support), so checkpoints stay readable.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any

from torch import nn

#: module names treated as the output head / embeddings and kept full-rank by default
DEFAULT_EXCLUDE = ("lm_head", "embed_tokens", "embed_in", "embed_out", "wte", "wpe", "output", "classifier")


def matches(name: str, patterns: Sequence[str]) -> bool:
    """A pattern matches a module name exactly, as a dotted suffix, or as a glob."""
    for pattern in patterns:
        if name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern):
            return True
        if pattern in name.split("."):
            return True
    return False


def select_low_rank_modules(
    model: nn.Module,
    target_modules: str | Sequence[str] = "all-linear",
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
) -> list[str]:
    """Names of the ``nn.Linear`` modules whose weight goes to the low-rank group."""
    if isinstance(target_modules, str) and target_modules != "all-linear":
        raise ValueError(
            f"Invalid target_modules: {target_modules!r}; expected 'all-linear' or a list of name patterns"
        )
    if not isinstance(target_modules, str) and (
        not isinstance(target_modules, Sequence) or not all(isinstance(t, str) for t in target_modules)
    ):
        raise TypeError("Invalid target_modules: expected 'all-linear' or a list of str patterns")
    selected = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or matches(name, exclude):
            continue
        if target_modules == "all-linear" or matches(name, target_modules):
            selected.append(name)
    return selected


def param_groups(
    model: nn.Module,
    rank: int,
    target_modules: str | Sequence[str] = "all-linear",
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    **low_rank_options: Any,
) -> list[dict[str, Any]]:
    """Two named groups: targeted linear weights (``rank`` + options) and the rest (``rank=None``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"Invalid model: expected an nn.Module, got {type(model).__name__}")
    targets = set(select_low_rank_modules(model, target_modules, exclude))
    if not targets:
        raise ValueError(f"Invalid target_modules: {target_modules!r} matched no nn.Linear module")
    low, full = [], []
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue  # frozen, or tied (e.g. an lm_head sharing the embedding)
            seen.add(id(param))
            full_name = f"{module_name}.{pname}" if module_name else pname
            if module_name in targets and pname == "weight":
                low.append((full_name, param))
            else:
                full.append((full_name, param))
    groups = [{"params": low, "rank": rank, **low_rank_options}]
    if full:
        groups.append({"params": full, "rank": None})
    return groups
