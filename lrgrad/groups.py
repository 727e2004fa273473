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
of the signal, and they hold most of a small model's parameters) — structurally first,
by name last:

* ``nn.Embedding`` modules are never targeted;
* a linear module is the head when it is the model's ``get_output_embeddings()`` (every
  Hugging Face ``PreTrainedModel``), or when its weight *is* an ``nn.Embedding``'s weight
  (tied);
* in a model without ``get_output_embeddings`` (torchvision, timm, a hand-written net), the
  **last linear module** of the module tree is the layer producing the logits (ResNet's
  ``fc``, ViT's ``head``, timm's ``head.fc``), unless it sits inside a repeated block (a child
  of a ``ModuleList``/``ModuleDict``/``Sequential`` holding another module of its type: a
  headless backbone's last block is not a head);
* by name: a linear whose own name (the last dotted component, or the full name) matches
  ``exclude`` (default :data:`DEFAULT_EXCLUDE`: ``lm_head``, ``output``, ``classifier``, ``head``,
  ...). A container named ``output`` (BERT's ``attention.output.dense``) is *not* a head, and a
  name matches whole components only (``classifier`` is not ``pre_classifier``).

By default only linear weights are projected (``nn.Linear``, transformers' ``Conv1D`` and
``nn.MultiheadAttention``'s ``in_proj_weight``, a linear weight held as a raw param);
convolution kernels, embeddings, norms and biases stay full-rank (GaLore's and the other papers'
choice). A convolution is projected only when ``target_modules`` names it (a list entry or a regex,
never ``"all-linear"``): its kernel ``(out, in/groups, *k)`` is projected as the matrix ``(out,
in/groups · prod(k))``, as the optimizer views every tensor of more than two dims.
``model.named_parameters()`` given to an optimizer routes the same way: the generator carries its
model, so the two routes use one decision (:func:`low_rank_param_names`). A plain list of ``(name,
tensor)`` pairs carries no model and is routed by name (:func:`route_named_params`): a 2-D parameter
is projected unless a component of its name contains ``embed`` or is ``wte``/``wpe``/``shared``
(embeddings) or its module has a head name (:data:`HEAD_NAMES`; also a top-level ``fc``, anything
under a top-level head, and the layers of a head held in an ``nn.Sequential``, named by index:
torchvision's ``classifier.1``). Tied weights appear once in ``named_parameters()`` (under the
embedding's name). A parametrized weight (``spectral_norm``, ``weight_norm``, ``orthogonal``) is
routed through the params that hold it (:func:`weight_param_names`), and recognised without running
the parametrization.

Mixture-of-Experts *expert stacks* (transformers' fused ``experts.gate_up_proj`` / ``experts.down_proj``,
``(num_experts, m, n)``: :func:`is_experts_module`, :func:`expert_stack_names`) are linear weights too:
``"all-linear"`` takes them, and they go to a group of their own with ``experts=True``, in which the optimizer
steps each expert as a separate matrix (``lrgrad.experts``). By name alone, a 3-D param under a component
``experts`` is one. :func:`projected_params` is the one decision every route asks (``param_groups``,
``model.named_parameters()``, the memory estimator).

Targets (``target_modules``) are matched as :func:`select_low_rank_modules` says: whole dotted
components, globs and full regular-expression matches; a pattern that selects nothing raises.
"""

from __future__ import annotations

import fnmatch
import inspect
import os
import re
import sys
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

#: module names treated as the output head / embeddings and kept full-rank by default; a pattern
#: matches a linear module's full name, its last dotted component, or (glob) the full name
DEFAULT_EXCLUDE = ("lm_head", "embed_tokens", "embed_in", "embed_out", "wte", "wpe", "output", "classifier",
                   "score", "qa_outputs", "head")

#: names of the module that owns an output head's weight (``lm_head.weight``, Meta LLaMA's ``output.weight``)
HEAD_NAMES = frozenset({"lm_head", "output", "embed_out", "classifier", "score", "qa_outputs", "head"})

#: name components that are embeddings even without "embed" in them (GPT-2, T5)
EMBEDDING_NAMES = frozenset({"wte", "wpe", "shared", "relative_attention_bias"})


def matches(name: str, patterns: Sequence[str]) -> bool:
    """An *exclude* pattern matches a module name exactly, as its last dotted component(s), or as a glob.

    It does not match an inner component: ``"output"`` excludes ``model.output`` but not BERT's
    ``attention.output.dense``.
    """
    for pattern in patterns:
        if name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern):
            return True
    return False


def _has_components(name: str, pattern: str) -> bool:
    """``pattern`` is a run of whole dotted components of ``name`` (``"q_proj"``, ``"layers.1"``,
    ``"mlp.up_proj"``), never part of one (``"classifier"`` is not in ``pre_classifier``)."""
    return f".{pattern}." in f".{name}."


def _regex_fullmatch(pattern: str, name: str) -> bool:
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def target_matches(name: str, pattern: str) -> bool:
    """A *list entry* of ``target_modules`` selects a module whose full name equals it, contains it
    as whole dotted components (``"self_attn"``, ``"layers.1.mlp"``), glob-matches it
    (``"*.mlp.*_proj"``) or is matched by it as a regular expression over the whole name (Hugging
    Face's ``re.fullmatch``: the regex ``layers[.]1`` never selects ``layers.10``). A bare word that is no
    component of *any* module falls back to galore-torch's substring match; that decision needs
    the whole model, so it lives in :func:`select_low_rank_modules`."""
    return _has_components(name, pattern) or fnmatch.fnmatchcase(name, pattern) or _regex_fullmatch(pattern, name)


def _is_linear(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2) is a linear layer with a transposed weight
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _is_attention_projection(module: nn.Module) -> bool:
    # nn.MultiheadAttention (torchvision's ViT, nn.TransformerEncoder) keeps its q/k/v projection as a raw
    # parameter, in_proj_weight (3d x d), not as a linear module: a linear weight all the same
    return isinstance(module, nn.MultiheadAttention)


def projected_param_names(module: nn.Module) -> tuple[str, ...]:
    """The params of a selected module that are projected, by their names in ``module``: a linear or
    convolution module's ``weight``; ``nn.MultiheadAttention``'s input projection (``in_proj_weight``, or
    ``q/k/v_proj_weight`` when the key and value widths differ; its ``out_proj`` is a linear module of its
    own). A parametrized weight is projected through the params that hold it (:func:`weight_param_names`)."""
    if _is_attention_projection(module):
        if module._parameters.get("in_proj_weight") is not None:
            return ("in_proj_weight",)
        return ("q_proj_weight", "k_proj_weight", "v_proj_weight")
    return weight_param_names(module)


def weight_param_names(module: nn.Module, attr: str = "weight") -> tuple[str, ...]:
    """The names, in ``module``, of the params that hold its ``attr`` (``"weight"``): the param itself; under
    ``torch.nn.utils.parametrize`` (``spectral_norm``, ``weight_norm``, ``orthogonal``) the
    parametrization's originals, ``parametrizations.weight.original`` (or ``original0``/``original1``:
    weight_norm's g and v); under the older ``torch.nn.utils.weight_norm``, ``weight_g`` and ``weight_v``.
    Found without reading ``module.weight``: on a parametrized module in training mode that runs the
    parametrization, and spectral_norm's power iteration would move its buffers (building an optimizer
    must not change the model). A weight_norm's g, ``(out, 1, ...)``, is never projected (no rank fits
    a side of 1)."""
    if attr in module._parameters:
        return (attr,) if module._parameters[attr] is not None else ()
    parametrizations = getattr(module, "parametrizations", None)
    if isinstance(parametrizations, nn.ModuleDict) and attr in parametrizations:
        prefix = f"parametrizations.{attr}."
        return tuple(prefix + name for name, _ in parametrizations[attr].named_parameters(recurse=False))
    return tuple(name for name in (f"{attr}_g", f"{attr}_v") if name in module._parameters)


def weight_params(module: nn.Module) -> list[torch.Tensor]:
    """The params that hold ``module``'s weight (:func:`weight_param_names`), without running a parametrization."""
    return [module.get_parameter(name) for name in weight_param_names(module)]


def is_experts_module(module: nn.Module) -> bool:
    """A module that holds Mixture-of-Experts weights as 3-D stacks ``(num_experts, m, n)`` (transformers'
    ``MixtralExperts``, ``Qwen3MoeExperts``, ``GptOssExperts``, ...): not a linear, convolution, embedding or
    attention module, with an int ``num_experts`` or a class name ending in ``Experts``, and a 3-D param."""
    if _is_linear(module) or _is_conv(module) or _is_attention_projection(module) or isinstance(module, nn.Embedding):
        return False
    declared = isinstance(getattr(module, "num_experts", None), int) or type(module).__name__.endswith("Experts")
    return declared and any(p.dim() == 3 for p in module.parameters(recurse=False))


def expert_stack_names(module: nn.Module) -> tuple[str, ...]:
    """The own params of an experts module (:func:`is_experts_module`) that are expert stacks: its 3-D params
    (whose first dim is ``num_experts`` where the module declares it). Its stacked biases ``(E, d)`` (gpt-oss)
    are vectors per expert and stay full-rank."""
    if not is_experts_module(module):
        return ()
    count = getattr(module, "num_experts", None)
    return tuple(name for name, p in module.named_parameters(recurse=False)
                 if p.dim() == 3 and (not isinstance(count, int) or p.shape[0] == count))


def _expert_stacks(model: nn.Module) -> list[tuple[str, str]]:
    """``(param name, module name)`` of every expert stack of ``model``."""
    return [(f"{name}.{pname}" if name else pname, name)
            for name, m in model.named_modules() for pname in expert_stack_names(m)]


def _is_conv(module: nn.Module) -> bool:
    # nn.Conv1d/2d/3d and the transposed ones (weights of 3+ dims, viewed as (shape[0], rest))
    return isinstance(module, nn.modules.conv._ConvNd)


def _in_repeated_block(model: nn.Module, name: str) -> bool:
    """True when a module on the path to ``name`` is one of several same-type children of a
    container (a transformer layer in a ``ModuleList``, a block of an ``nn.Sequential``)."""
    parts = name.split(".")
    parent = model
    for depth, part in enumerate(parts):
        child = parent._modules.get(part)
        if child is None:
            return False
        if isinstance(parent, (nn.ModuleList, nn.ModuleDict, nn.Sequential)) and depth < len(parts) - 1:
            if sum(type(c) is type(child) for c in parent._modules.values()) > 1:
                return True
        parent = child
    return False


def head_modules(model: nn.Module, exclude: Sequence[str] = DEFAULT_EXCLUDE) -> set[str]:
    """Names of the linear modules recognised as the output head / embeddings (see the module doc)."""
    linear = {name: m for name, m in model.named_modules() if _is_linear(m) and name}
    heads = {name for name in linear if matches(name, exclude)}
    embedding_weights = {id(w) for m in model.modules() if isinstance(m, nn.Embedding) for w in weight_params(m)}
    heads |= {name for name, m in linear.items() if any(id(w) in embedding_weights for w in weight_params(m))}
    get_output = getattr(model, "get_output_embeddings", None)
    if callable(get_output):
        try:
            out = get_output()
        except (NotImplementedError, AttributeError):
            out = None
        if isinstance(out, nn.Module):
            heads |= {name for name, m in linear.items() if m is out}
    elif linear:
        # no model API to ask: the last linear of the module tree produces the logits (ResNet's
        # fc, ViT's head, timm's head.fc, an MLP's output layer), unless it is part of a
        # repeated block (a backbone without a head)
        last = list(linear)[-1]
        if not _in_repeated_block(model, last):
            heads.add(last)
    return heads


def select_low_rank_modules(
    model: nn.Module,
    target_modules: str | Sequence[str] = "all-linear",
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
) -> list[str]:
    """Names of the modules whose weight goes to the low-rank group, and of the expert stacks
    (by their *param* name, e.g. ``model.layers.0.mlp.experts.down_proj``) that are projected per expert.

    ``target_modules``: ``"all-linear"`` (every linear module but the head, and every expert stack:
    each expert is a linear weight), a list of patterns (exact, substring, glob or full regex; see
    :func:`target_matches`) or one regular expression string (Hugging Face's ``optim_target_modules``
    convention). Patterns select linear modules, convolutions (a convolution only ever by being
    named) and expert stacks; a stack is selected by a pattern that matches its experts module's name
    (``"experts"``, ``"mlp"``) or its own param name (``"down_proj"``, ``"experts.gate_up_proj"``).
    Every pattern must select at least one module or stack, else ``ValueError`` naming it.
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
    # an expert stack is matched by its param name or its module's name; the head rule never takes one
    stacks = [(name, module) for name, module in _expert_stacks(model)
              if not (matches(module, exclude) or matches(name, exclude))]
    if patterns is None:
        return [name for name, m in model.named_modules()
                if (_is_linear(m) or _is_attention_projection(m)) and name and name not in heads] + [
                    name for name, _ in stacks]
    # named patterns may also pick convolutions (their kernels projected as (out, rest) matrices)
    linear = [name for name, m in model.named_modules()
              if (_is_linear(m) or _is_attention_projection(m) or _is_conv(m)) and name]
    every_module = [name for name, _ in model.named_modules() if name] + [name for name, _ in stacks]
    selected = []
    hits: dict[str, list[str]] = {}
    for p in patterns:
        if isinstance(target_modules, str):  # one string: a regular expression, full match (Hugging Face)
            hits[p] = [name for name in linear if name == p or _regex_fullmatch(p, name)] + [
                name for name, module in stacks if p in (name, module) or _regex_fullmatch(p, name)
                or _regex_fullmatch(p, module)]
        elif any(_has_components(name, p) or fnmatch.fnmatchcase(name, p) or _regex_fullmatch(p, name)
                 for name in every_module):
            hits[p] = [name for name in linear if target_matches(name, p)] + [
                name for name, module in stacks if target_matches(name, p) or target_matches(module, p)]
        else:  # no module has this component: galore-torch's substring ("attn" -> self_attn.q_proj)
            hits[p] = [name for name in linear if p in name] + [name for name, _ in stacks if p in name]
    for name in linear + [name for name, _ in stacks]:
        if name not in heads and any(name in hits[p] for p in patterns):
            selected.append(name)
    missing = [p for p, names in hits.items() if not any(n not in heads for n in names)]
    if missing:
        only_heads = {p: hits[p] for p in missing if hits[p]}
        detail = "".join(f"; {p!r} matched only the excluded head/embedding module(s) {names}"
                         for p, names in only_heads.items())
        raise ValueError(
            f"Invalid target_modules: pattern(s) {', '.join(repr(p) for p in missing)} matched no linear or "
            f"convolution module or expert stack to project{detail} (such modules are e.g. "
            f"{(linear + [name for name, _ in stacks])[:4]})"
        )
    return selected


def param_groups(
    model: nn.Module,
    rank: int,
    target_modules: str | Sequence[str] = "all-linear",
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    **low_rank_options: Any,
) -> list[dict[str, Any]]:
    """Named groups: the targeted weights (``rank`` + options), the targeted expert stacks (the same, with
    ``experts=True``: each expert projected as its own matrix; present only when there is one) and the rest
    (``rank=None``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"Invalid model: expected an nn.Module, got {type(model).__name__}")
    kinds = projected_params(model, target_modules, exclude)
    if not kinds:
        raise ValueError(f"Invalid target_modules: {target_modules!r} matched no linear module "
                         "(a convolution is projected only when target_modules names it)")
    low, stacks, full = [], [], []
    for full_name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        kind = kinds.get(full_name)
        (low if kind == MATRIX else stacks if kind == EXPERTS else full).append((full_name, param))
    if not low and not stacks:
        raise ValueError(f"Invalid target_modules: every weight {target_modules!r} matched has requires_grad=False "
                         "(frozen), so nothing would be projected; unfreeze them first, or build the optimizer "
                         "from the trainable params without param_groups")
    # the matrix group only when it has members: an empty group beside groups of (name, tensor) pairs is
    # refused by torch ("all optimizer param groups should be with/without names"), e.g. an MoE model whose
    # only linear besides its experts is the output head
    groups = [{"params": low, "rank": rank, **low_rank_options}] if low else []
    if stacks:
        groups.append({"params": stacks, "rank": rank, **low_rank_options, "experts": True})
    if full:
        groups.append({"params": full, "rank": None})
    return groups


#: the kinds of projected params :func:`projected_params` reports
MATRIX, EXPERTS = "matrix", "experts"


def projected_params(
    model: nn.Module,
    target_modules: str | Sequence[str] = "all-linear",
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
) -> dict[str, str]:
    """The one routing decision: every param :func:`param_groups` projects, by name, with its kind:
    :data:`MATRIX` (a targeted linear/convolution weight) or :data:`EXPERTS` (an expert stack, projected
    per expert). ``model.named_parameters()`` given to an optimizer and the memory estimator route
    through it too."""
    targets = set(select_low_rank_modules(model, target_modules, exclude))
    modules = dict(model.named_modules())
    matrices = {f"{name}.{pname}" for name in targets if name in modules
                for pname in projected_param_names(modules[name])}
    kinds = {}
    for full_name, param in model.named_parameters():
        if full_name in matrices and param.dim() >= 2 and min(param.shape[0], param.shape[1:].numel()) > 1:
            kinds[full_name] = MATRIX  # (a weight_norm's g, (out, 1), is a vector: no rank fits it)
        elif full_name in targets:
            kinds[full_name] = EXPERTS
    return kinds


# ---------------------------------------------------------------------- routing by name
def is_embedding_or_head_name(name: str) -> bool:
    """True for a parameter name that belongs to an embedding or the output head (see the module doc)."""
    parts = name.split(".")
    modules = parts[:-1] if len(parts) > 1 else parts
    if any("embed" in part or part in EMBEDDING_NAMES for part in modules):
        return True
    # a head held in an nn.Sequential names its layers by index (torchvision's MobileNet, EfficientNet,
    # VGG, ConvNeXt: classifier.1, classifier.6): the container's name is the head's
    while len(modules) > 1 and modules[-1].isdigit():
        modules = modules[:-1]
    # the head's own name (lm_head, classifier, ...), a top-level fc (torchvision), or inside a
    # top-level head (timm's head.fc)
    return bool(modules) and (modules[-1] in HEAD_NAMES or modules == ["fc"] or modules[0] == "head")


def _is_named_pair(item: Any) -> bool:
    return isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) and isinstance(
        item[1], torch.Tensor)


def model_of_named_parameters(params: Any) -> nn.Module | None:
    """The module behind an unstarted ``model.named_parameters()`` generator (its frame holds
    ``self``), else ``None``. It lets the named route decide by the model's structure, exactly
    as :func:`param_groups` does, instead of by names alone."""
    if not inspect.isgenerator(params) or params.gi_code is not nn.Module.named_parameters.__code__:
        return None
    frame = params.gi_frame
    if frame is None or inspect.getgeneratorstate(params) != inspect.GEN_CREATED:
        return None
    local = frame.f_locals
    model = local.get("self")
    if not isinstance(model, nn.Module) or local.get("prefix", "") != "" or local.get("recurse", True) is not True:
        return None
    return model


def low_rank_param_kinds(model: nn.Module, exclude: Sequence[str] = DEFAULT_EXCLUDE) -> dict[int, str]:
    """The ids of the weights ``param_groups(model, rank)`` (``"all-linear"``) projects, with their kind."""
    kinds = projected_params(model, "all-linear", exclude)
    return {id(p): kinds[name] for name, p in model.named_parameters() if name in kinds}


def is_expert_stack_name(name: str, param: torch.Tensor) -> bool:
    """By name alone: a 3-D param inside a module called ``experts`` (transformers' MoE layout)."""
    return param.dim() == 3 and "experts" in name.split(".")[:-1]


def _low_rank_kinds(pairs: list[tuple[str, torch.Tensor]], model: nn.Module | None) -> list[str | None]:
    """How each ``(name, tensor)`` pair is projected (:data:`MATRIX`, :data:`EXPERTS`, ``None``: not): by
    ``model``'s structure when the pairs came from its ``named_parameters()`` (:func:`projected_params`),
    else by name (a 2-D param, or a 3-D one under ``experts``; never an embedding's or the head's)."""
    if model is not None:
        projected = low_rank_param_kinds(model)
        return [projected.get(id(p)) for _, p in pairs]
    return [None if is_embedding_or_head_name(n) else MATRIX if p.dim() == 2
            else EXPERTS if is_expert_stack_name(n, p) else None for n, p in pairs]


def once_per_tensor(pairs: list[tuple[str, torch.Tensor]], tags: list[Any]) -> tuple[list, list[Any]]:
    """Each tensor once, under its first name: tied weights listed under every name
    (``named_parameters(remove_duplicate=False)``, the embedding as ``lm_head.weight`` too) would land
    in both groups, or twice in one, and be stepped twice. Its tag (projected and how; kept in a
    matrix-only rule's group) holds only if it is the same for every one of its names; otherwise it is
    ``False`` for a bool tag and ``None`` (not projected) for a kind."""
    first: dict[int, int] = {}
    kept: list[tuple[str, torch.Tensor]] = []
    kept_tags: list[Any] = []
    for pair, tag in zip(pairs, tags):
        index = first.get(id(pair[1]))
        if index is None:
            first[id(pair[1])] = len(kept)
            kept.append(pair)
            kept_tags.append(tag)
        elif kept_tags[index] != tag:
            kept_tags[index] = False if isinstance(tag, bool) else None
    return kept, kept_tags


def _route_named_group(group: dict[str, Any]) -> list[dict[str, Any]]:
    """A param group of ``(name, tensor)`` pairs that takes the constructor's rank (no ``rank`` key of
    its own, e.g. the decay / no-decay split of a fine-tuning script): its embeddings, head and
    convolution kernels move to a sibling group with ``rank=None`` and the group's other keys, as
    ``model.named_parameters()`` routes them. Vectors stay (they run full-rank in any group). A group
    with its own ``rank`` (``param_groups``' are) is an explicit choice and is returned as given."""
    members = group.get("params")
    if "rank" in group or isinstance(members, (torch.Tensor, set)) or not isinstance(members, Iterable):
        return [group]  # a set stays for torch's own TypeError (params must be ordered)
    model = model_of_named_parameters(members)
    members = list(members)
    if not members or not all(_is_named_pair(p) for p in members):
        return [{**group, "params": members}]
    members, kinds = once_per_tensor(members, _low_rank_kinds(members, model))
    stacks = [pair for pair, kind in zip(members, kinds) if kind == EXPERTS]
    full = [pair for pair, kind in zip(members, kinds) if kind is None and pair[1].dim() >= 2]
    keep = [pair for pair, kind in zip(members, kinds) if kind == MATRIX or (kind is None and pair[1].dim() < 2)]
    rest = {k: v for k, v in group.items() if k not in ("params", "param_names")}
    return (([{**rest, "params": keep}] if keep else []) + ([{**rest, "params": stacks, "experts": True}] if stacks
                                                             else [])
            + ([{**rest, "params": full, "rank": None}] if full else []))


def route_named_params(params: Any, rank: int | None, owner: str = "the optimizer") -> Any:
    """``model.named_parameters()`` given with a ``rank``: split into a projected group (the
    block matrices) and a full-rank group (``rank=None``: embeddings, head, norms, biases,
    convolution kernels), as :func:`param_groups` does. The generator ``model.named_parameters()``
    is routed by the model's structure (:func:`low_rank_param_ids`: the same decision as
    ``param_groups``); a list of pairs by name (:func:`is_embedding_or_head_name`, 2-D only).
    Groups (dicts) of such pairs without a ``rank`` of their own route the same way
    (:func:`_route_named_group`). Anything else is returned unchanged (a list where it was an
    iterator), so torch's own checks still apply. Pairs of which none is projected (a ResNet:
    convolutions and its classifier only) warn, naming ``owner``: the optimizer runs, at full-rank
    AdamW's memory, which is not what the rank asked for.
    """
    if isinstance(params, (torch.Tensor, dict)) or not isinstance(params, Iterable):
        return params
    model = model_of_named_parameters(params) if rank is not None else None
    params = list(params)
    if rank is not None and params and all(isinstance(g, dict) for g in params):
        return [part for group in params for part in _route_named_group(group)]
    if rank is None or not params or not all(_is_named_pair(p) for p in params):
        return params
    params, kinds = once_per_tensor(params, _low_rank_kinds(params, model))
    low = [pair for pair, kind in zip(params, kinds) if kind == MATRIX]
    stacks = [pair for pair, kind in zip(params, kinds) if kind == EXPERTS]
    full = [pair for pair, kind in zip(params, kinds) if kind is None]
    if not low and not stacks:
        warnings.warn(
            f"{owner}(..., rank={rank}): no parameter is projected, so every one is updated full-rank (AdamW's "
            "memory). Projected by default are linear weights but the output head; embeddings, norms, biases and "
            "convolution kernels stay full-rank. To project convolutions, name them: "
            "lrgrad.param_groups(model, rank, target_modules=[...])",
            UserWarning, stacklevel=caller_stacklevel(),
        )
    groups: list[dict[str, Any]] = []
    if low:
        groups.append({"params": low})
    if stacks:  # each expert of a stack projected as its own matrix (lrgrad.experts)
        groups.append({"params": stacks, "experts": True})
    if full:
        groups.append({"params": full, "rank": None})
    return groups


def refuse_module(params: Any) -> None:
    """``Opt(model)`` for ``Opt(model.parameters())``: one ``TypeError`` naming ``params`` and the routes
    that work (torch's own says "'Linear' object is not iterable", or names a submodule)."""
    if isinstance(params, nn.Module):
        raise TypeError(
            f"Invalid params: got a torch.nn.Module ({type(params).__name__}), expected its parameters: pass "
            "model.named_parameters() (embeddings and the head stay full-rank) or lrgrad.param_groups(model, rank)"
        )


def is_module_parameters(params: Any) -> bool:
    """True for the generator ``nn.Module.parameters()`` returns: a whole model's tensors, without
    names (a hand-written list of tensors is taken as a deliberate choice of what to project)."""
    return inspect.isgenerator(params) and params.gi_code is nn.Module.parameters.__code__


def caller_stacklevel() -> int:
    """``stacklevel`` for a warning raised inside lrgrad that points at the user's line: the first frame
    outside lrgrad (its kernels included) and torch (``Optimizer.step``'s wrappers sit between a user's
    ``opt.step()`` and lrgrad's own step)."""
    inside = [os.path.dirname(os.path.abspath(f)) + os.sep for f in (__file__, torch.__file__)]
    kernels = sys.modules.get("lrgrad.kernels")
    if kernels is not None and getattr(kernels, "__file__", None):
        inside.append(os.path.dirname(os.path.abspath(kernels.__file__)) + os.sep)
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(tuple(inside)):
        frame, level = frame.f_back, level + 1
    return level
