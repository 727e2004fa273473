"""Training-memory estimator: weights, gradients, optimizer state, projector state, activations.

    est = lrgrad.estimate_memory("llama-7b", optimizer="qgalore", rank=1024, weight_bits=8, layerwise=True)
    print(est.table())

Sources of each term:

* **weights** — ``numel x itemsize`` per float parameter; an INT8/INT4-quantized linear weight
  (``lrgrad.quantize_weights``, Q-GaLore arXiv:2407.08296) costs ``numel x bits / 8`` of codes,
  4 bytes (fp16 scale + zero) per group, two int64 rounding counters and its one-element handle.
  Exact for an ``nn.Module`` (tested against the model's storages).
* **optimizer / projector state** — exact: the estimator builds the very optimizer
  (:func:`make_optimizer`) over *meta* tensors of the right shapes and lets each param create
  its state (the rule's moments: fp32, 8-bit blockwise, factored, ...), then adds the bases the
  projector allocates at its first refresh (SVD basis fp32, packed INT4/INT8 basis + fp16
  scale/zero, DCT int32 indices + the shared DCT matrix, nothing for Flora's or APOLLO's seeded
  projection; APOLLO/Fira add one limiter scalar per projected matrix).
  ``"adamw"`` is ``torch.optim.AdamW``: two moments in the param dtype + a 4-byte step per param.
  Equals ``lrgrad.optimizer_state_bytes(opt)`` after one step (tested for every optimizer).
* **gradients** — every trainable param's gradient in its dtype; with ``layerwise=True`` (per-layer
  updates, gradients freed in their hook) only the largest single gradient.
* **activations** — tensors saved for backward by a ``transformers`` LLaMA (SDPA attention, no
  checkpointing), per token: ``L (d(8e + 8) + 4fe + 4h + 8) + d(2.25e + 4) + 4V + 20`` bytes with
  ``e`` the compute dtype's itemsize (RMSNorm upcasts to fp32, SwiGLU keeps 4 f-sized tensors,
  the loss keeps fp32 log-probabilities). Fitted to and tested against the bytes saved by
  ``LlamaForCausalLM`` (within 5%); needs ``batch_size`` and ``seq_len``.

``total`` is their sum: the peak of a training step, up to allocator slack and transient buffers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from lrgrad._checks import check_bool, check_choice, check_int
from lrgrad.experts import expert_views, is_expert_stack, state_dicts, state_tensors
from lrgrad.groups import DEFAULT_EXCLUDE, MATRIX, projected_params, route_named_params
from lrgrad.optim.presets import PRESETS, preset_of
from lrgrad.optim.registry import optimizer_class
from lrgrad.subspace import basis_shape, compute_dtype, low_rank_shape, matrix_shape

#: LLaMA shapes of the GaLore / Q-GaLore pretraining runs (arXiv:2403.03507 Table 2; vocab 32000)
LLAMA_CONFIGS: dict[str, dict[str, int]] = {
    "llama-60m": {"d": 512, "layers": 8, "heads": 8, "ffn": 1376, "vocab": 32000},
    "llama-130m": {"d": 768, "layers": 12, "heads": 12, "ffn": 2048, "vocab": 32000},
    "llama-350m": {"d": 1024, "layers": 24, "heads": 16, "ffn": 2736, "vocab": 32000},
    "llama-1b": {"d": 2048, "layers": 24, "heads": 32, "ffn": 5461, "vocab": 32000},
    "llama-7b": {"d": 4096, "layers": 32, "heads": 32, "ffn": 11008, "vocab": 32000},
}
#: GaLore's ranks for those sizes
LLAMA_RANKS = {"llama-60m": 128, "llama-130m": 256, "llama-350m": 256, "llama-1b": 512, "llama-7b": 1024}

#: ``"adamw"`` (``torch.optim.AdamW``, the baseline) and each preset's short name (``lrgrad.optim.presets``);
#: any class name or alias in ``lrgrad.OPTIMIZERS`` works too
OPTIMIZER_NAMES = ("adamw", *(row.aliases[0] for row in PRESETS if row.aliases))
#: how the optimizer is given its params: ``Opt(model.named_parameters(), rank=r)`` (embeddings, the head
#: and 1-D params full-rank) or ``Opt(model.parameters(), rank=r)`` (no names: every matrix projected)
ROUTES = ("named_parameters", "parameters")
_CONFIG_KEYS = {
    "d": ("d", "hidden_size", "dim"),
    "layers": ("layers", "num_hidden_layers", "n_layers"),
    "heads": ("heads", "num_attention_heads", "n_heads"),
    "ffn": ("ffn", "intermediate_size", "hidden_dim"),
    "vocab": ("vocab", "vocab_size"),
}


@dataclass
class MemoryEstimate:
    """Bytes of each part of a training step's memory; ``total`` is their sum."""

    weights: int
    gradients: int
    optimizer_state: int
    projector_state: int
    activations: int
    optimizer: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    #: the optimizer step's temporaries beyond its state (module docstring, "peak")
    transients: int = 0
    #: the process before any tensor: interpreter, torch, transformers (``RUNTIME_BYTES``)
    runtime: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer_state + self.projector_state + self.activations

    @property
    def peak(self) -> int:
        """The training process's peak (module docstring): runtime, weights and state, plus the larger of
        what the step holds (every gradient and the step's temporaries) and what the backward pass holds
        (the activations, and with per-layer updates one gradient and its step's temporaries too)."""
        at_step = self.gradients + self.transients
        in_backward = self.activations + (at_step if self.details.get("layerwise") else 0)
        return self.runtime + self.weights + self.optimizer_state + self.projector_state + max(at_step, in_backward)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["total"] = self.total
        out["peak"] = self.peak
        return out

    def fits(self, gib: float) -> bool:
        """True when ``total`` fits in ``gib`` GiB."""
        return self.total <= gib * 2**30

    def table(self) -> str:
        """A markdown table (GiB and MiB) after a line saying what was modelled."""
        route = self.details.get("route")
        what = f"`{self.optimizer}`, rank {self.details.get('rank')}"
        if route is not None:
            what += f", given `model.{route}()`" + (
                " (embeddings, head and 1-D params full-rank)" if route == "named_parameters"
                else " (every matrix whose smaller side exceeds the rank projected)")
        rows = [f"{what}:", "", "| part | MiB | GiB |", "|---|---:|---:|"]
        for key in ("weights", "gradients", "optimizer_state", "projector_state", "activations", "total",
                    "transients", "runtime", "peak"):
            value = getattr(self, key)
            rows.append(f"| {key.replace('_', ' ')} | {value / 2**20:,.1f} | {value / 2**30:.2f} |")
        return "\n".join(rows)


