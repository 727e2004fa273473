"""Which weights run inside a projector: param groups from a model, or from parameter names.

    groups = lrgrad.param_groups(model, rank=128, target_modules="all-linear")
    opt = lrgrad.GaLoreAdamW(groups)
    opt = lrgrad.GaLoreAdamW(model.named_parameters(), rank=128)   # the same routing, by name

The low-rank group holds the weights of the targeted linear modules; the full-rank
group holds everything else (biases, norms, embeddings, the output head). Names
travel with the groups as ``param_names`` (``torch.optim``'s own named-parameter
support), so checkpoints stay readable.

How the output head and the embeddings are recognised (they stay full-rank: their
gradients are dominated by a few token rows, so a rank-r subspace of them loses most
of the signal, and they hold most of a small model's parameters):

* with a model (:func:`param_groups`): ``nn.Embedding`` modules are never targeted;
  a linear module is the head when it is the model's ``get_output_embeddings()``
  (every Hugging Face ``PreTrainedModel``), when its weight *is* an ``nn.Embedding``'s
  weight (tied), or when its own name (the last dotted component, or the full name)
  matches ``exclude`` (default :data:`DEFAULT_EXCLUDE`: ``lm_head``, ``output``, ...).
  A container named ``output`` (BERT's ``attention.output.dense``) is *not* a head.
* with names only (:func:`route_named_params`): a parameter is an embedding when a
  component of its name contains ``embed`` or is ``wte``/``wpe``/``shared``, and the
  head when the module owning it has a head name (:data:`HEAD_NAMES`). Tied weights
  appear once in ``named_parameters()`` (under the embedding's name).
"""

from __future__ import annotations

import fnmatch
import inspect
import os
import re
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

#: module names treated as the output head / embeddings and kept full-rank by default; a pattern
#: matches a linear module's full name, its last dotted component, or (glob) the full name
DEFAULT_EXCLUDE = ("lm_head", "embed_tokens", "embed_in", "embed_out", "wte", "wpe", "output", "classifier",
                   "score", "qa_outputs")

#: names of the module that owns an output head's weight (``lm_head.weight``, Meta LLaMA's ``output.weight``)
HEAD_NAMES = frozenset({"lm_head", "output", "embed_out", "classifier", "score", "qa_outputs", "head"})

#: name components that are embeddings even without "embed" in them (GPT-2, T5)
EMBEDDING_NAMES = frozenset({"wte", "wpe", "shared"})


def matches(name: str, patterns: Sequence[str]) -> bool:
    """An *exclude* pattern matches a module name exactly, as its last dotted component(s), or as a glob.

    It does not match an inner component: ``"output"`` excludes ``model.output`` but not BERT's
    ``attention.output.dense``.
    """
    for pattern in patterns:
        if name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern):
            return True
    return False


