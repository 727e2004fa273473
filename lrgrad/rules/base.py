"""The update-rule protocol: turns a (possibly low-rank) gradient into an update.

A rule never knows which projector it runs in. It owns its state keys in the
per-parameter state dict (tensors and plain numbers only) and returns the
*direction* ``u``; the optimizer applies ``p <- p * (1 - lr * wd) - lr * scale * up(u)``.

Rules are stateless strategy objects built from a param group each step, so a
scheduler changing ``lr`` or a user editing ``betas`` in a group takes effect
immediately, as in ``torch.optim``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from lrgrad.dtensor import is_dtensor
from lrgrad.subspace import apply_transition


class UpdateRule:
    name: ClassVar[str] = "base"
    #: rule hyperparameters with their defaults; they live in the param group
    option_defaults: ClassVar[dict[str, Any]] = {}
    #: state keys that transform linearly under a change of subspace (first moments)
    linear_keys: ClassVar[tuple[str, ...]] = ()
    #: state keys holding averages of squares (second moments)
    quadratic_keys: ClassVar[tuple[str, ...]] = ()
    #: the rule updates only matrices (Muon, AuON): params with ``dim() < 2`` run in
    #: :meth:`fallback_group` instead, in the same optimizer (the optimizer and the estimator read it)
    matrix_only: ClassVar[bool] = False
    #: each element's update reads only that element of the gradient and of every state tensor (all
    #: shaped like the param): the optimizer may then step a full-rank param in flat slices to bound
    #: its temporaries (``lrgrad.optim.pipeline``), with the same result bit for bit
    elementwise: ClassVar[bool] = False

    def __init__(self, group: dict[str, Any]):
        self.group = group

    @classmethod
    def validate_options(cls, group: dict[str, Any]) -> None:
        """Raise ``ValueError``/``TypeError`` for bad rule options in ``group``."""

    @classmethod
    def fallback_group(cls, group: dict[str, Any]) -> dict[str, Any]:
        """The param group a ``matrix_only`` rule's 1-D params of ``group`` run in (its ``"rule"`` key
        names the rule). Only ``matrix_only`` rules are asked."""
        raise NotImplementedError(f"{cls.__name__} is not matrix_only; it has no fallback group")

    def init_state(self, state: dict[str, Any], like: torch.Tensor) -> None:
        """Create the rule's state for a gradient shaped like ``like`` (in the compute dtype)."""
        raise NotImplementedError

    def update(self, state: dict[str, Any], grad: torch.Tensor, step: int) -> torch.Tensor:
        """Advance the rule's state with ``grad`` and return the direction ``u``."""
        raise NotImplementedError

    def update_many(
        self, states: list[dict[str, Any]], grads: list[torch.Tensor], steps: list[int],
        reuse_grads: bool = False,
    ) -> list[torch.Tensor]:
        """:meth:`update` for several params at once (every projected param of a group); rules
        override it with a multi-tensor path. This loop is the reference.

        ``reuse_grads``: the caller no longer needs ``grads`` (fresh low-rank gradients), so a rule
        may write the directions into them instead of allocating new buffers."""
        return [self.update(state, grad, step) for state, grad, step in zip(states, grads, steps)]

    def apply_full_rank(
        self,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        states: list[dict[str, Any]],
        steps: list[int],
        lr: float,
        weight_decay: float,
    ) -> None:
        """Update full-rank params in place; rules override with a foreach path."""
        for p, g, state, step in zip(params, grads, states, steps):
            u = self.update(state, g, step)
            work = p if p.dtype == u.dtype else p.to(u.dtype)  # low-precision params: fp32 math
            if weight_decay != 0:  # no extra pass over the param without decay
                work.mul_(1 - lr * weight_decay)
            work.add_(u, alpha=-lr)
            if work is not p:
                p.copy_(work)

    def slice_state(self, state: dict[str, Any], param: torch.Tensor, start: int, stop: int) -> dict[str, Any] | None:
        """Views of a full-rank param's ``state`` for its flat elements ``[start, stop)``: stepping every
        slice is then stepping the param, bit for bit, with temporaries of one slice
        (``lrgrad.optim.pipeline``). ``None``: the param is stepped whole. By default an ``elementwise``
        rule slices each state tensor shaped like the param (contiguous, not a DTensor)."""
        return self.slice_like_param(state, param, start, stop) if self.elementwise else None

    @staticmethod
    def slice_like_param(state: dict[str, Any], param: torch.Tensor, start: int, stop: int) -> dict[str, Any] | None:
        """``state`` with each tensor shaped like ``param`` replaced by its flat view ``[start, stop)``; ``None``
        when a tensor has another shape, is not contiguous or is a DTensor."""
        out: dict[str, Any] = {}
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                if value.shape != param.shape or not value.is_contiguous() or is_dtensor(value):
                    return None
                value = value.view(-1)[start:stop]
            out[key] = value
        return out

    def local_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """FSDP2: ``state`` with each DTensor replaced by this rank's local tensor (the same
        storage, so in-place writes land in the DTensor). Rules whose local layout needs
        more (e.g. per-shard quantization blocks) override it."""
        return {k: (v.to_local() if is_dtensor(v) else v) for k, v in state.items()}

    def change_basis(self, state: dict[str, Any], transition: torch.Tensor, side: str) -> None:
        """Carry the moments into a new subspace (``moment_policy="project"``)."""
        for key in self.linear_keys:
            if key in state:
                state[key] = apply_transition(state[key], transition, side)
        for key in self.quadratic_keys:
            if key in state:
                state[key] = apply_transition(state[key], transition, side, quadratic=True)

    def reset_state(self, state: dict[str, Any]) -> None:
        """Zero the moments (``moment_policy="reset"``): new tensors, so a snapshot of the
        state taken before keeps the old ones."""
        for key in self.linear_keys + self.quadratic_keys:
            if key in state:
                state[key] = torch.zeros_like(state[key])