@dataclass
class _Param:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    target: bool  # a targeted linear weight: projected / quantizable
    bits: int | None = None  # already-quantized weight
    group_size: int = 256
    trainable: bool = True

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


# ---------------------------------------------------------------------- model description
def _dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _config_dict(config: Any) -> dict[str, Any]:
    if isinstance(config, str):
        key = config.lower() if config.lower().startswith("llama-") else f"llama-{config.lower()}"
        if key not in LLAMA_CONFIGS:
            raise ValueError(f"Invalid model_or_config: {config!r}; expected one of {sorted(LLAMA_CONFIGS)}")
        return dict(LLAMA_CONFIGS[key])
    source = config if isinstance(config, Mapping) else vars(config) if hasattr(config, "__dict__") else None
    if source is None:
        raise TypeError(f"Invalid model_or_config: expected an nn.Module, a config dict or object, "
                        f"got {type(config).__name__}")
    out: dict[str, Any] = {}
    for key, aliases in _CONFIG_KEYS.items():
        for alias in aliases:
            if alias in source and source[alias] is not None:
                out[key] = int(source[alias])
                break
        else:
            raise ValueError(f"Invalid model_or_config: no {key!r} (any of {aliases})")
    kv = source.get("num_key_value_heads") or source.get("kv_heads")
    out["kv_heads"] = int(kv) if kv else out["heads"]
    out["tie"] = bool(source.get("tie_word_embeddings", source.get("tie", False)))
    return out