def target_matches(name: str, pattern: str) -> bool:
    """A *target* pattern selects a module the way galore-torch and Hugging Face
    (``optim_target_modules``) do: exact name, substring (``"attn"`` selects
    ``self_attn.q_proj``), or a regular expression that matches the whole name;
    shell globs (``"layers.*.mlp.*"``) work too."""
    if name == pattern or pattern in name or fnmatch.fnmatchcase(name, pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def _is_linear(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2) is a linear layer with a transposed weight
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def head_modules(model: nn.Module, exclude: Sequence[str] = DEFAULT_EXCLUDE) -> set[str]:
    """Names of the linear modules recognised as the output head / embeddings (see the module doc)."""
    linear = {name: m for name, m in model.named_modules() if _is_linear(m) and name}
    heads = {name for name in linear if matches(name, exclude)}
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    heads |= {name for name, m in linear.items() if id(getattr(m, "weight", None)) in embedding_weights}
    get_output = getattr(model, "get_output_embeddings", None)
    if callable(get_output):
        try:
            out = get_output()
        except (NotImplementedError, AttributeError):
            out = None
        if isinstance(out, nn.Module):
            heads |= {name for name, m in linear.items() if m is out}
    return heads


def select_low_rank_modules(
    model: nn.Module,
    target_modules: str | Sequence[str] = "all-linear",
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
) -> list[str]:
    """Names of the linear modules whose weight goes to the low-rank group.

    ``target_modules``: ``"all-linear"`` (every linear module but the head), a list of
    patterns (exact, substring, glob or full regex; see :func:`target_matches`) or one
    regular expression string (Hugging Face's ``optim_target_modules`` convention).
    Every pattern must select at least one module, else ``ValueError`` naming it.
    """
    if isinstance(target_modules, str):
        patterns = None if target_modules == "all-linear" else [target_modules]
    elif isinstance(target_modules, Sequence) and all(isinstance(t, str) for t in target_modules):
        patterns = list(target_modules)
        if not patterns:
            raise ValueError("Invalid target_modules: empty list; pass 'all-linear' or name patterns")
    else:
        raise TypeError("Invalid target_modules: expected 'all-linear', a regex str or a list of str patterns")
    if isinstance(exclude, str) or not all(isinstance(e, str) for e in exclude):
        raise TypeError("Invalid exclude: expected a list of str patterns")
    heads = head_modules(model, exclude)
    linear = [name for name, m in model.named_modules() if _is_linear(m) and name]
    if patterns is None:
        return [name for name in linear if name not in heads]
    selected = []
    hits: dict[str, list[str]] = {p: [] for p in patterns}
    for name in linear:
        matched = [p for p in patterns if target_matches(name, p)]
        for p in matched:
            hits[p].append(name)
        if matched and name not in heads:
            selected.append(name)
    missing = [p for p, names in hits.items() if not any(n not in heads for n in names)]
    if missing:
        only_heads = {p: hits[p] for p in missing if hits[p]}
        detail = "".join(f"; {p!r} matched only the excluded head/embedding module(s) {names}"
                         for p, names in only_heads.items())
        raise ValueError(
            f"Invalid target_modules: pattern(s) {', '.join(repr(p) for p in missing)} matched no linear module "
            f"to project{detail} (linear modules are e.g. {linear[:4]})"
        )
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
        raise ValueError(f"Invalid target_modules: {target_modules!r} matched no linear module")
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


# ---------------------------------------------------------------------- routing by name
def is_embedding_or_head_name(name: str) -> bool:
    """True for a parameter name that belongs to an embedding or the output head (see the module doc)."""
    parts = name.split(".")
    modules = parts[:-1] if len(parts) > 1 else parts
    if any("embed" in part or part in EMBEDDING_NAMES for part in modules):
        return True
    return bool(modules) and modules[-1] in HEAD_NAMES


def _is_named_pair(item: Any) -> bool:
    return isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) and isinstance(
        item[1], torch.Tensor)


def route_named_params(params: Any, rank: int | None) -> Any:
    """``model.named_parameters()`` given with a ``rank``: split into a projected group (the
    block matrices) and a full-rank group (``rank=None``: embeddings, head, norms, biases),
    as :func:`param_groups` does. Anything else is returned unchanged (a list where it was an
    iterator), so torch's own checks still apply.
    """
    if isinstance(params, (torch.Tensor, dict)) or not isinstance(params, Iterable):
        return params
    params = list(params)
    if rank is None or not params or not all(_is_named_pair(p) for p in params):
        return params
    low = [(n, p) for n, p in params if p.dim() >= 2 and not is_embedding_or_head_name(n)]
    full = [(n, p) for n, p in params if p.dim() < 2 or is_embedding_or_head_name(n)]
    groups: list[dict[str, Any]] = []
    if low:
        groups.append({"params": low})
    if full:
        groups.append({"params": full, "rank": None})
    return groups


def is_module_parameters(params: Any) -> bool:
    """True for the generator ``nn.Module.parameters()`` returns: a whole model's tensors, without
    names (a hand-written list of tensors is taken as a deliberate choice of what to project)."""
    return inspect.isgenerator(params) and params.gi_code is nn.Module.parameters.__code__


def caller_stacklevel() -> int:
    """``stacklevel`` for a warning raised inside lrgrad that points at the user's line."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    return level
