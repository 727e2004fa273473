"""Per-layer updates: step each parameter from its gradient hook.

GaLore's 7B-on-24GB trick: a parameter is updated as soon as its gradient is
complete (``register_post_accumulate_grad_hook``) and its gradient freed, so
full gradients of all layers never coexist. Unlike the reference code this
wrapper keeps the semantics of an ordinary training loop:

* **Gradient accumulation**: hooks only act on the last micro-batch of each
  window (``accumulation_steps``); earlier micro-batches accumulate into ``.grad``
  as usual.
* **Global-norm clipping, exact**: with ``max_grad_norm`` set, the hook adds
  ``‖g‖²`` to a running total, refreshes the subspace (scale-invariant, so it
  does not need the clip factor), projects the gradient to its low-rank form
  and frees the full gradient. ``step()`` then knows the exact global norm,
  scales the low-rank gradients by ``torch.nn.utils.clip_grad_norm_``'s factor
  ``min(1, max_norm / (norm + 1e-6))`` (projection is linear) and applies the
  updates. Only r x n low-rank gradients are held, plus the gradients of the
  full-rank params (biases, norms, embeddings) and of params whose update reads
  the full gradient (``full_rank="apollo"``/``"fira"``: APOLLO, Fira); without
  clipping those too are stepped and freed in their hook. A non-finite global norm skips
  the whole step (counted in ``skipped_steps``).
* **One scheduler clock**: ``step()`` is called once per micro-batch and steps
  the scheduler once per window - never once per parameter.
* **DDP**: the hooks fire before DDP's all-reduce, so under DDP the step must run in DDP's
  comm hook (``lrgrad.distributed.ddp_layerwise``); a gradient that reappears on a param after
  its hook stepped it (DDP without that call) makes ``step()`` raise instead of letting the
  ranks train apart.

Usage::

    opt = lrgrad.GaLoreAdamW(model.parameters(), rank=128)
    lw = lrgrad.LayerwiseOptimizer(opt, accumulation_steps=4, max_grad_norm=1.0, scheduler=sched)
    for batch in loader:
        (model(batch).loss / 4).backward()
        lw.step()   # after every micro-batch
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lrgrad._checks import check_int, check_positive
from lrgrad.experts import is_expert_stack
from lrgrad.optim.lowrank import LowRankOptimizer
from lrgrad.optim.pipeline import Staged


class LayerwiseOptimizer:
    """Drive a ``LowRankOptimizer`` from per-parameter gradient hooks."""

    def __init__(
        self,
        optimizer: LowRankOptimizer,
        accumulation_steps: int = 1,
        max_grad_norm: float | None = None,
        scheduler: Any | None = None,
    ):
        if not isinstance(optimizer, LowRankOptimizer):
            raise TypeError(f"Invalid optimizer: expected an lrgrad optimizer, got {type(optimizer).__name__}")
        check_int("accumulation_steps", accumulation_steps, 1)
        check_positive("max_grad_norm", max_grad_norm, allow_none=True)
        for group in optimizer.param_groups:  # FSDP2 with an unshardable projector: before any hook steps
            optimizer.check_shardable(group)
        self.optimizer = optimizer
        self.accumulation_steps = accumulation_steps
        self.max_grad_norm = max_grad_norm
        self.scheduler = scheduler
        self.micro_step = 0
        self.skipped_steps = 0
        self.last_grad_norm: float | None = None
        self._handles = []
        self._hooked: set[int] = set()
        self._hooks_removed = False
        self._reset_window()
        self._sync_params()

    def _sync_params(self) -> None:
        """Hook every param that requires grad and has no hook yet: groups added by ``add_param_group``
        and params unfrozen after construction (fine-tuning that unfreezes layers midway) are stepped
        from their hooks from the next backward on (``optimizer.group_of`` finds their current group)."""
        if self._hooks_removed:
            return
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.requires_grad and id(p) not in self._hooked:
                    self._hooked.add(id(p))
                    self._handles.append(p.register_post_accumulate_grad_hook(self._hook))

    def _reset_window(self) -> None:
        self._handled: set[int] = set()
        #: params stepped from their hook whose gradient the hook freed (see _check_no_late_grads)
        self._freed_in_hook: set[int] = set()
        self._pending_low: list[Staged] = []
        self._pending_full: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._sq_norm: torch.Tensor | None = None

    @property
    def last_micro_batch(self) -> bool:
        """True while the backward of the window's last micro-batch runs."""
        return (self.micro_step + 1) % self.accumulation_steps == 0

    @torch.no_grad()
    def _hook(self, param: torch.Tensor) -> None:
        if self.last_micro_batch and param.grad is not None:
            self.handle_grad(param)
            if param.grad is None:
                self._freed_in_hook.add(id(param))

    def handle_grad(self, param: torch.Tensor) -> None:
        """Process ``param.grad`` now (its last micro-batch's gradient is complete): step it, or
        with clipping project it and keep it until the window's global norm is known."""
        opt = self.optimizer
        group = opt.group_of(param)  # the current dict: a resume's load_state_dict replaces them
        grad = param.grad
        self._handled.add(id(param))
        opt.check_grad(grad)
        if self.max_grad_norm is None:
            opt.step_params(group, [param], [grad])
            param.grad = None
            return
        sq = grad.detach().to(torch.float64 if grad.dtype == torch.float64 else torch.float32).pow(2).sum()
        self._sq_norm = sq if self._sq_norm is None else self._sq_norm + sq.to(self._sq_norm.device)
        if not opt.is_projected(param, group) or opt.needs_full_grad(param, group) or is_expert_stack(param, group):
            # full-rank grads (and those of APOLLO/Fira params, whose update reads all of G, and of
            # expert stacks, stepped expert by expert) are kept until step(); the clipped step is
            # then exactly the ordinary loop's
            self._pending_full.append((param, grad))
            return
        # the window may still be skipped (a non-finite global norm): undoable
        staged = opt.stage(param, group, grad, undoable=True)
        if staged is not None:
            self._pending_low.append(staged)
        param.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """Call once after every micro-batch's backward."""
        self.optimizer.check_materialized()  # meta params never fire a hook: no step would happen, silently
        if self.last_micro_batch:
            self._finish_window()
        self.micro_step += 1

    def _check_no_late_grads(self) -> None:
        """Raise when a gradient reappeared on a param after its hook stepped it and freed it.

        That is DistributedDataParallel: its bucketed all-reduce runs after the post-accumulate-grad
        hooks and writes the averaged gradient back, so every rank stepped on its own local gradient
        and the ranks drifted apart. ``lrgrad.distributed.ddp_layerwise`` steps from DDP's comm hook
        instead (and removes these hooks); FSDP2 runs the hooks after its reduce-scatter.
        """
        late = [p for group in self.optimizer.param_groups for p in group["params"]
                if id(p) in self._freed_in_hook and p.grad is not None]
        if late:
            shapes = ", ".join(str(tuple(p.shape)) for p in late[:3]) + (", ..." if len(late) > 3 else "")
            raise ValueError(
                f"Invalid setup for LayerwiseOptimizer: a gradient was written into {len(late)} params ({shapes}) "
                "after their per-layer update in this backward - DistributedDataParallel's all-reduce, which runs "
                "after the per-parameter hooks: each rank stepped on its local gradient and the ranks now differ. "
                "Under DDP call lrgrad.distributed.ddp_layerwise(ddp_model, layerwise) once after building the "
                "LayerwiseOptimizer (it steps each bucket right after its all-reduce)"
            )

    def _finish_window(self) -> None:
        self._check_no_late_grads()
        # Params whose grad came from earlier micro-batches only (no hook in the last one).
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None and id(p) not in self._handled:
                    self.handle_grad(p)
        if self.max_grad_norm is not None:
            self._apply_clipped()
        self._reset_window()
        self._sync_params()  # params added or unfrozen in this window get their hooks for the next
        # The optimizer was stepped parameter by parameter: tell LR schedulers so.
        self.optimizer.mark_stepped()
        if self.scheduler is not None:
            self.scheduler.step()

    def _apply_clipped(self) -> None:
        opt = self.optimizer
        norm = math.sqrt(float(self._sq_norm)) if self._sq_norm is not None else 0.0
        self.last_grad_norm = norm
        if not math.isfinite(norm):
            self.skipped_steps += 1
            opt.unstage(self._pending_low)  # no refresh, no counter moves on a skipped step
            for p, _ in self._pending_full:
                p.grad = None
            return
        coef = min(1.0, self.max_grad_norm / (norm + 1e-6))
        opt.apply_staged(self._pending_low, grad_scale=coef)  # projection is linear: clip R, not G
        for p, grad in self._pending_full:
            opt.step_params(opt.group_of(p), [p], [grad * coef if coef < 1.0 else grad])
            p.grad = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"micro_step": self.micro_step, "skipped_steps": self.skipped_steps,
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.micro_step = int(state_dict["micro_step"])
        self.skipped_steps = int(state_dict["skipped_steps"])
        # torch's load_state_dict replaces the param-group dicts; the hooks find the new ones
        # (optimizer.group_of), which the LR schedulers update
        self.optimizer.load_state_dict(state_dict["optimizer"])

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._hooks_removed = True
