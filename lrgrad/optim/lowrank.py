"""The generic optimizer: any update rule running inside any projector.

Every named lrgrad optimizer (``GaLoreAdamW``, ``DCTAdamW``, ...) is a preset of
this class. Routing per parameter:

* a group whose ``rank`` is ``None`` runs the rule full-rank on every param;
* in a group with a ``rank``, a param with ``dim() >= 2`` whose 2-D view
  ``(shape[0], numel // shape[0])`` has ``min(m, n) > rank`` is projected;
  everything else (biases, norms, matrices too small to compress) runs full-rank;
* in a group with ``experts=True``, a 3-D param ``(E, m, n)`` is ``E`` separate ``(m, n)`` matrices
  (Mixture-of-Experts stacks, ``lrgrad.experts``), each routed as above;
* a rule with ``matrix_only = True`` (Muon, AuON) sends params with ``dim() < 2``
  to its fallback group (``rule_cls.fallback_group(group)``: AdamW with the group's
  ``adamw_*`` keys), in the same optimizer.

The update is AdamW's decoupled order, for projected params too:

    p <- p (1 - lr λ) - lr · scale · up(u),   u = rule(down(g))

Math runs in fp32 (fp64 for fp64 params); bf16/fp16 params are stored in their
dtype and rounded once per step.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from lrgrad._checks import check_bool, check_choice, check_float, check_int, check_lr, check_nonnegative
from lrgrad.dtensor import check_row_sharded, is_dtensor, low_rank_zeros
from lrgrad.experts import (
    EXPERTS_KEY,
    expert_list,
    expert_of,
    expert_views,
    is_expert_stack,
    local_experts,
    local_tensor,
    saved_experts,
    state_dicts,
    state_tensors,
)
from lrgrad.groups import caller_stacklevel, is_module_parameters, refuse_module, route_named_params
from lrgrad.optim.compile_guard import refuse_compiled_step
from lrgrad.optim.full_rank import FULL_RANK_DEFAULTS, full_rank_update_, init_full_rank_state, validate_full_rank
from lrgrad.optim.group_keys import normalize_group, plain_numbers
from lrgrad.optim.nonfinite import probe as nonfinite_probe
from lrgrad.optim.pipeline import StepPipeline, full_rank_pieces, prepare
from lrgrad.projectors import PROJECTORS, Projector
from lrgrad.projectors.sharded import ShardedProjector, unshardable_message
from lrgrad.qweights import update_targets
from lrgrad.rules import RULES, UpdateRule
from lrgrad.rules.matrix import PAIRED_LR_KEY
from lrgrad.subspace import MOMENT_POLICIES, PROJ_TYPES, compute_dtype, low_rank_shape, matrix_shape, projection_side

#: ``state_dtype``: the dtype of a full-rank param's rule state (its moments): ``"fp32"`` (the compute
#: dtype: fp32, fp64 for fp64 params) or ``"param"`` (the param's own, as ``torch.optim.AdamW`` keeps
#: bf16 moments for bf16 params); low-rank state is always in the compute dtype (docs/memory.md)
STATE_DTYPES = ("fp32", "param")

#: group keys that define the *structure* of the state; a state_dict saved with
#: other values cannot be loaded into this optimizer.
STRUCTURAL_KEYS = ("rule", "projector", "rank", "proj_type")
#: group keys that choose the algorithm without changing the state's layout (GaLore vs APOLLO/Fira,
#: channel vs tensor scaling, what a refresh does to the moments). torch.optim's load_state_dict
#: would take the saved values, silently switching e.g. GaLoreAdamW into Fira, so they must match too;
#: a state dict that lacks one (saved before the key existed) is taken to have its default.
ALGORITHM_KEYS = ("full_rank", "scale_type", "moment_policy", "limiter_input", "experts")
#: per-parameter state keys a step may add beyond what init_param_state and the first refresh create
LAZY_STATE_KEYS = frozenset({"nonfinite_skips"})

#: where low-rank training works beyond one device (docs/distributed.md has the table)
SUPPORTED_ROUTES = (
    "Use FSDP2 (torchrun + lrgrad.distributed.setup_parallel(model, 'fsdp2'), or Accelerate / the Hugging Face "
    "Trainer with fsdp_version=2) or DDP instead; see docs/distributed.md."
)
ZERO_PARTITIONED_MESSAGE = (
    "a param group with a rank holds DeepSpeed ZeRO-3 partitioned params (they carry `ds_id`): ZeRO flattens "
    "and partitions them, so no projector can see a matrix. " + SUPPORTED_ROUTES
)


def full_rank_state_dtype(param: torch.Tensor, group: dict[str, Any]) -> torch.dtype:
    """The dtype of a full-rank param's rule state and of the gradient its rule reads (``state_dtype``)."""
    return param.dtype if group["state_dtype"] == "param" else compute_dtype(param.dtype)


def refuse_zero_partitioned(group: dict[str, Any]) -> None:
    """A group with a rank may not hold DeepSpeed ZeRO-3 params (tagged ``ds_id``; they carry no data):
    checked at construction and again at the first step (params swapped in after construction)."""
    if group["rank"] is not None and any(hasattr(p, "ds_id") for p in group["params"]):
        raise ValueError(f"Invalid params: {ZERO_PARTITIONED_MESSAGE}")

BASE_DEFAULTS: dict[str, Any] = {
    "weight_decay": 1e-2,
    "rank": None,
    "update_proj_gap": 200,
    "scale": None,
    "proj_type": "std",
    "moment_policy": "keep",
    "maximize": False,
    "foreach": None,
    "skip_nonfinite": False,
    "seed": 0,
    "state_dtype": "fp32",
    "experts": False,
    **FULL_RANK_DEFAULTS,  # full_rank=None | "apollo" | "fira", scale_type, norm_growth_limit
}


#: prefixes wrappers add to parameter names (DDP / FSDP1, torch.compile, FSDP1's flat wrapper)
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.")


def _unwrapped_name(name: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix):], True
    return name


def refuse_reordered(index: int, saved: Any, current: Any) -> None:
    """Refuse a state dict whose group ``index`` holds the same named params as this optimizer's in
    another order (a model rebuilt with its modules registered in another order): loading by position
    would put each param's state on another tensor of the same shape, silently. Names that differ
    otherwise (renamed or re-wrapped models) are left to torch's positional loading."""
    if not isinstance(saved, list) or not isinstance(current, list) or len(saved) != len(current):
        return
    ours, theirs = [_unwrapped_name(n) for n in current], [_unwrapped_name(n) for n in saved]
    if ours == theirs or sorted(ours) != sorted(theirs):
        return
    j = next(k for k, (a, b) in enumerate(zip(theirs, ours)) if a != b)
    raise ValueError(
        f"Invalid state_dict: param group {index} holds the same params in another order (its param {j} is "
        f"{saved[j]!r}, this optimizer's is {current[j]!r}): loading by position would give each state to "
        f"another tensor; build the optimizer from the params in the saved order"
    )


