"""Expert stacks: a fused Mixture-of-Experts weight ``(E, m, n)`` stepped as ``E`` independent ``(m, n)`` matrices.

transformers keeps the experts of an MoE layer (Mixtral, Qwen2/3-MoE, DeepSeek, gpt-oss, OLMoE, ...) as
3-D parameters, ``experts.gate_up_proj`` of shape ``(num_experts, 2 * intermediate, hidden)`` and
``experts.down_proj``. Each slice ``W[e]`` is one expert's linear weight. In a param group with
``experts=True`` every 3-D param is such a stack, and the optimizer steps it exactly as it would step
``E`` separate ``(m, n)`` params: each expert has its own subspace, its own rule state (moments), its
own refresh schedule and its own seed.

How: the optimizer's stages (prepare, refresh, project, rule, apply: ``lrgrad.optim.pipeline``) run
on *expert views* ``W[e]`` (and ``G[e]``), made fresh on each step and tagged with their stack and
index; :meth:`LowRankOptimizer.state_of` resolves a view to its expert's own state dict,
``state[W]["experts"][e]``. No projector or rule sees anything but a 2-D matrix, so every one of them
works unchanged, and the arithmetic is the arithmetic of ``E`` separate params, bit for bit.

An expert whose gradient slice is exactly zero on a step while another expert's is not (the router sent
it no token) is skipped on that step, as a separate ``nn.Linear`` expert would be (its ``.grad`` stays
``None``): no moment update, no weight decay, no refresh, its step count does not move. A refresh
therefore never computes an idle expert's subspace from a zero gradient. A stack whose gradient is zero
everywhere is not routing but a zero gradient, and steps as any param does on one (every expert).

Under FSDP2 a stack is a ``Shard(0)`` DTensor: ``torch.chunk`` along the expert axis gives each rank whole
experts (uneven ``E``: fewer, possibly none, on the last ranks). Each rank steps the experts of its local
shard on views of its local tensor, tagged with their *global* index, so every expert's seed, state and
arithmetic are those of the one-process run, with no collective but one: whether the stack's gradient is
zero everywhere (all ranks must agree). The stack's state keeps one entry per global expert: this rank's
experts' dicts, ``None`` for the experts other ranks hold.

Checkpoints: ``optimizer.state_dict()`` gives a stack's experts as a mapping from the *global* index, as a
string (``{"0": {...}, "1": {...}}``), holding the experts this process holds only (:func:`saved_experts`).
Flattened by torch's distributed checkpoint (DCP) that is ``experts.<e>.<key>``, the same keys whatever the
world size, each written by the one rank that holds the expert: DCP needs no gather, and every rank reads back
exactly its own experts. String keys, because DCP writes a loaded non-tensor leaf (a step count) at its
flattened path, whose parts are strings: an int key would leave the old value in place; and torch's
``flatten_optimizer_state_dict`` takes nested dicts, not lists. ``load_state_dict`` takes that form or the
in-memory list (:func:`expert_list`). An expert that has never refreshed is saved with
placeholders for its refresh keys (``LowRankOptimizer.state_dict``), which a load drops: torch's DCP loads into a
template made by a zero-gradient step that refreshes every expert, and refuses a template key the checkpoint lacks.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from lrgrad.dtensor import ShardContext, is_dtensor

#: the attribute an expert view carries: ``(stack, index)``
EXPERT_OF = "_lrgrad_expert_of"
#: the key of a stack's state that holds its experts' state dicts, in expert order
EXPERTS_KEY = "experts"


def is_expert_stack(param: torch.Tensor, group: dict[str, Any]) -> bool:
    """True for a 3-D param of a group with ``experts=True``: a stack of ``shape[0]`` expert matrices."""
    return bool(group.get("experts")) and param.dim() == 3


def expert_of(view: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """``(stack, index)`` of an expert view made by :func:`expert_views`, else ``None``."""
    return getattr(view, EXPERT_OF, None)


def is_sharded_stack(stack: torch.Tensor) -> bool:
    """True for an FSDP2 (DTensor) stack: its process holds only some experts (:func:`local_experts`)."""
    return is_dtensor(stack)


def local_experts(stack: torch.Tensor) -> tuple[int, int]:
    """The global indices ``[start, stop)`` of the experts this process holds: all of them for a plain
    stack, this rank's ``torch.chunk`` of the expert axis for an FSDP2 ``Shard(0)`` DTensor (refused by
    name, as every DTensor param, when laid out otherwise: ``lrgrad.dtensor.check_row_sharded``)."""
    if not is_sharded_stack(stack):
        return 0, stack.shape[0]
    ctx = ShardContext(stack)
    return ctx.row_offset, ctx.row_stop


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a stack or its gradient (the tensor itself when not a DTensor)."""
    return t.to_local() if is_dtensor(t) else t


def expert_views(stack: torch.Tensor) -> list[torch.Tensor]:
    """``stack[e]`` for each expert this process holds (:func:`local_experts`: all of a plain stack), each
    tagged with ``(stack, e)``, ``e`` the global index. Views write into the stack (an FSDP2 stack's local
    shard); they are made anew for each use, so a stack whose storage is replaced (``.to()``, a load) is
    never written through a stale view."""
    start, _ = local_experts(stack)
    views = []
    for i, view in enumerate(local_tensor(stack).unbind(0)):
        setattr(view, EXPERT_OF, (stack, start + i))
        views.append(view)
    return views