def _params_from_config(cfg: dict[str, Any], dtype: torch.dtype) -> list[_Param]:
    d, f, v = cfg["d"], cfg["ffn"], cfg["vocab"]
    kv = cfg.get("kv_heads", cfg["heads"]) * (d // cfg["heads"])
    params = [_Param("model.embed_tokens.weight", (v, d), dtype, False)]
    for i in range(cfg["layers"]):
        prefix = f"model.layers.{i}."
        for name, shape in (("self_attn.q_proj", (d, d)), ("self_attn.k_proj", (kv, d)),
                            ("self_attn.v_proj", (kv, d)), ("self_attn.o_proj", (d, d)),
                            ("mlp.gate_proj", (f, d)), ("mlp.up_proj", (f, d)), ("mlp.down_proj", (d, f))):
            params.append(_Param(prefix + name + ".weight", shape, dtype, True))
        params += [_Param(prefix + "input_layernorm.weight", (d,), dtype, False),
                   _Param(prefix + "post_attention_layernorm.weight", (d,), dtype, False)]
    params.append(_Param("model.norm.weight", (d,), dtype, False))
    if not cfg.get("tie"):
        params.append(_Param("lm_head.weight", (v, d), dtype, False))
    return params


def _params_from_module(model: nn.Module, dtype: torch.dtype | None) -> tuple[list[_Param], int]:
    """The params (deduplicated, targeted flags as ``lrgrad.param_groups``) and bytes of buffers."""
    from lrgrad.qweights import QuantizedLinear

    kinds = projected_params(model, "all-linear", DEFAULT_EXCLUDE)
    params: list[_Param] = []
    seen: set[int] = set()
    buffer_bytes = 0
    for module_name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            name = f"{module_name}.{pname}" if module_name else pname
            target = kinds.get(name) == MATRIX  # an expert stack is projected but cannot be quantized
            bits = module.bits if isinstance(module, QuantizedLinear) and pname == "weight" else None
            group = module.group_size if bits else 256
            params.append(_Param(name, tuple(p.shape), dtype or p.dtype, target, bits, group, p.requires_grad))
        if isinstance(module, QuantizedLinear):
            continue  # its buffers are counted with its weight
        for _, b in module.named_buffers(recurse=False):
            buffer_bytes += b.numel() * b.element_size()
    return params, buffer_bytes


def quantized_weight_bytes(numel: int, bits: int, group_size: int, handle_dtype: torch.dtype,
                           groups: int | None = None) -> int:
    """Bytes of one ``QuantizedLinear`` weight: codes, fp16 scale+zero per group, rounding counters, handle."""
    codes = numel if bits == 8 else -(-numel // 2)
    groups = -(-numel // group_size) if groups is None else groups
    return codes + 4 * groups + 16 + _dtype_size(handle_dtype)


# ---------------------------------------------------------------------- optimizers
def _preset_rank(optimizer: str, rank: int | None, config_name: str | None) -> int | None:
    """The rank the estimate uses: ``rank`` if given, else the optimizer's own default (APOLLO-Mini: 1),
    else GaLore's rank for a named LLaMA config; a projected optimizer with none is an error (a matrix-only
    rule such as Muon's runs full-rank without one, as it does when built directly)."""
    if rank is not None or optimizer_class(optimizer) is torch.optim.AdamW:
        return rank
    row = preset_of(optimizer_class(optimizer))
    if row is not None and row.defaults["rank"] is not None:
        return row.defaults["rank"]
    if row is not None and row.matrix_only:
        return None
    if config_name is not None:
        return LLAMA_RANKS[config_name]
    raise ValueError(f"Invalid rank: None; optimizer {optimizer!r} has no default rank, pass rank=")


def _groups(named: Any, rank: int | None, route: str, options: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The groups the optimizer gets on ``route``: ``"named_parameters"`` routes ``(name, param)`` pairs as
    ``Opt(model.named_parameters(), rank=r)`` does (``lrgrad.groups.route_named_params``: embeddings, the head
    and 1-D params full-rank; the generator ``model.named_parameters()`` by the model's structure);
    ``"parameters"`` is ``Opt(model.parameters(), rank=r)``: one group, every large-enough matrix projected.
    ``options`` go to the projected group (``state_dtype``, which is about full-rank params, to every
    group); frozen params are left out."""
    if route == "parameters":
        return [{"params": [p for _, p in named if p.requires_grad], "rank": rank, **options}]
    routed = route_named_params(named, rank)
    groups = routed if routed and isinstance(routed[0], dict) else [{"params": list(routed)}]
    every = {k: v for k, v in options.items() if k == "state_dtype"}
    out = []
    for group in groups:
        params = [(n, p) for n, p in group["params"] if p.requires_grad]
        if params:
            out.append({**group, "params": params, **every,
                        **({} if "rank" in group else {"rank": rank, **options})})
    return out


def make_optimizer(model: nn.Module, optimizer: str, rank: int | None = None, lr: float = 1e-3,
                   route: str = "named_parameters", **options: Any) -> torch.optim.Optimizer:
    """The optimizer :func:`estimate_memory` describes for ``model``: ``optimizer`` built on ``route``
    (``"named_parameters"``: ``Opt(model.named_parameters(), rank=r)``; ``"parameters"``:
    ``Opt(model.parameters(), rank=r)``) with its own defaults, ``options`` in the projected group.
    ``"adamw"``: ``torch.optim.AdamW``."""
    check_choice("route", route, ROUTES)
    cls = optimizer_class(optimizer)
    if cls is torch.optim.AdamW:
        return cls([p for p in model.parameters() if p.requires_grad], lr=lr, **options)
    rank = _preset_rank(optimizer, rank, None)
    return cls(_groups(model.named_parameters(), rank, route, options), lr=lr)


def _rows_on_rank0(shape: tuple[int, ...], world_size: int) -> int:
    """Rows of the largest ``Shard(0)`` shard (rank 0's under ``torch.chunk``'s rule)."""
    return -(-shape[0] // world_size) if shape else 0


def _shard_fraction(shape: tuple[int, ...], world_size: int) -> float:
    return _rows_on_rank0(shape, world_size) / shape[0] if shape and shape[0] else 1.0


def _sharded_rule_bytes(opt: Any, p: torch.Tensor, group: dict[str, Any], world_size: int,
                        state: dict[str, Any]) -> int:
    """Rank 0's rule-state bytes under FSDP2: the rule's state for its local moment - right-side
    low-rank and full-rank moments are row shards, left-side ones replicated (as
    ``lrgrad.dtensor.low_rank_zeros`` lays them out); 8-bit blocks count per shard. The param's other
    non-projector tensors in ``state`` (APOLLO's limiter norm: a scalar) are replicated, counted whole."""
    rows = _rows_on_rank0(tuple(p.shape), world_size)
    if opt.is_projected(p, group):
        side = opt.projector_for(p, group).side
        shape = low_rank_shape(matrix_shape(p), group["rank"], side)
        local, rule = ((rows, shape[1]) if side == "right" else shape), opt.rule_for(group)
    else:
        local, rule = (rows, *p.shape[1:]), opt.rule_for_param(p, group)
    rule_state: dict[str, Any] = {}
    rule.init_state(rule_state, torch.empty(local, dtype=compute_dtype(p.dtype), device="meta"))
    replicated = {k: v for k, v in state.items() if k not in rule_state and not k.startswith("proj_")}
    return sum(v.numel() * v.element_size() for v in (*rule_state.values(), *replicated.values())
               if isinstance(v, torch.Tensor))


#: the process before any tensor exists: the interpreter with torch and transformers imported (VmRSS
#: measured by experiments/bench/bench_peak_memory.py on CPU, torch 2.13, glibc with its allocator
#: settings; a GPU process adds its CUDA context instead)
RUNTIME_BYTES = int(0.44 * 2**30)
#: fp32 copies of one projected matrix alive at once while its update is applied (lrgrad/optim/pipeline.py):
#: a bf16 weight is updated through its fp32 copy and the GEMM's result (2); APOLLO/Fira hold the prepared
#: gradient, its channel-scaled copy and the weight's fp32 work copy (3); an INT8 weight its dequantized
#: work copy and requantization's temporaries (5)
APPLY_COPIES = {"low_precision": 2, "full_rank": 3, "quantized": 5}
#: fp32 copies a full-rank slice needs in the unfused AdamW path (gradient, weight, denominator)
FULL_RANK_COPIES = 3


def _transients(opt: Any, p: torch.Tensor, group: dict[str, Any], spec: _Param,
                state: dict[str, Any]) -> tuple[int, int, int, int]:
    """(chunk bytes, stage bytes, apply bytes, full-rank bytes) of one param's step (module docstring)."""
    compute = compute_dtype(p.dtype)
    size = _dtype_size(compute)
    copy = p.dtype != compute  # the prepared gradient (and the update's work copy) are new tensors
    numel = p.numel()
    if opt.is_projected(p, group):
        projector = opt.projector_for(p, group)
        shape2d = matrix_shape(p)
        chunk = math.prod(low_rank_shape(shape2d, group["rank"], projector.side)) * size
        if projector.gradient_free:  # Flora's draw lives from down() to the update
            chunk += math.prod(basis_shape(shape2d, group["rank"], projector.side)) * size
        if spec.bits:
            copies = APPLY_COPIES["quantized"]
        elif group["full_rank"] is not None:
            copies = APPLY_COPIES["full_rank"] if copy else 1
        else:
            copies = APPLY_COPIES["low_precision"] if copy else 0
        return chunk, numel * size * copy, numel * size * copies, 0
    rule = opt.rule_for_param(p, group)
    state_dtype = p.dtype if group["state_dtype"] == "param" else compute
    if state_dtype == p.dtype and rule.elementwise:
        return 0, 0, 0, 0  # the fused kernel, in place
    rows = min(numel, opt.step_workspace_bytes // 4)
    if rows < numel and rule.slice_state(state, p, 0, rows) is None:
        rows = numel  # stepped whole
    return 0, 0, 0, rows * _dtype_size(state_dtype)


def _state_bytes(specs: list[_Param], optimizer: str, rank: int | None, options: dict[str, Any],
                 world_size: int = 1, model: nn.Module | None = None,
                 route: str = "named_parameters", layerwise: bool = False) -> tuple[int, int, int]:
    """(optimizer-state bytes, projector-state bytes, step transients) of rank 0: the optimizer is built
    on ``route`` (over ``model``'s own params when there is one, so its routing is the user's; else over
    meta tensors named as in the config) and each param's state is created on a meta tensor."""
    trainable = {s.name: s for s in specs if s.trainable}
    if optimizer_class(optimizer) is torch.optim.AdamW:
        # torch's single-tensor AdamW (CPU) makes sqrt(v) and its quotient: two copies of the largest param
        largest = max((s.numel * _dtype_size(s.dtype) for s in trainable.values()), default=0)
        return sum(int(2 * s.numel * _shard_fraction(s.shape, world_size)) * _dtype_size(s.dtype) + 4
                   for s in trainable.values()), 0, 2 * largest
    metas = {name: torch.empty(s.shape, dtype=s.dtype, device="meta", requires_grad=True)
             for name, s in trainable.items()}
    named = list(metas.items()) if model is None else model.named_parameters()
    opt = optimizer_class(optimizer)(_groups(named, rank, route, options), lr=1e-3)
    name_of = {id(p): n for n, p in (metas.items() if model is None else model.named_parameters())}
    state_bytes = proj_bytes = 0
    chunks, stages, applies, fulls = [0], [0], [0], [0]
    for group in opt.param_groups:
        for param in group["params"]:
            p = metas[name_of[id(param)]]
            state: dict[str, Any] = {}
            opt.init_param_state(p, group, state)
            # an expert stack (lrgrad.experts) steps as its experts: each one a separate matrix. FSDP2's
            # Shard(0) cuts the expert axis, so rank 0 holds its first experts whole, each with its whole state
            stack = is_expert_stack(p, group)
            matrices = expert_views(p) if stack else [p]
            local = _rows_on_rank0(tuple(p.shape), world_size) if stack else 1
            subs = list(state_dicts(state))[:local]
            for matrix, sub in zip(matrices[:local], subs):
                for out, value in zip((chunks, stages, applies, fulls),
                                      _transients(opt, matrix, group, trainable[name_of[id(param)]], sub)):
                    out.append(value)
            opt.state[param] = state
            for key, value in (state_tensors(state) if not stack else
                               ((k, v) for sub in subs for k, v in sub.items() if isinstance(v, torch.Tensor))):
                nbytes = value.numel() * value.element_size()
                if key.startswith("proj_"):  # projector state is replicated under FSDP2
                    proj_bytes += nbytes
                elif world_size == 1 or stack:
                    state_bytes += nbytes
            if world_size > 1 and not stack:
                state_bytes += _sharded_rule_bytes(opt, p, group, world_size, state)
            if opt.is_projected(p, group):  # what the first refresh will allocate (row states: rank 0's rows)
                proj_bytes += local * opt.projector_for(p, group).basis_bytes(
                    opt.matrix_of(p, group), compute_dtype(p.dtype), 1 if stack else world_size)
    proj_bytes += opt.shared_state_bytes()
    # one chunk of low-rank gradients (one param per-layer) while the largest update is applied, or the
    # largest prepared gradient while it is projected, or a full-rank batch of slices
    chunk = max(chunks) if layerwise else min(sum(chunks), opt.step_workspace_bytes + max(chunks))
    # full-rank slices are batched across params up to the workspace's elements (a larger whole param alone)
    # (per-layer updates step one param at a time)
    full = (max(fulls) if layerwise else max(min(sum(fulls), opt.step_workspace_bytes), max(fulls))) * FULL_RANK_COPIES
    return state_bytes, proj_bytes, max(chunk + max(applies), max(stages), full)


# ---------------------------------------------------------------------- activations
def llama_activation_bytes(cfg: dict[str, Any], batch_size: int, seq_len: int, dtype: torch.dtype) -> int:
    """Bytes saved for backward by a ``transformers`` LLaMA (SDPA, no checkpointing); see the module doc."""
    e = _dtype_size(dtype)
    d, f, h, v = cfg["d"], cfg["ffn"], cfg["heads"], cfg["vocab"]
    per_layer = d * (8 * e + 8) + 4 * f * e + 4 * h + 8
    per_token = cfg["layers"] * per_layer + d * (2.25 * e + 4) + 4 * v + 20
    return int(round(batch_size * seq_len * per_token))


def _infer_config(model: nn.Module) -> dict[str, Any] | None:
    config = getattr(model, "config", None)
    if config is not None:
        try:
            return _config_dict(config)
        except (TypeError, ValueError):
            return None
    return None


# ---------------------------------------------------------------------- entry point
def estimate_memory(
    model_or_config: nn.Module | Mapping[str, Any] | Any,
    optimizer: str = "adamw",
    rank: int | None = None,
    dtype: torch.dtype | None = None,
    layerwise: bool = False,
    weight_bits: int | None = None,
    batch_size: int | None = None,
    seq_len: int | None = None,
    weight_group_size: int = 256,
    world_size: int = 1,
    route: str = "named_parameters",
    **optimizer_options: Any,
) -> MemoryEstimate:
    """Estimate the training memory of ``model_or_config`` with ``optimizer``.

    Args:
        model_or_config: an ``nn.Module`` (its real params; quantized layers counted as such),
            a LLaMA config (``transformers.LlamaConfig``, or a dict with ``d``/``hidden_size``,
            ``layers``/``num_hidden_layers``, ``ffn``/``intermediate_size``, ``heads``/
            ``num_attention_heads``, ``vocab``/``vocab_size``), or a name in ``LLAMA_CONFIGS``
            (``"llama-7b"``, ``"7b"``, ...).
        optimizer: ``"adamw"`` (``torch.optim.AdamW``), an alias in ``OPTIMIZER_NAMES`` / ``lrgrad.ALIASES``,
            or a class name in ``lrgrad.OPTIMIZERS``.
        rank: projection rank. Default: the optimizer's own (APOLLO-Mini: 1; Muon/AuON: none, unprojected);
            for a projected optimizer without one, GaLore's rank for a named LLaMA config, else an error.
        dtype: weight dtype (default: the module's own; bf16 for configs).
        layerwise: per-layer updates: only one gradient alive at a time.
        weight_bits: 8 or 4 to count the targeted linear weights as ``lrgrad.quantize_weights``
            stores them (``weight_group_size`` elements of a row per scale/zero; a row length it does
            not divide is counted with a shorter last group).
        batch_size, seq_len: for the activation term (LLaMA models only); 0 bytes when absent.
        world_size: FSDP2 ranks: per-rank bytes of rank 0 (the largest ``Shard(0)`` shards) - weights,
            gradients, row-sharded moments (full-rank and right-side low-rank; 8-bit blocks per shard)
            divided, left-side low-rank moments and projector state (bases) replicated, full-size
            projector state (Conda's momentum, LDAdam's error buffer: ``row_state_keys``) row-sharded.
            An MoE expert stack (``lrgrad.experts``) shards by experts: rank 0 holds its first
            ``ceil(E / world_size)`` experts, each with its whole state. Activations are per rank as
            given (``batch_size`` is the per-rank batch).
        route: how the optimizer gets the params: ``"named_parameters"`` (``Opt(model.named_parameters(),
            rank=r)`` or ``lrgrad.param_groups``: embeddings, the head and 1-D params full-rank) or
            ``"parameters"`` (``Opt(model.parameters(), rank=r)``: no names, so every matrix whose smaller
            side exceeds the rank is projected, the embeddings and the head included). The estimate says
            which (``details["route"]``, :meth:`MemoryEstimate.table`).
        **optimizer_options: passed to the optimizer's projected group (e.g. ``proj_bits=8``, ``moment_min_size``).
    """
    optimizer_class(optimizer)  # raises ValueError naming the valid names
    check_int("rank", rank, 1, allow_none=True)
    check_int("batch_size", batch_size, 1, allow_none=True)
    check_int("seq_len", seq_len, 1, allow_none=True)
    check_int("weight_group_size", weight_group_size, 1)
    check_int("world_size", world_size, 1)
    check_choice("weight_bits", weight_bits, (None, 4, 8))
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"Invalid dtype: expected a floating torch.dtype, got {dtype!r}")
    check_bool("layerwise", layerwise)
    check_choice("route", route, ROUTES)
    if (batch_size is None) != (seq_len is None):
        raise ValueError("Invalid batch_size/seq_len: give both or neither")
    buffer_bytes = 0
    module = model_or_config if isinstance(model_or_config, nn.Module) else None
    config_name = None
    if module is not None:
        specs, buffer_bytes = _params_from_module(module, dtype)
        cfg = _infer_config(module)
    else:
        cfg = _config_dict(model_or_config)
        specs = _params_from_config(cfg, dtype or torch.bfloat16)
        if isinstance(model_or_config, str):
            name = model_or_config.lower()
            config_name = name if name.startswith("llama-") else f"llama-{name}"
    rank = _preset_rank(optimizer, rank, config_name)
    if weight_bits is not None:
        for s in specs:
            if s.target and s.bits is None:
                s.bits, s.group_size = weight_bits, weight_group_size
    if optimizer_class(optimizer) is torch.optim.AdamW and any(s.bits for s in specs):
        raise ValueError("Invalid optimizer: 'adamw' (torch.optim.AdamW) cannot update quantized weights; "
                         "use an lrgrad optimizer")
    weights = buffer_bytes
    for s in specs:
        if s.bits:
            # groups run along rows; a row length the group size does not divide (quantize_weights
            # refuses it) is counted with a shorter last group per row
            groups = s.shape[0] * -(-(s.numel // s.shape[0]) // s.group_size)
            nbytes = quantized_weight_bytes(s.numel, s.bits, s.group_size, s.dtype, groups)
        else:
            nbytes = s.numel * _dtype_size(s.dtype)
        weights += int(nbytes * _shard_fraction(s.shape, world_size))  # FSDP2: rows shard, buffers do not
    grads = [int(s.numel * _shard_fraction(s.shape, world_size)) * _dtype_size(s.dtype) for s in specs
             if s.trainable]
    gradients = (max(grads) if grads else 0) if layerwise else sum(grads)
    state, projector, transients = _state_bytes(specs, optimizer, rank, optimizer_options, world_size, module,
                                                route, layerwise)
    activations = 0
    if batch_size is not None:
        if cfg is None:
            raise ValueError("Invalid model_or_config: activations need a LLaMA config (a model with .config)")
        act_dtype = dtype or next((s.dtype for s in specs), torch.bfloat16)
        activations = llama_activation_bytes(cfg, batch_size, seq_len, act_dtype)
    return MemoryEstimate(
        weights=weights, gradients=gradients, optimizer_state=state, projector_state=projector,
        activations=activations, optimizer=optimizer, transients=transients, runtime=RUNTIME_BYTES,
        details={"rank": rank, "layerwise": layerwise, "weight_bits": weight_bits, "batch_size": batch_size,
                 "seq_len": seq_len, "params": sum(s.numel for s in specs), "world_size": world_size,
                 "route": route},
    )


__all__ = ["LLAMA_CONFIGS", "LLAMA_RANKS", "OPTIMIZER_NAMES", "ROUTES", "MemoryEstimate", "estimate_memory",
           "make_optimizer"]