class LowRankOptimizer(StepPipeline, Optimizer):
    r"""Run the update rule ``rule`` inside the projector ``projector``.

    Args:
        params: parameters or param groups (``torch.optim`` style).
        lr: learning rate.
        rule: update rule name (see ``lrgrad.rules.RULES``: ``"adamw"``, ``"adafactor"``, ``"lion"``, ...).
        projector: projector name (see ``lrgrad.projectors.PROJECTORS``: ``"svd"``, ...).
        rank: subspace rank; ``None`` runs every param of the group full-rank.
        update_proj_gap: refresh the subspace on steps 1, gap+1, 2·gap+1, ...
        scale: multiplier of the back-projected update (GaLore's α). ``None`` (the default):
            the projector's ``default_scale`` — sqrt(d / rank) for an orthonormal basis over a
            side of size d, 1 for Flora's Gaussian draws — so the update has AdamW's RMS and
            AdamW's lr carries over (README, "The one-liner"). A group that carries ``scale``
            (galore-torch's groups always do) uses it as given.
        proj_type: ``"std"`` (project the smaller side), ``"reverse_std"``, ``"left"``, ``"right"``.
        moment_policy: what happens to the rule's moments when the subspace changes:
            ``"keep"`` (galore-torch's behaviour), ``"project"`` (carry them into the new
            subspace), ``"reset"`` (zero them).
        weight_decay: decoupled weight decay (``torch.optim.AdamW`` order).
        maximize: maximize the objective instead of minimizing.
        foreach: use the multi-tensor path for full-rank params (``None``: yes).
        skip_nonfinite: ``True``: a param whose gradient has a NaN/Inf is skipped for that
            step (no moment or weight change) and counted in ``state["nonfinite_skips"]``,
            at the cost of one more read of every full-rank gradient and one device sync per
            step. ``False`` (the default, ``torch.optim.AdamW``'s behaviour): no check, a NaN
            reaches the weights as it would under AdamW; the projector still refuses to put
            a non-finite basis in place (``state["proj_failures"]``). Mixed-precision runs
            with ``torch.amp.GradScaler`` need no guard: the scaler skips ``step()`` itself.
        seed: base of the per-parameter seeds used by randomized projectors.
        state_dtype: the dtype of full-rank params' rule state (moments): ``"fp32"`` (the default:
            the compute dtype, fp64 for fp64 params) or ``"param"`` (the param's dtype, as
            ``torch.optim.AdamW``: bf16 moments for bf16 params, half the bytes, and AdamW's fused
            kernel on bf16 tensors). Low-rank state is always in the compute dtype (docs/memory.md).
        full_rank: ``None`` (the projected update ``up(u)``), ``"apollo"`` or ``"fira"``: a full-rank
            update scaled by statistics of the low-rank rule (see ``lrgrad.optim.full_rank``).
        scale_type: ``"channel"`` or ``"tensor"`` scaling factors for ``full_rank``.
        norm_growth_limit: Fira's norm-growth limiter γ for ``full_rank`` (``None``: off).
        experts: ``True`` marks every 3-D param of the group as a Mixture-of-Experts stack ``(E, m, n)``,
            stepped as ``E`` separate ``(m, n)`` matrices (own subspace, state, seed; an expert with an
            all-zero gradient slice is skipped for the step; ``lrgrad.experts``). ``lrgrad.param_groups``
            and ``model.named_parameters()`` set it on the group of transformers' fused experts.
        **options: rule and projector hyperparameters (e.g. ``betas``, ``eps``, ``svd``).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        *,
        rule: str = "adamw",
        projector: str = "svd",
        **options: Any,
    ):
        refuse_module(params)
        if not isinstance(rule, str) or rule not in RULES:
            raise ValueError(f"Invalid rule: {rule!r}; expected one of {sorted(RULES)}")
        if not isinstance(projector, str) or projector not in PROJECTORS:
            raise ValueError(f"Invalid projector: {projector!r}; expected one of {sorted(PROJECTORS)}")
        defaults: dict[str, Any] = {"lr": lr, "rule": rule, "projector": projector}
        defaults.update(BASE_DEFAULTS)
        defaults.update(RULES[rule].option_defaults)
        defaults.update(PROJECTORS[projector].option_defaults)
        unknown = sorted(set(options) - set(defaults))
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected keyword argument(s): {', '.join(unknown)}")
        defaults.update(options)
        plain_numbers(defaults)  # numpy scalars would make every checkpoint unloadable with weights_only
        # checked here as well as per group: routing named params may leave no group that takes the
        # constructor's rank (a model whose matrices are all embeddings, heads or convolutions), and
        # a rank of 0, -1 or 2.5 must not pass silently there either
        check_int("rank", defaults["rank"], 1, allow_none=True)
        self._param_index: dict[int, int] = {}
        self._explicit_options = frozenset(options)  # what the constructor was given, not defaulted
        if defaults["rank"] is not None and is_module_parameters(params):
            warnings.warn(
                f"{type(self).__name__}(model.parameters(), rank={defaults['rank']}) projects every matrix, the "
                "embeddings and the output head included (bare tensors carry no names); pass "
                "model.named_parameters() or lrgrad.param_groups(model, rank) to keep them full-rank",
                UserWarning, stacklevel=caller_stacklevel(),
            )
        # (name, tensor) pairs with a rank: embeddings/head/norms go to a full-rank group
        params = route_named_params(params, defaults["rank"], owner=type(self).__name__)
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        rule = param_group.get("rule") if isinstance(param_group, dict) else None
        if isinstance(rule, str) and rule in RULES and rule != self.defaults.get("rule"):
            # a per-group rule override (e.g. rule="adamw" for embeddings in a Muon optimizer)
            # takes its own option defaults, not the constructor rule's (eps, betas, ...)
            for key, value in RULES[rule].option_defaults.items():
                param_group.setdefault(key, value)
        if isinstance(param_group, dict):  # keys written for other libraries: honoured, refused or warned
            normalize_group(param_group, self.defaults, getattr(self, "_explicit_options", ()),
                            self.__dict__.setdefault("_warned_keys", set()))
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        plain_numbers(group)
        try:
            self._validate_group(group)
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise
        for p in group["params"]:
            self._param_index.setdefault(id(p), len(self._param_index))
        if RULES[group["rule"]].matrix_only:  # the lr adamw_lr goes with (MatrixRule.fallback_group)
            group.setdefault(PAIRED_LR_KEY, float(group["lr"]))

    def group_of(self, param: torch.Tensor) -> dict[str, Any]:
        """The param group that holds ``param`` now. Wrappers that step params from hooks (layerwise,
        compressed accumulation) ask here rather than keep a map: ``load_state_dict`` replaces the group
        dicts (a resume) and ``add_param_group`` adds some, and only the current dicts see the LR scheduler."""
        cache = self.__dict__.setdefault("_group_of", {})
        group = cache.get(id(param))
        if group is None or not any(g is group for g in self.param_groups):
            cache.clear()
            cache.update({id(p): g for g in self.param_groups for p in g["params"]})
            group = cache[id(param)]
        return group

    def _validate_group(self, group: dict[str, Any]) -> None:
        seen: dict[int, int] = {}
        for i, p in enumerate(group["params"]):
            # torch.optim only warns (and steps the tensor twice per step); here every step would count twice in
            # the state (moments, bias correction, refresh schedule), a silent wrong, so it is refused
            if seen.setdefault(id(p), i) != i:
                raise ValueError(f"Invalid params: the same tensor (shape {tuple(p.shape)}) is at positions "
                                 f"{seen[id(p)]} and {i} of a param group; it would be stepped twice per step. "
                                 "Pass each parameter once (model.parameters() already does, tied weights included)")
        check_lr(group["lr"])
        check_nonnegative("weight_decay", group["weight_decay"])
        if group["rule"] not in RULES:
            raise ValueError(f"Invalid rule: {group['rule']!r}; expected one of {sorted(RULES)}")
        if group["projector"] not in PROJECTORS:
            raise ValueError(f"Invalid projector: {group['projector']!r}; expected one of {sorted(PROJECTORS)}")
        check_int("rank", group["rank"], 1, allow_none=True)
        check_int("update_proj_gap", group["update_proj_gap"], 1)
        check_int("seed", group["seed"], 0)
        check_float("scale", group["scale"], allow_none=True)  # None: the projector's RMS-matched default
        if group["scale"] is not None and group["scale"] <= 0:  # a negative scale ascends the loss, 0 never moves
            raise ValueError(f"Invalid scale: {group['scale']} (must be > 0, or None for the RMS-matched default)")
        check_choice("proj_type", group["proj_type"], PROJ_TYPES)
        check_choice("moment_policy", group["moment_policy"], MOMENT_POLICIES)
        check_bool("maximize", group["maximize"])
        check_bool("skip_nonfinite", group["skip_nonfinite"])
        check_bool("foreach", group["foreach"], allow_none=True)
        check_choice("state_dtype", group["state_dtype"], STATE_DTYPES)
        check_bool("experts", group["experts"])
        RULES[group["rule"]].validate_options(group)
        PROJECTORS[group["projector"]].validate_options(group)
        validate_full_rank(group)
        for p in group["params"]:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"Invalid params: expected Tensors, got {type(p).__name__}")
            if p.is_complex():
                raise ValueError("Invalid params: complex parameters are not supported by lrgrad optimizers")
            if not p.is_floating_point():
                raise ValueError(f"Invalid params: expected floating-point parameters, got {p.dtype}")
        refuse_zero_partitioned(group)
        self.refuse_bad_stacks(group)

    def refuse_bad_stacks(self, group: dict[str, Any]) -> None:
        """In a group with ``experts=True`` (every 3-D param a stack of expert matrices, ``lrgrad.experts``):
        refuse, naming the param, one of more than 3 dims (no stack layout is defined for it) and a DTensor
        stack laid out other than FSDP2's ``Shard(0)`` (or replicated) on a 1-D mesh: ``Shard(0)`` gives each
        rank whole experts, which it steps alone (``lrgrad.experts``). Checked at construction and again at
        the first step (FSDP2 swaps params in after construction)."""
        if not group["experts"]:
            return
        names = group.get("param_names") or []
        for i, p in enumerate(group["params"]):
            name = repr(names[i]) if i < len(names) else f"{i} of the group"
            if p.dim() > 3:
                raise ValueError(
                    f"Invalid params: param {name} has shape {tuple(p.shape)} in a group with experts=True, which "
                    "steps each 3-D param (E, m, n) as E expert matrices; a param of more than 3 dims is no expert "
                    "stack: put it in a group without experts=True"
                )
            if p.dim() == 3 and is_dtensor(p):
                try:
                    check_row_sharded(p)
                except ValueError as exc:
                    raise ValueError(f"Invalid params: expert stack {name}: {exc}") from None

    # ------------------------------------------------------------------ routing
    def is_projected(self, param: torch.Tensor, group: dict[str, Any]) -> bool:
        """True when ``param`` runs inside the group's projector."""
        rank = group["rank"]
        if rank is None or param.dim() < 2 or param.numel() == 0:
            return False
        return min(self.matrix_of(param, group)) > rank

    @staticmethod
    def matrix_of(param: torch.Tensor, group: dict[str, Any]) -> tuple[int, int]:
        """The matrix a projector sees for ``param``: one expert's ``(m, n)`` for an expert stack
        (``lrgrad.experts``), else ``(shape[0], numel // shape[0])``."""
        if is_expert_stack(param, group):
            return (param.shape[1], param.shape[2])
        return matrix_shape(param)

    def state_of(self, param: torch.Tensor) -> dict[str, Any]:
        """The state dict the stages read and write for ``param``: ``self.state[param]``, or for an expert
        view (``lrgrad.experts.expert_views``) its expert's own dict in the stack's state."""
        owner = expert_of(param)
        if owner is None:
            return self.state[param]
        stack, index = owner
        return self.state[stack][EXPERTS_KEY][index]

    def projector_for(self, param: torch.Tensor, group: dict[str, Any]) -> Projector:
        shape2d = self.matrix_of(param, group)
        side = projection_side(shape2d, group["proj_type"])
        cls = PROJECTORS[group["projector"]]
        options = {k: group[k] for k in cls.option_defaults}
        projector = cls(group["rank"], group["update_proj_gap"], side, options)
        if is_dtensor(param):  # FSDP2: project each row shard, refresh from small all-reduces
            projector = ShardedProjector(projector, param)
        return projector

    def rule_for(self, group: dict[str, Any]) -> UpdateRule:
        return RULES[group["rule"]](group)

    def rule_for_param(self, param: torch.Tensor, group: dict[str, Any]) -> UpdateRule:
        """The rule that updates ``param``: a matrix-only rule hands 1-D params to its fallback."""
        cls = RULES[group["rule"]]
        if cls.matrix_only and param.dim() < 2:
            fallback = cls.fallback_group(group)
            return RULES[fallback["rule"]](fallback)
        return cls(group)

    def _param_seed(self, param: torch.Tensor, group: dict[str, Any]) -> int:
        # Depends only on the construction order of params, so every DDP rank
        # and every resumed run derives the same seed. Accelerate's FSDP2 prepare swaps
        # the group's params for DTensors after construction (same positions), so a param
        # not indexed by identity is looked up by its position in the groups.
        owner = expert_of(param)
        if owner is not None:  # an expert: the stack's seed, re-seeded by the expert's index
            stack, expert = owner
            return (self._param_seed(stack, group) * 1_000_003 + expert * 7919 + 1) % (2**31 - 1)
        index = getattr(self, "_param_index", {}).get(id(param))  # a deepcopy carries no index
        if index is None:
            flat = [p for g in self.param_groups for p in g["params"]]
            index = next((i for i, p in enumerate(flat) if p is param), 0)
        return (group["seed"] * 1_000_003 + index * 7919 + 1) % (2**31 - 1)

    def init_param_state(self, param: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        """Fill an empty per-parameter ``state`` as the first step would (the memory estimator
        calls it on meta tensors; per-layer and compressed updates before their first step)."""
        if is_expert_stack(param, group):  # one state dict per expert, each a separate matrix's
            # an FSDP2 stack: this rank's experts only, None for those other ranks hold (lrgrad.experts)
            state[EXPERTS_KEY] = [None] * param.shape[0]
            for view in expert_views(param):
                _, e = expert_of(view)
                state[EXPERTS_KEY][e] = {}
                self.init_param_state(view, group, state[EXPERTS_KEY][e])
            return
        dtype = compute_dtype(param.dtype)
        rule = self.rule_for(group)
        state["step"] = 0
        if self.is_projected(param, group):
            projector = self.projector_for(param, group)
            shape2d = matrix_shape(param)
            projector.init_state(state, shape2d, self._param_seed(param, group))
            lr_shape = low_rank_shape(shape2d, group["rank"], projector.side)
            if is_dtensor(param):  # moments shard with the weight (DTensors, so DCP can reshard them)
                like = low_rank_zeros(param, lr_shape, projector.side, dtype)
            else:
                like = torch.zeros(lr_shape, dtype=dtype, device=param.device)
            rule.init_state(state, like)
            if group["full_rank"] is not None:
                init_full_rank_state(state, dtype, param.device)
        else:
            rule = self.rule_for_param(param, group)
            rule.init_state(state, torch.zeros_like(param, dtype=full_rank_state_dtype(param, group),
                                                    memory_format=torch.preserve_format))

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one optimization step; ``closure`` re-evaluates the loss (under grad)."""
        if torch.compiler.is_compiling():  # torch.compile(opt.step): one clear error (compile_guard.py)
            refuse_compiled_step(type(self).__name__)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # refuse before the first write, so a refused step changes nothing (a later group's sparse
        # gradient must not leave the earlier groups stepped)
        self.check_materialized()
        for index, group in enumerate(self.param_groups):
            grads = [p.grad for p in group["params"] if p.grad is not None]
            for g in grads:
                self.check_grad(g)
            for p in group["params"]:
                if p.grad is not None:
                    self.check_layout(p, group)
            if grads:
                self.check_structure(index, group)
                self.check_projectable(group)
        template = self.is_load_template_step()
        self.__dict__.pop("_template_experts", None)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            self.step_params(group, params, [p.grad for p in params])
        if template:
            self.__dict__["_template_experts"] = self.expert_state_tensors()
        return loss

    def is_load_template_step(self) -> bool:
        """Whether this step is torch's ``_init_optim_state``: the first step, every lr 0 and every gradient zero.
        torch's ``set_optimizer_state_dict`` loads into the state it makes; a held expert whose state the load
        leaves untouched had none in the checkpoint (:meth:`refuse_template_experts`)."""
        if self.state or any(float(group.get("lr", 0.0)) != 0.0 for group in self.param_groups):
            return False
        grads = [local_tensor(p.grad) for group in self.param_groups for p in group["params"] if p.grad is not None]
        return bool(grads) and all(not g.any() for g in grads)

    def expert_state_tensors(self) -> dict[int, tuple[torch.Tensor, int]]:
        """``{id: (tensor, version)}`` of every tensor in the state of the experts this process holds."""
        out = {}
        for group in self.param_groups:
            for p in group["params"]:
                if is_expert_stack(p, group) and p in self.state:
                    for _, value in state_tensors(self.state[p]):
                        out[id(value)] = (value, value._version)
        return out

    @staticmethod
    def nonfinite_flags(tensors: list[torch.Tensor]) -> list[bool]:
        """Which tensors hold a NaN/Inf, with one device sync per device.

        ``isfinite(sum(t))`` is one fast reduction instead of a bool tensor the
        size of ``t``: a NaN or ±Inf anywhere makes the sum non-finite (a finite
        sum overflowing float range also counts as non-finite, which is as well).
        The sum is :func:`lrgrad.optim.nonfinite.probe` (a GEMV on large CPU tensors).
        """
        flags = [False] * len(tensors)
        by_device: dict[torch.device, list[int]] = {}
        for i, t in enumerate(tensors):
            if t.numel():
                by_device.setdefault(t.device, []).append(i)
        for indices in by_device.values():
            sums = [nonfinite_probe(tensors[i]) for i in indices]
            # a sharded (DTensor) sum is all-reduced, so every rank takes the same branch
            sums = [t.full_tensor() if is_dtensor(t) else t for t in sums]
            finite = torch.stack([t.isfinite() for t in sums]).tolist()
            for i, ok in zip(indices, finite):
                flags[i] = not ok
        return flags

    def check_grad(self, grad: torch.Tensor) -> None:
        """Refuse gradients no lrgrad optimizer can use (sparse) with a ``ValueError``."""
        if grad.is_sparse:
            raise ValueError("Invalid grad: lrgrad optimizers do not support sparse gradients")

    def mark_stepped(self) -> None:
        """Tell LR schedulers the optimizer stepped, as ``Optimizer.step``'s wrapper does, when the
        update ran parameter by parameter (per-layer updates) instead of through :meth:`step`."""
        self._opt_called = True  # type: ignore[attr-defined]

    def check_shardable(self, group: dict[str, Any]) -> None:
        """Refuse FSDP2 (DTensor) params in a group whose projector declares ``supports_sharding = False``
        with a ``ValueError`` (the step and per-layer updates call it before they write anything)."""
        if group["rank"] is None:
            return
        cls = PROJECTORS[group["projector"]]
        if not cls.supports_sharding and any(is_dtensor(p) and self.is_projected(p, group) for p in group["params"]):
            raise ValueError(unshardable_message(cls))

    def check_projectable(self, group: dict[str, Any]) -> None:
        """Once per group with a ``rank``: make sure it does not silently run full-rank.

        A projector that declares ``supports_sharding = False`` on FSDP2 (DTensor) params raises a
        ``ValueError``. DeepSpeed ZeRO (stages 1-3) replaces a group's params by one flattened 1-D
        partition after the optimizer is built, so no projector ever sees a matrix and
        the "GaLore" run is plain AdamW with AdamW's memory. Params swapped for 1-D
        tensors after construction (DeepSpeed's signature) raise a ``ValueError``; a
        group in which nothing can be projected (all 1-D or all ``min(m, n) <= rank``)
        warns once, unless it holds only vectors while another group projects matrices
        (a no-decay group of biases and norms, not flattened params).
        """
        self.refuse_bad_stacks(group)
        checked = self.__dict__.setdefault("_projectable_checked", set())
        if group["rank"] is None or id(group) in checked:
            return
        self.check_shardable(group)
        checked.add(id(group))
        refuse_zero_partitioned(group)
        params = [p for p in group["params"] if p.numel()]  # empty params are a no-op, not a fallback
        if not params or any(self.is_projected(p, group) for p in params):
            return
        built_on = getattr(self, "_param_index", None)  # None after a deepcopy: cannot tell
        if built_on is not None and all(p.dim() == 1 and id(p) not in built_on for p in params):
            raise ValueError(
                "Invalid params: a param group with rank="
                f"{group['rank']} now holds flattened 1-D tensors that replaced its params after the "
                f"optimizer was built, which is what DeepSpeed ZeRO stages 1-3 do. {SUPPORTED_ROUTES}"
            )
        if all(p.dim() < 2 for p in params) and self._another_group_projects(group):
            return  # biases and norms in a no-decay group beside projected matrices: the usual split
        warnings.warn(
            f"lrgrad: no param of a group with rank={group['rank']} can be projected (all are 1-D or have "
            f"min(m, n) <= rank), so the group runs its rule full-rank with full-rank memory. If the params "
            f"arrived flattened (DeepSpeed ZeRO, FSDP1 without use_orig_params), this is not low-rank training. "
            f"{SUPPORTED_ROUTES}",
            UserWarning,
            stacklevel=caller_stacklevel(),
        )

    def check_structure(self, index: int, group: dict[str, Any]) -> None:
        """Refuse a group whose ``STRUCTURAL_KEYS`` (rank, proj_type, projector, rule) changed by hand
        after its params' state was created, with one ``ValueError`` naming the key: that state's shapes
        and subspace belong to the old value (``load_state_dict`` refuses the same mismatch). Left alone,
        the step fails deep in a projector, or a rule silently reads moments of the old rank."""
        now = {key: group[key] for key in STRUCTURAL_KEYS}
        seen = self.__dict__.setdefault("_group_structure", {})
        before = seen.get(index)
        if before is not None and before != now and any(self.state.get(p) for p in group["params"]):
            key = next(k for k in STRUCTURAL_KEYS if before[k] != now[k])
            raise ValueError(
                f"Invalid param group {index}: {key} changed from {before[key]!r} to {now[key]!r} after its "
                f"state was created (the state belongs to {key}={before[key]!r}); build a new optimizer, "
                "or add a new param group, for other params"
            )
        seen[index] = now

    def check_materialized(self) -> None:
        """Until a step finds none: refuse, with one ``ValueError`` naming the param, a param on the meta
        device. An optimizer built over a meta-device model (``with torch.device("meta")``) before
        ``model.to_empty()`` holds the old meta tensors (``to_empty`` swaps in new ones), which never get
        a gradient: every step would silently do nothing (as ``torch.optim.AdamW``'s does)."""
        if self.__dict__.get("_materialized"):
            return
        for group in self.param_groups:
            names = group.get("param_names")
            for position, p in enumerate(group["params"]):
                if p.is_meta:
                    name = names[position] if isinstance(names, list) and position < len(names) else None
                    raise ValueError(
                        f"Invalid params: {f'param {name!r}' if name else 'a param'} is on the meta device at step(): "
                        "the model was materialized (to_empty, load_state_dict(assign=True)) after this optimizer was "
                        "built, which still holds the meta tensors, so no step would change the model. Build the "
                        "optimizer after materializing the model"
                    )
        self.__dict__["_materialized"] = True

    def state_layout(self, param: torch.Tensor, group: dict[str, Any]) -> tuple[Any, ...]:
        """What ``param``'s state was built for: its shape and the dtypes its state tensors take
        (the compute dtype; a full-rank param's ``state_dtype``). bf16 <-> fp32 <-> fp16 keeps both."""
        state_dtype = compute_dtype(param.dtype) if self.is_projected(param, group) else full_rank_state_dtype(
            param, group)
        return tuple(param.shape), compute_dtype(param.dtype), state_dtype

    def check_layout(self, param: torch.Tensor, group: dict[str, Any]) -> None:
        """Refuse, with one ``ValueError`` naming the param, a param whose shape or compute dtype changed
        after its state was created (``p.data = torch.randn(other shape)``, ``model.double()`` after a
        step): the moments and bases belong to the old tensor, and the step would fail deep in a matmul
        (as ``torch.optim.AdamW``'s does) or, for a same-numel reshape, pair entries with other entries."""
        owner = expert_of(param)
        if owner is not None:  # an expert view (made anew each step): its stack owns the state and the layout
            param = owner[0]
        layouts = self.__dict__.setdefault("_state_layouts", {})
        seen = (param.shape, param.dtype)
        entry = layouts.get(id(param))
        if entry is not None and entry[0] == seen:  # the steady state: one lookup, two compares
            return
        now = self.state_layout(param, group)
        before = entry[1] if entry is not None else None
        if before is None or before == now or not self.state.get(param):
            layouts[id(param)] = (seen, now)
            return
        index = self.__dict__.get("_param_index", {}).get(id(param))
        names = group.get("param_names")
        position = next(i for i, p in enumerate(group["params"]) if p is param)  # not list.index: tensor ==
        name = names[position] if isinstance(names, list) and position < len(names) else None
        where = f"param {index}" + (f" ({name!r})" if name else "") if index is not None else "a param"

        def show(layout: tuple[Any, ...]) -> str:
            return f"shape {layout[0]} with {str(layout[2]).removeprefix('torch.')} state"

        raise ValueError(
            f"Invalid params: {where} changed from {show(before)} to {show(now)} after its optimizer state "
            "was created (p.data replaced by another tensor, or a cast such as model.double() that changes the "
            "dtype its state is kept in): the state belongs to the old tensor. Build the optimizer after "
            "changing the model, or load a state_dict saved for the new params"
        )

    def _another_group_projects(self, group: dict[str, Any]) -> bool:
        """Whether a group other than ``group`` projects a param (flattened params leave none that does)."""
        return any(other is not group and other["rank"] is not None and any(self.is_projected(p, other)
                                                                             for p in other["params"])
                   for other in self.param_groups)

    def count_skip(self, param: torch.Tensor) -> None:
        """Record that ``param`` skipped this step (a non-finite gradient)."""
        state = self.state_of(param)
        state["nonfinite_skips"] = state.get("nonfinite_skips", 0) + 1

    def snapshot_state(self, param: torch.Tensor) -> dict[str, Any]:
        """A shallow copy of ``param``'s state that :meth:`restore_state` can put back.

        Shallow is enough: refreshes and moment transfers assign new tensors (the projector and
        rule contracts), and the rule's in-place moment update runs only after a step is accepted.
        """
        return dict(self.state_of(param))

    def restore_state(self, param: torch.Tensor, snapshot: dict[str, Any]) -> None:
        """Undo everything :meth:`project_grad` did to ``param``'s state (refresh, counters)."""
        state = self.state_of(param)
        state.clear()
        state.update(snapshot)

    def prepare_grad(
        self, param: torch.Tensor, group: dict[str, Any], grad: torch.Tensor, nonfinite: bool = False
    ) -> torch.Tensor | None:
        """Create state if needed and return ``grad`` in the compute dtype with ``maximize``
        applied (a new tensor whenever it differs; ``.grad`` is never written). ``None``
        when the step must be skipped because the gradient is not finite."""
        state = self.state_of(param)
        if not state:
            self.init_param_state(param, group, state)
        if nonfinite:
            self.count_skip(param)
            return None
        return prepare(grad, compute_dtype(param.dtype), group["maximize"])

    def apply_full_rank(
        self, group: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor],
        rule: UpdateRule | None = None,
    ) -> None:
        """Run the rule full-rank on raw gradients (foreach where the rule has it), prepared batch by
        batch: a rule that can slice its state steps flat slices of at most ``step_workspace_bytes / 4`` elements
        (``lrgrad.optim.pipeline``), so no whole-tensor fp32 copy of a bf16 param exists."""
        if not params:
            return
        rule = rule or self.rule_for(group)
        if rule.matrix_only and any(p.dim() < 2 for p in params):
            vectors = [i for i, p in enumerate(params) if p.dim() < 2]
            fallback = type(rule).fallback_group(group)
            self.apply_full_rank(fallback, [params[i] for i in vectors], [grads[i] for i in vectors])
            params, grads = [p for p in params if p.dim() >= 2], [g for p, g in zip(params, grads) if p.dim() >= 2]
            if not params:
                return
        states = [self.state_of(p) for p in params]
        for state in states:
            state["step"] += 1
        if any(p.numel() == 0 for p in params):  # an empty param is a no-op (as in torch.optim), not an error
            keep = [i for i, p in enumerate(params) if p.numel()]
            params, grads, states = [params[i] for i in keep], [grads[i] for i in keep], [states[i] for i in keep]
            if not params:
                return
        max_elements = max(1, self.step_workspace_bytes // 4)
        for ps, gs, ss in full_rank_pieces(params, grads, states, max_elements, rule):
            gs = [prepare(g, full_rank_state_dtype(p, group), group["maximize"]) for p, g in zip(ps, gs)]
            with update_targets(ps) as targets:  # quantized weights: fp32 work copies, requantized after
                rule.apply_full_rank(targets, gs, ss, [s["step"] for s in ss], lr=float(group["lr"]),
                                     weight_decay=group["weight_decay"])

    def project_grad(
        self, param: torch.Tensor, group: dict[str, Any], grad: torch.Tensor, projector: Projector | None = None,
    ) -> torch.Tensor | None:
        """Refresh the subspace if due, then return the low-rank gradient (None: skip this step).

        The projector sees the step's gradient through its hooks in this order, once each:
        ``corrected_grad`` (the matrix the step works on, e.g. LDAdam's ``G + e``), the refresh,
        ``down``, then ``advance`` (its full-size state moved forward: Conda's momentum, LDAdam's
        error buffer). Under FSDP2 the wrapper hands each hook this rank's rows.

        Split from :meth:`apply_low_rank` so per-layer updates can project inside
        a backward hook and apply the rule later (exact global-norm clipping).
        """
        if projector is None:
            projector = self.projector_for(param, group)
        state = self.state_of(param)
        grad2d = projector.corrected_grad(state, grad.reshape(matrix_shape(param)))
        if not self.advance_subspace(param, group, grad2d, projector):
            return None
        low = projector.down(state, grad2d)
        projector.advance(state, grad2d, low)
        return low

    def advance_subspace(
        self, param: torch.Tensor, group: dict[str, Any], grad2d: torch.Tensor | None,
        projector: Projector | None = None,
    ) -> bool:
        """Refresh the subspace if due (carrying the moments) and count the step.

        Returns False when the step must be skipped (the first refresh failed).
        ``grad2d`` may be ``None`` for projectors whose subspace does not depend on
        the gradient (``gradient_free``, e.g. Flora's random projector): compressed
        accumulation projects before the summed gradient exists.
        """
        state = self.state_of(param)
        if projector is None:
            projector = self.projector_for(param, group)
        step = state["step"] + 1
        if projector.should_refresh(state, step):
            had_basis = not projector.lacks_subspace(state)  # a provisional basis has no moments worth carrying
            before = dict(state)  # projectors assign new tensors, so this keeps the old subspace
            changed = projector.refresh(state, grad2d, step, group)
            if changed and had_basis and group["moment_policy"] != "keep":
                rule = self.rule_for(group)
                if group["moment_policy"] == "reset":
                    rule.reset_state(state)
                else:
                    projector.carry_moments(rule, state, before)
        if not projector.has_basis(state):
            # The very first refresh failed (non-finite gradient or SVD failure).
            state["nonfinite_skips"] = state.get("nonfinite_skips", 0) + 1
            return False
        state["step"] = step
        return True

    def needs_full_grad(self, param: torch.Tensor, group: dict[str, Any]) -> bool:
        """True when the update of projected ``param`` reads the full gradient, not only its
        low-rank projection (``full_rank="apollo"``/``"fira"``): per-layer and compressed
        updates must then keep ``G`` until :meth:`apply_low_rank`."""
        return group["full_rank"] is not None and self.is_projected(param, group)

    def apply_low_rank(
        self, param: torch.Tensor, group: dict[str, Any], low: torch.Tensor, rule: UpdateRule | None = None,
        grad: torch.Tensor | None = None, update: torch.Tensor | None = None, projector: Projector | None = None,
    ) -> None:
        """Run the rule on the low-rank gradient and apply the back-projected update
        (with ``full_rank``, the full-rank update built from ``grad``, the prepared gradient).
        ``update``: the rule's direction when it already ran (``rule.update_many`` over a group)."""
        state = self.state_of(param)
        rule = rule or self.rule_for(group)
        if projector is None:
            projector = self.projector_for(param, group)
        if group["full_rank"] is not None and grad is None:
            raise ValueError(f"Invalid grad: full_rank={group['full_rank']!r} needs the full gradient")
        if update is None:  # the same arithmetic as a whole group's step (per-layer, accumulation)
            (update,) = rule.update_many([state], [low], [state["step"]])
        lr = float(group["lr"])
        scale = group["scale"]
        if scale is None:
            scale = projector.default_scale(matrix_shape(param))
        alpha = -lr * scale
        decay = 1 - lr * group["weight_decay"]
        with update_targets([param], contiguous=True) as (target,):
            target2d = target.view(matrix_shape(param))
            if group["full_rank"] is not None:
                full_rank_update_(projector, state, target2d, grad.reshape(matrix_shape(param)), low, update,
                                  group, lr, decay, scale)
            else:
                projector.update_param_(state, target2d, update, alpha, decay)

    def shared_state_bytes(self) -> int:
        """Bytes of buffers projectors share between params instead of keeping per param
        (e.g. one DCT basis per projected size); ``lrgrad.optimizer_state_bytes`` adds them.

        Each shared buffer is counted once (projectors report ``{key: bytes}`` through an
        ``shared_buffers(state)``, empty by default)."""
        shared: dict[Any, int] = {}
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state and self.is_projected(p, group):
                    projector = self.projector_for(p, group)
                    for sub in state_dicts(state):
                        shared.update(projector.shared_buffers(sub))
        return sum(shared.values())

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """torch's state dict, with each expert stack's experts keyed by their global index (as strings), those
        this process holds only (``lrgrad.experts.saved_experts``): the same keys in every world size, so that
        torch's distributed checkpoint saves and reshards them."""
        state_dict = super().state_dict()
        index = 0  # torch numbers the params in group order
        for group in self.param_groups:
            for p in group["params"]:
                pstate = state_dict["state"].get(index)
                if pstate is not None and is_expert_stack(p, group) and isinstance(pstate.get(EXPERTS_KEY), list):
                    start, matrices = local_experts(p)[0], local_tensor(p)
                    experts = [None if sub is None else self._with_refresh_placeholders(sub, matrices[e - start], group)
                               for e, sub in enumerate(pstate[EXPERTS_KEY])]
                    state_dict["state"][index] = {**pstate, EXPERTS_KEY: saved_experts(experts)}
                index += 1
        return state_dict

    def _refresh_keys(self, matrix: torch.Tensor, group: dict[str, Any]) -> tuple[dict[str, Any], tuple[str, ...]]:
        """The keys a projected ``matrix``'s first refresh adds: ``({tensor key: (shape, dtype)}, plain keys)``."""
        projector = self.projector_for(torch.empty_like(matrix, device="meta"), group)
        return (projector.refresh_state_spec(matrix_shape(matrix), compute_dtype(matrix.dtype)),
                projector.refresh_plain_keys)

    def _with_refresh_placeholders(self, sub: dict[str, Any], matrix: torch.Tensor,
                                   group: dict[str, Any]) -> dict[str, Any]:
        """An expert's state as saved: one that has never refreshed (no token yet) with zeros for the keys its
        first refresh adds. Why: torch's distributed checkpoint loads into a template made by a
        zero-gradient step, which refreshes every expert, and refuses a template key the checkpoint lacks; with the
        placeholders the keys agree. ``proj_refreshes == 0`` says they are no subspace: a load drops them
        (:meth:`_without_refresh_placeholders`)."""
        if sub.get("proj_refreshes") != 0:
            return sub
        spec, plain = self._refresh_keys(matrix, group)
        fill = {key: torch.zeros(shape, dtype=dtype, device=matrix.device) for key, (shape, dtype) in spec.items()}
        fill.update((key, 0) for key in plain)  # an int: torch's flatten_optimizer_state_dict refuses None
        return {**sub, **{key: value for key, value in fill.items() if key not in sub}}

    def _without_refresh_placeholders(self, sub: dict[str, Any] | None, matrix: torch.Tensor,
                                      group: dict[str, Any]) -> dict[str, Any] | None:
        """A loaded expert's state without the placeholders of :meth:`_with_refresh_placeholders`."""
        if sub is None or sub.get("proj_refreshes") != 0:
            return sub
        spec, plain = self._refresh_keys(matrix, group)
        return {key: value for key, value in sub.items() if key not in spec and key not in plain}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict saved by the same optimizer configuration, exactly.

        Raises ``ValueError`` when the state dict comes from another optimizer or
        another rank/rule/projector. Unlike ``torch.optim``, state tensors keep
        their saved dtype (fp32 moments of bf16 params stay fp32, int32 indices
        stay int32), so training resumes bit-identically.
        """
        if not isinstance(state_dict, dict) or "param_groups" not in state_dict or "state" not in state_dict:
            raise ValueError("Invalid state_dict: expected a dict with 'state' and 'param_groups'")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"Invalid state_dict: it has {len(saved_groups)} param groups, this optimizer has "
                f"{len(self.param_groups)}"
            )
        index_to_param: dict[int, tuple[torch.Tensor, dict[str, Any]]] = {}
        for i, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            for key in STRUCTURAL_KEYS:
                if key not in saved:
                    raise ValueError(
                        f"Invalid state_dict: param group {i} has no {key!r}; it was not saved by an "
                        f"lrgrad optimizer"
                    )
                if saved[key] != group[key]:
                    raise ValueError(
                        f"Invalid state_dict: param group {i} was saved with {key}={saved[key]!r}, "
                        f"this optimizer has {key}={group[key]!r}"
                    )
            for key in ALGORITHM_KEYS:
                saved_value = saved.get(key, BASE_DEFAULTS.get(key))
                if key in group and saved_value != group[key]:
                    raise ValueError(
                        f"Invalid state_dict: param group {i} was saved with {key}={saved_value!r}, this "
                        f"optimizer has {key}={group[key]!r} (another optimizer: loading it would switch the "
                        f"algorithm)"
                    )
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"Invalid state_dict: param group {i} has a different number of params")
            refuse_reordered(i, saved.get("param_names"), group.get("param_names"))
            for index, p in zip(saved["params"], group["params"]):
                index_to_param[index] = (p, group)
        saved_state = state_dict["state"]
        for index, pstate in saved_state.items():
            if index not in index_to_param:
                raise ValueError(f"Invalid state_dict: state for unknown param index {index}")
            p, group = index_to_param[index]
            self._check_param_state(index, p, group, pstate)
        self.refuse_template_experts(saved_state, index_to_param)
        # an expert stack's experts in their in-memory form, one slot per global expert (checked above)
        saved_state = {index: self._stack_state_in_memory(*index_to_param[index], pstate)
                       if is_expert_stack(*index_to_param[index]) else pstate for index, pstate in saved_state.items()}
        current_groups = [dict(group) for group in self.param_groups]
        super().load_state_dict({**state_dict, "state": saved_state})
        # torch takes the saved groups as they are; a checkpoint written before a group key existed
        # (e.g. ``experts``) lacks it, and the next step would raise KeyError. The key's value is the one
        # this optimizer was built with (for ALGORITHM_KEYS, checked above to equal the saved default).
        for group, current in zip(self.param_groups, current_groups):
            for key, value in current.items():
                group.setdefault(key, value)
        self.__dict__.pop("_group_structure", None)  # the loaded state matches the groups' keys (checked above)
        # ... and the current params' shapes and dtypes (checked above): the layout the next step compares to
        self.__dict__["_state_layouts"] = {id(p): ((p.shape, p.dtype), self.state_layout(p, group))
                                           for p, group in index_to_param.values()}
        # torch casts floating state to the param dtype; put back the exact saved tensors.
        for index, pstate in saved_state.items():
            p, _ = index_to_param[index]
            for target, saved in zip(state_dicts(self.state[p]), state_dicts(pstate)):  # an expert stack's each
                for key, value in saved.items():
                    if isinstance(value, torch.Tensor):
                        target[key] = value.to(device=p.device, copy=True)

    def refuse_template_experts(self, saved_state: dict[int, Any],
                                index_to_param: dict[int, tuple[torch.Tensor, dict[str, Any]]]) -> None:
        """Refuse a held expert whose every state tensor is, untouched, one torch's load template step made
        (:meth:`is_load_template_step`): the checkpoint had no state for it. A distributed checkpoint writes into
        those tensors (their version moves); a full state dict (``full_state_dict=True``, Accelerate's and the
        Trainer's ``FULL_STATE_DICT``) holds rank 0's experts only, and torch leaves the others' template."""
        template = self.__dict__.pop("_template_experts", None)
        if not template:
            return
        for index, pstate in saved_state.items():
            p, group = index_to_param[index]
            if not is_expert_stack(p, group):
                continue
            for e, sub in enumerate(expert_list(p, pstate[EXPERTS_KEY], f"param {index}")):
                tensors = [v for v in (sub or {}).values() if isinstance(v, torch.Tensor)]
                if tensors and all(template.get(id(t), (None,))[0] is t and t._version == template[id(t)][1]
                                   for t in tensors):
                    raise ValueError(
                        f"Invalid state_dict: it holds no state for expert {e} of param {index}, which this process "
                        "holds: its state is the zero-gradient template torch's set_optimizer_state_dict loads into. "
                        "Under FSDP2 each rank keeps its own experts' state, and a full state dict "
                        "(full_state_dict=True; Accelerate's and the Trainer's FULL_STATE_DICT) saves rank 0's only: "
                        "save a distributed checkpoint (SHARDED_STATE_DICT, dcp.save, "
                        "lrgrad.distributed.save_checkpoint)")

    def _stack_state_in_memory(self, stack: torch.Tensor, group: dict[str, Any], saved: dict[str, Any]) -> dict:
        """A saved (and checked) stack state as the optimizer keeps it: one slot per global expert
        (``lrgrad.experts.expert_list``), each expert without refresh placeholders."""
        start, _ = local_experts(stack)
        experts = expert_list(stack, saved[EXPERTS_KEY], "")
        return {EXPERTS_KEY: [self._without_refresh_placeholders(sub, local_tensor(stack)[e - start], group)
                              if sub is not None else None for e, sub in enumerate(experts)]}

    def _check_param_state(self, index: int, p: torch.Tensor, group: dict[str, Any], pstate: Any,
                           where: str | None = None) -> None:
        """Refuse a saved per-parameter state this optimizer would not have created: a missing key,
        a tensor of another shape or dtype, a negative counter, a structural int that differs
        (e.g. transposed Q-GaLore codes). One ``ValueError`` naming the param and the key. An expert
        stack's state is a list of its experts' states, each checked as a separate matrix's."""
        where = where or f"param {index}"
        if not isinstance(pstate, dict):
            raise ValueError(f"Invalid state_dict: the state of {where} is a {type(pstate).__name__}, not a dict")
        if is_expert_stack(p, group):
            if set(pstate) != {EXPERTS_KEY}:
                expert_list(p, None, where)  # raises: not a stack's state
            start, _ = local_experts(p)
            for e, sub in enumerate(expert_list(p, pstate[EXPERTS_KEY], where)):
                if sub is not None:
                    matrix = local_tensor(p)[e - start]
                    self._check_param_state(index, matrix, group, sub, where=f"{where} (expert {e})")
            return
        if EXPERTS_KEY in pstate:
            raise ValueError(f"Invalid state_dict: the state of {where} is an expert stack's; this optimizer's "
                             f"group has experts={group['experts']!r}")
        meta = torch.empty_like(p, device="meta")
        expected: dict[str, Any] = {}
        self.init_param_state(meta, group, expected)
        structural: tuple[str, ...] = ()
        known = set(expected) | LAZY_STATE_KEYS
        refreshes = pstate.get("proj_refreshes", 0)
        if self.is_projected(p, group):
            projector = self.projector_for(meta, group)
            structural = projector.structural_state_keys
            spec = projector.refresh_state_spec(matrix_shape(p), compute_dtype(p.dtype))
            known |= set(spec) | set(projector.refresh_plain_keys)
            if isinstance(refreshes, int) and refreshes > 0:  # the first refresh added its tensors
                expected.update({k: torch.empty(shape, dtype=dt, device="meta") for k, (shape, dt) in spec.items()})
        unknown = sorted(str(k) for k in set(pstate) - known)
        if unknown:
            raise ValueError(f"Invalid state_dict: state[{unknown[0]!r}] of {where} is not a key this optimizer "
                             f"keeps (saved by another optimizer, rule or projector?)")
        for key, ref in expected.items():
            if key not in pstate:
                raise ValueError(f"Invalid state_dict: state[{key!r}] of {where} is missing")
            value = pstate[key]
            if isinstance(ref, torch.Tensor):
                if not isinstance(value, torch.Tensor):
                    raise ValueError(f"Invalid state_dict: state[{key!r}] of {where} is a "
                                     f"{type(value).__name__}, expected a tensor")
                if value.shape != ref.shape:
                    raise ValueError(
                        f"Invalid state_dict: state[{key!r}] of {where} has shape {tuple(value.shape)}, "
                        f"expected {tuple(ref.shape)} (saved with another rank or for another model?)"
                    )
                if value.dtype != ref.dtype:
                    raise ValueError(f"Invalid state_dict: state[{key!r}] of {where} has dtype {value.dtype}, "
                                     f"expected {ref.dtype}")
            elif isinstance(ref, int) and not isinstance(ref, bool):
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise ValueError(f"Invalid state_dict: state[{key!r}] of {where} is {value!r}, "
                                     f"expected an int >= 0")
                if key in structural and value != ref:
                    raise ValueError(f"Invalid state_dict: state[{key!r}] of {where} is {value}, expected {ref} "
                                     f"(saved for another shape or side?)")