def state_dicts(state: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The per-matrix state dicts in a param's ``state``: its experts' for a stack (those this process holds:
    an FSDP2 stack's other experts are ``None``), else ``state`` itself."""
    experts = state.get(EXPERTS_KEY)
    if isinstance(experts, list):
        yield from (sub for sub in experts if sub is not None)
    else:
        yield state


def state_tensors(state: dict[str, Any]) -> Iterator[tuple[str, torch.Tensor]]:
    """``(key, tensor)`` of every tensor in a param's ``state``, an expert stack's per-expert ones included."""
    for sub in state_dicts(state):
        for key, value in sub.items():
            if isinstance(value, torch.Tensor):
                yield key, value


def live_experts(stacks: list[torch.Tensor], grads: list[torch.Tensor]) -> list[list[bool]]:
    """For each stack, which of the experts this process holds step: those whose gradient slice is not
    exactly zero (one host sync for all), or every expert when the whole stack's gradient is zero - on every
    rank, for an FSDP2 stack (one all-reduce each: a rank whose shard is zero must know whether another's
    is). A NaN or Inf counts as not zero: the step's own non-finite handling sees it."""
    if not stacks:
        return []
    device = grads[0].device
    # an expert's slice is zero when its max and min are: two plain reductions, no full-size temporary
    # (a bool mask would be one; abs() or vector_norm(inf) measured 2-30x slower on CPU). max/min propagate NaN
    # (an empty stack: no entry to test, zero everywhere below)
    grads = [local_tensor(g) for g in grads]
    rows = [g.reshape(g.shape[0], -1) if g.numel() else None for g in grads]
    flags = torch.cat([(r.amax(dim=1).ne(0) | r.amin(dim=1).ne(0)).to(device) if r is not None
                       else torch.zeros(g.shape[0], dtype=torch.bool, device=device)
                       for r, g in zip(rows, grads)]).tolist()
    out, start = [], 0
    for stack, grad in zip(stacks, grads):
        live = flags[start:start + grad.shape[0]]
        start += grad.shape[0]
        # a stack that is zero everywhere is no routing (some expert always gets a token): a zero gradient,
        # stepped as any param's (torch's distributed-checkpoint state template steps on zero gradients)
        anywhere = any(live)
        if is_sharded_stack(stack):  # the same verdict on every rank, from each rank's experts
            vote = torch.tensor([float(anywhere)], device=device)
            anywhere = bool(ShardContext(stack).all_reduce(vote, op="max").item())
        out.append(live if anywhere else [True] * len(live))
    return out


def saved_experts(experts: list[dict[str, Any] | None]) -> dict[str, dict[str, Any]]:
    """The form ``optimizer.state_dict()`` gives a stack's experts: ``{str(global index): state}`` of the experts
    this process holds (all of a plain stack; an FSDP2 rank's own): world-size independent (module doc)."""
    return {str(e): sub for e, sub in enumerate(experts) if sub is not None}


def expert_list(stack: torch.Tensor, saved: Any, where: str) -> list[dict[str, Any] | None]:
    """A saved stack's experts (a list of one slot per global expert, or a mapping from the global index as
    written by :func:`saved_experts`) as the in-memory list: the state of each expert this process holds
    (:func:`local_experts`), ``None`` in the other slots. ``ValueError`` naming ``where`` and the expert for one
    this process holds that is missing, one it does not hold that is present, or a key that is no expert."""
    count = stack.shape[0]
    start, stop = local_experts(stack)
    if isinstance(saved, dict):
        slots: list[Any] = [None] * count
        for key, sub in saved.items():
            index = int(key) if isinstance(key, str) and key.isdigit() else key
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
                raise ValueError(f"Invalid state_dict: the state of {where} has an entry {key!r}, which is no "
                                 f"expert of a stack of {count} (expected the global indices 0..{count - 1})")
            if slots[index] is not None:
                raise ValueError(f"Invalid state_dict: the state of {where} holds expert {index} twice")
            slots[index] = sub
    elif isinstance(saved, list) and len(saved) == count:
        slots = list(saved)
    else:
        raise ValueError(
            f"Invalid state_dict: the state of {where} is not that of an expert stack of {count} experts (expected "
            f"{{{EXPERTS_KEY!r}: [one state per expert] or {{'<expert>': state}}}}; saved without experts=True?)")
    for e, sub in enumerate(slots):
        held = start <= e < stop
        if held and sub is None:
            raise ValueError(
                f"Invalid state_dict: the state of {where} has no state for expert {e}, which this process holds "
                "(saved by another rank or world size of an FSDP2 run? each rank's state dict holds the experts "
                "of its own shard; a distributed checkpoint reshards them)")
        if not held and sub is not None:
            raise ValueError(
                f"Invalid state_dict: the state of {where} holds expert {e}, which another rank of this FSDP2 run "
                f"holds (this rank holds experts {start}..{stop - 1}): saved by another rank or world size")
    return slots

