"""lrgrad optimizers for the Hugging Face ``Trainer``, built from ``TrainingArguments``.

Users of ``TrainingArguments(optim="galore_adamw", optim_target_modules=[...],
optim_args="rank=128, update_proj_gap=200, scale=0.25")`` (which needs galore-torch)
keep their arguments and get lrgrad's optimizer instead::

    from lrgrad.integrations.transformers import optimizer_cls_and_kwargs

    trainer = Trainer(model, args, train_dataset=data,
                      optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(model, args))

What is read from ``args``: ``optim`` (transformers' low-rank names map to the lrgrad class of
the same method: ``galore_adamw``, ``galore_adamw_8bit``, ``galore_adafactor``, ``apollo_adamw``
- each preset's ``hf_optim`` in ``lrgrad.optim.presets``; any other value names no low-rank method
and is refused unless ``optimizer=`` says which lrgrad optimizer to build), ``optim_target_modules``
(``lrgrad.param_groups``' patterns; ``None`` means ``"all-linear"``), ``optim_args`` (``"rank=...,
update_proj_gap=..., scale=..., proj_type=..."``), ``learning_rate``, ``weight_decay`` and, for the
optimizers that take Adam's ``betas`` and ``eps``, ``adam_beta1``/``adam_beta2``/``adam_epsilon``.
Keyword arguments of the functions below override all of these. ``lr``, ``betas`` and ``eps`` (in
``optim_args`` or as keywords) are the optimizer's and reach every group, as ``weight_decay`` does;
the other ``optim_args`` keys are the projected group's.

Defaults: a name that means transformers' own GaLore (or APOLLO) path gets that path's defaults
for what ``optim_args`` leaves out (``HF_DEFAULTS``: GaLore rank 128, gap 200, scale 0.25,
``proj_type="std"``; pinned against the installed transformers by a test), so the run is what
transformers computes. Every other optimizer (``optimizer="apollo_mini"``, ``"muon"``, ``"flora"``,
...) keeps its own defaults, as when built directly: APOLLO-Mini rank 1 and scale √128, Muon
unprojected, Flora gap 1000. A projected preset without a default rank needs ``rank`` (in
``optim_args`` or as a keyword).

Weight decay follows the Trainer's default optimizer: it applies to matrices
(projected ones and the embeddings/head), not to 1-D params (biases, norms).

With a galore-torch name the projected group carries galore-torch's four keys, so it refreshes
with galore-torch's exact ``torch.linalg.svd`` (``lrgrad.projectors.svd``): the run is what
transformers' galore-torch path computes. ``optim_args="..., svd=warm"`` (or ``svd="warm"`` as a
keyword) takes lrgrad's faster default.

``optimizer_cls_and_kwargs`` is the route that works with FSDP2 in the Trainer (the
Trainer builds the optimizer and Accelerate swaps its params for the sharded
DTensors); ``Trainer(optimizers=(opt, scheduler))`` is refused by the Trainer under
FSDP. DeepSpeed is refused here: ZeRO flattens the params, so nothing could be
projected (see docs/distributed.md).

This module imports ``transformers`` only inside functions that need it, and
``import lrgrad`` never imports this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lrgrad.groups import param_groups
from lrgrad.optim.lowrank import SUPPORTED_ROUTES
from lrgrad.optim.presets import PRESETS, ResolvedPreset, preset_of
from lrgrad.optim.registry import OPTIMIZERS, optimizer_class

#: transformers' ``optim`` names for a low-rank method -> the lrgrad class of the same method
HF_OPTIM_NAMES = {row.hf_optim: row.name for row in PRESETS if row.hf_optim is not None}
#: their per-step layerwise variants need hooks the Trainer does not drive
HF_LAYERWISE_NAMES = tuple(f"{name}_layerwise" for name in HF_OPTIM_NAMES)
#: the optimizer's hyperparameters among ``optim_args``' keys: they reach every group, not the projected one
OPTIMIZER_KEYS = ("lr", "betas", "eps")
#: what transformers' GaLore path (``trainer_optimizer.py``) uses when ``optim_args`` does not say
HF_LOW_RANK_DEFAULTS: dict[str, Any] = {"rank": 128, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"}
#: what transformers' APOLLO path uses (its ``proj="random"`` is APOLLOAdamW's own projector)
HF_APOLLO_DEFAULTS: dict[str, Any] = {"rank": 128, "update_proj_gap": 200, "scale": 1.0, "proj_type": "std",
                                      "scale_type": "channel"}
#: transformers' ``optim`` name -> the defaults its path fills in; nothing else gets them
HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "galore_adamw": HF_LOW_RANK_DEFAULTS,
    "galore_adamw_8bit": HF_LOW_RANK_DEFAULTS,
    "galore_adafactor": HF_LOW_RANK_DEFAULTS,
    "apollo_adamw": HF_APOLLO_DEFAULTS,
}


def parse_optim_args(text: str | None) -> dict[str, Any]:
    """``"rank=64, update_proj_gap=100, scale=0.25, proj_type=std"`` -> a dict of typed values."""
    if text is None or not text.strip():
        return {}
    if not isinstance(text, str):
        raise TypeError(f"Invalid optim_args: expected a str like 'rank=64, scale=0.25', got {type(text).__name__}")
    out: dict[str, Any] = {}
    for item in text.replace(" ", "").split(","):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"Invalid optim_args: {item!r} is not key=value (in {text!r})")
        out[key] = _parse_value(value)
    return out


def _parse_value(value: str) -> Any:
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    if value in ("True", "true", "False", "false"):
        return value.lower() == "true"
    return value


def _optim_name(args: Any) -> str:
    optim = getattr(args, "optim", None)
    return str(getattr(optim, "value", optim) or "")


def resolve_optimizer(optimizer: str | type[torch.optim.Optimizer] | None, args: Any) -> type[torch.optim.Optimizer]:
    """The lrgrad class to build: given explicitly, else the one ``args.optim`` names; an ``optim``
    that names no low-rank method (the Trainer's default ``adamw_torch``, ...) is refused."""
    if optimizer is None:
        name = _optim_name(args)
        if name in HF_LAYERWISE_NAMES:
            raise ValueError(
                f"Invalid optim: {name!r} (per-layer updates) cannot be driven by the Trainer's step; use "
                f"{name.removesuffix('_layerwise')!r} here, or lrgrad.LayerwiseOptimizer in your own loop"
            )
        if name not in HF_OPTIM_NAMES:
            raise ValueError(
                f"Invalid optim: {name!r} names no low-rank method; set TrainingArguments(optim=...) to one of "
                f"{sorted(HF_OPTIM_NAMES)}, or pass optimizer= (any name in lrgrad.ALIASES or lrgrad.OPTIMIZERS, "
                f"e.g. optimizer='apollo_mini')"
            )
        optimizer = HF_OPTIM_NAMES[name]
    if isinstance(optimizer, str):
        optimizer = HF_OPTIM_NAMES.get(optimizer, optimizer)
        cls = optimizer_class(optimizer)
        if cls is torch.optim.AdamW:
            raise ValueError("Invalid optimizer: 'adamw' is torch.optim.AdamW; the Trainer builds that without lrgrad")
        return cls
    if isinstance(optimizer, type) and optimizer in OPTIMIZERS.values():
        return optimizer
    raise TypeError(f"Invalid optimizer: expected an lrgrad optimizer class or name, got {optimizer!r}")


def _preset(cls: type[torch.optim.Optimizer]) -> ResolvedPreset:
    row = preset_of(cls)
    if row is None:
        raise TypeError(f"Invalid optimizer: {cls.__name__} is not built from a row of lrgrad.optim.presets, so its "
                        f"defaults are unknown here; add a row (CONTRIBUTING.md, 'Adding a named optimizer')")
    return row


def _takes_adam_args(row: ResolvedPreset) -> bool:
    """Whether the Trainer's ``adam_beta1/2`` and ``adam_epsilon`` mean this optimizer's ``betas``/``eps``."""
    return "betas" in row.defaults and "eps" in row.defaults


def _hf_name(optimizer: str | type[torch.optim.Optimizer] | None, args: Any) -> str | None:
    """transformers' ``optim`` name in effect: ``optimizer`` when it is one, else ``args.optim`` when
    ``optimizer`` is not given; ``None`` when an lrgrad name or class was asked for."""
    name = _optim_name(args) if optimizer is None else optimizer
    return name if isinstance(name, str) and name in HF_DEFAULTS else None


def low_rank_defaults(optimizer: str | type[torch.optim.Optimizer] | None, args: Any) -> dict[str, Any]:
    """The projected group's options where ``optim_args`` and the keywords are silent: transformers' own
    defaults (``HF_DEFAULTS``) for a name of transformers' low-rank paths, else the preset's own."""
    name = _hf_name(optimizer, args)
    if name is not None:
        return dict(HF_DEFAULTS[name])
    row = _preset(resolve_optimizer(optimizer, args))
    if row.defaults["rank"] is None and not row.matrix_only:
        raise ValueError(
            f"Invalid rank: {row.name} has no default rank (only transformers' own names {sorted(HF_DEFAULTS)} "
            f"take transformers' rank 128); pass optim_args='rank=...' or rank=..."
        )
    return {"rank": row.defaults["rank"]}


def _check_not_deepspeed(args: Any) -> None:
    if getattr(args, "deepspeed", None):
        raise ValueError(
            "Invalid args: TrainingArguments(deepspeed=...) is set. DeepSpeed ZeRO flattens every param "
            "group into one 1-D partition, so an lrgrad optimizer could not project anything (it would run "
            f"full-rank AdamW with AdamW's memory). {SUPPORTED_ROUTES}"
        )


def _check_expert_checkpoints(args: Any, groups: list[dict[str, Any]]) -> None:
    """Refuse FSDP2 checkpoints of a full state dict beside expert stacks. Each rank keeps the optimizer state of
    its own experts only (``lrgrad.experts``), and ``FULL_STATE_DICT`` (the default) writes rank 0's: torch's
    ``set_optimizer_state_dict`` then gives the other ranks' experts the state of its zero-gradient template,
    and the resumed run trains on silently wrong moments. ``SHARDED_STATE_DICT`` (DCP) saves every expert."""
    plugin = getattr(args, "fsdp_plugin_args", None) or {}
    if int(plugin.get("fsdp_version", 0) or 0) != 2 or int(getattr(args, "world_size", 1) or 1) < 2:
        return
    state_dict_type = str(plugin.get("state_dict_type", "FULL_STATE_DICT")).rsplit(".", 1)[-1].upper()
    save_strategy = str(getattr(getattr(args, "save_strategy", "no"), "value", getattr(args, "save_strategy", "no")))
    if state_dict_type != "SHARDED_STATE_DICT" and save_strategy != "no" and any(g.get("experts") for g in groups):
        raise ValueError(
            f"Invalid fsdp_config['state_dict_type']: {state_dict_type} with MoE expert stacks under FSDP2. Each "
            "rank keeps the optimizer state of the experts it holds, and a full state dict saves rank 0's only: "
            "a resume would give the other ranks' experts a fresh state without an error. Set "
            "fsdp_config={'state_dict_type': 'SHARDED_STATE_DICT', ...} (a distributed checkpoint holding every "
            "expert), or save_strategy='no'.")


def build_param_groups(
    model: nn.Module,
    args: Any,
    target_modules: str | Sequence[str] | None = None,
    *,
    optimizer: str | type[torch.optim.Optimizer] | None = None,
    **low_rank_options: Any,
) -> list[dict[str, Any]]:
    """``lrgrad.param_groups`` from ``args.optim_target_modules`` and ``args.optim_args`` (over
    :func:`low_rank_defaults` of ``optimizer``), with the full-rank group split into decayed matrices
    and undecayed 1-D params (the Trainer's rule)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"Invalid model: expected an nn.Module, got {type(model).__name__}")
    if target_modules is None:
        target_modules = getattr(args, "optim_target_modules", None) or "all-linear"
    if isinstance(target_modules, str) and target_modules.replace("_", "-") == "all-linear":
        target_modules = "all-linear"
    options = parse_optim_args(getattr(args, "optim_args", None))
    options.update(low_rank_options)
    if "rank" not in options or _hf_name(optimizer, args) is not None:
        options = {**low_rank_defaults(optimizer, args), **options}
    rank = options.pop("rank")
    weight_decay = options.pop("weight_decay", float(getattr(args, "weight_decay", 0.0)))
    # the optimizer's own hyperparameters reach every group (given as keywords, the constructor's do too)
    shared = {key: options.pop(key) for key in OPTIMIZER_KEYS if key in options}
    low, *rest = param_groups(model, rank=rank, target_modules=target_modules, **options)
    low.update(shared, weight_decay=weight_decay)
    groups = [low]
    for group in rest:  # the full-rank group: matrices decay, biases and norms do not
        if group["rank"] is not None:  # the expert stacks' group (experts=True), projected like low
            groups.append({**group, **shared, "weight_decay": weight_decay})
            continue
        matrices = [item for item in group["params"] if _tensor(item).dim() >= 2]
        vectors = [item for item in group["params"] if _tensor(item).dim() < 2]
        if matrices:
            groups.append({**group, **shared, "params": matrices, "weight_decay": weight_decay})
        if vectors:
            groups.append({**group, **shared, "params": vectors, "weight_decay": 0.0})
    return groups


def _tensor(item: Any) -> torch.Tensor:
    """A group entry is a tensor or a ``(name, tensor)`` pair (torch's named params)."""
    return item[1] if isinstance(item, tuple) else item


def optimizer_cls_and_kwargs(
    model: nn.Module,
    args: Any,
    optimizer: str | type[torch.optim.Optimizer] | None = None,
    target_modules: str | Sequence[str] | None = None,
    **options: Any,
) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """``(cls, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)``: ``kwargs["params"]`` holds the
    groups (the Trainer uses them instead of its own). ``options`` go to the projected group (``rank``,
    ``update_proj_gap``, ``scale``, ``proj_type``, ...) or, for ``lr``/``betas``/``eps``, to the optimizer."""
    _check_not_deepspeed(args)
    cls = resolve_optimizer(optimizer, args)
    kwargs: dict[str, Any] = {"lr": float(args.learning_rate)}
    if _takes_adam_args(_preset(cls)):
        kwargs.update(betas=(float(args.adam_beta1), float(args.adam_beta2)), eps=float(args.adam_epsilon))
    given = {**parse_optim_args(getattr(args, "optim_args", None)), **options}
    for key in OPTIMIZER_KEYS:  # the keyword's, else optim_args': the optimizer's, and every group's
        if key in given:
            kwargs[key] = options[key] = given[key]
    kwargs["params"] = build_param_groups(model, args, target_modules, optimizer=optimizer, **options)
    _check_expert_checkpoints(args, kwargs["params"])
    return cls, kwargs


def create_optimizer(
    model: nn.Module,
    args: Any,
    optimizer: str | type[torch.optim.Optimizer] | None = None,
    target_modules: str | Sequence[str] | None = None,
    **options: Any,
) -> torch.optim.Optimizer:
    """The lrgrad optimizer ``optimizer_cls_and_kwargs`` describes, built."""
    cls, kwargs = optimizer_cls_and_kwargs(model, args, optimizer, target_modules, **options)
    return cls(kwargs.pop("params"), **kwargs)


def create_optimizer_and_scheduler(
    model: nn.Module,
    args: Any,
    num_training_steps: int | None = None,
    optimizer: str | type[torch.optim.Optimizer] | None = None,
    target_modules: str | Sequence[str] | None = None,
    **options: Any,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """``(optimizer, scheduler)`` for ``Trainer(optimizers=...)`` (not under FSDP: use
    :func:`optimizer_cls_and_kwargs`). The scheduler is the Trainer's own
    (``args.lr_scheduler_type``, warmup, ``lr_scheduler_kwargs``) over ``num_training_steps``
    (default ``args.max_steps``)."""
    from transformers import get_scheduler

    if num_training_steps is None:
        num_training_steps = int(getattr(args, "max_steps", -1))
    if isinstance(num_training_steps, bool) or not isinstance(num_training_steps, int) or num_training_steps < 1:
        raise ValueError(
            f"Invalid num_training_steps: {num_training_steps!r}; pass it (or set TrainingArguments.max_steps)"
        )
    opt = create_optimizer(model, args, optimizer, target_modules, **options)
    scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer=opt,
        num_warmup_steps=args.get_warmup_steps(num_training_steps),
        num_training_steps=num_training_steps,
        scheduler_specific_kwargs=args.lr_scheduler_kwargs,
    )
    return opt, scheduler


__all__ = [
    "HF_DEFAULTS",
    "HF_OPTIM_NAMES",
    "build_param_groups",
    "create_optimizer",
    "create_optimizer_and_scheduler",
    "low_rank_defaults",
    "optimizer_cls_and_kwargs",
    "parse_optim_args",
    "resolve_optimizer",
]

