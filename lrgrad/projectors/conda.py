r"""Conda's projector: the subspace of the *momentum's* SVD, with the momentum kept at full size.

"Conda: Column-Normalized Adam for Training Large Language Models Faster", Wang et al. 2025
(reference implementations: ``pytorch_optimizer.Conda`` 4.1, jie040109/Conda).

Conda is Adam whose second moment lives in the orthonormal basis of the momentum: every
``update_proj_gap`` steps the basis ``P`` becomes the top singular vectors of the full-size momentum
``M_t = β M_{t−1} + (1 − β) G_t`` (not of the gradient), and between refreshes

.. math::
    R_t = \mathrm{down}(G_t), \quad v_t = β_2 v_{t−1} + (1 − β_2) R_t^2, \quad
    u_t = \mathrm{down}(M_t) / (\sqrt{v_t} + ε), \quad W_t = W_{t−1} − η\,α\,\mathrm{up}(u_t)

(with Adam's bias corrections). The reference keeps every singular vector (a rotation, no
compression); lrgrad's ``rank`` below ``min(m, n)`` is the memory-saving extension (``v`` is r-sized;
the momentum stays full size, as Conda's does).

In lrgrad's design this is a projector and nothing else: the rule is plain AdamW on ``R``. The
projector owns ``M`` (``state["proj_momentum"]``, m x n, a :attr:`row_state_keys` entry) and moves it
forward in :meth:`advance` (the hook the optimizer calls once per step with G, after ``down``); its
refresh takes the SVD of ``β M_{t−1} + (1 − β) G_t``; at a refresh (``moment_policy="project"``)
:meth:`carry_moments` sets the rule's first moment to ``down_new(M_{t−1})``, so that the rule's own
EMA step lands exactly on ``down_new(M_t)`` - between refreshes ``down`` is linear with a fixed basis,
so the rule's EMA *is* ``down(M_t)`` - and keeps the second moment where it is (Conda does not rotate ``v``). ``β`` is
``conda_beta``: the ``CondaAdamW`` preset sets it from ``betas[0]``; ``None`` elsewhere means 0.9
(a projector does not see the rule's options).

The schedule is the reference's: a refresh on step 1 and on every step ``t`` with ``t % gap == 0``
(lrgrad's other projectors refresh on ``t − 1 ≡ 0``). The SVD is the exact one by default
(``svd="exact"``): ``v`` is kept in coordinates across refreshes, so the numbers depend on the basis
itself, signs included, and the reference uses ``torch.linalg.svd``.

FSDP2 (:meth:`refresh_sharded`): ``M`` is elementwise in G, so each rank keeps its own rows of it (a
``Shard(0)`` DTensor like the weight) and advances them from its rows of G; nothing of G or M is
gathered. A refresh takes the momentum's basis from its rows as the SVD projector takes G's:
``svd_sharded="sketch"`` (the default) runs the seeded randomized SVD - one process computes the
same with ``svd="randomized"`` (:attr:`sharded_refresh_options`) - with ``svd_power_iters + 1``
all-reduces of n x (r + ``svd_oversample``) (the left side adds an m x r row gather of the basis);
``"gram"`` the exact right-side basis from one n x n all-reduce; ``"gather"`` all-gathers the
*momentum* (m x n, at refreshes only) for the one-process method. Between refreshes the step adds
nothing to the wrapper's traffic (left side: the r x n all-reduce of ``R`` every projector has); the
left side's refresh with ``moment_policy="project"`` all-reduces ``down_new(M_{t−1})`` (r x n) once.
"""

from __future__ import annotations

from typing import Any

import torch

from lrgrad._checks import check_float
from lrgrad.projectors.svd import SVDProjector

#: the momentum's β when ``conda_beta`` is None outside the preset (Adam's default β1)
DEFAULT_BETA = 0.9


class CondaProjector(SVDProjector):
    """The momentum's top-r singular subspace; the momentum (m x n) is projector state."""

    name = "conda"
    option_defaults: dict[str, Any] = {**SVDProjector.option_defaults, "svd": "exact", "conda_beta": None}
    row_state_keys = ("proj_momentum",)

    @classmethod
    def validate_options(cls, group: dict[str, Any]) -> None:
        super().validate_options(group)
        check_float("conda_beta", group["conda_beta"], minimum=0.0, maximum=1.0, allow_none=True)

    def should_refresh(self, state: dict[str, Any], step: int) -> bool:
        """Step 1, then every step divisible by the gap (the reference's schedule)."""
        return self.lacks_subspace(state) or step % self.update_proj_gap == 0

    def refresh_state_spec(
        self, shape2d: tuple[int, int], dtype: torch.dtype
    ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {**super().refresh_state_spec(shape2d, dtype), "proj_momentum": (tuple(shape2d), dtype)}

    def _advanced(self, state: dict[str, Any], grad: torch.Tensor) -> torch.Tensor:
        """``β M + (1 − β) G`` as a new tensor (a skipped step's snapshot keeps the old one)."""
        momentum = state.get("proj_momentum")
        if momentum is None:
            momentum = torch.zeros_like(grad)
        beta = self.options["conda_beta"]
        return torch.lerp(momentum, grad, 1.0 - (DEFAULT_BETA if beta is None else beta))

    def refresh(self, state: dict[str, Any], grad: torch.Tensor, step: int, group: dict[str, Any]) -> bool:
        if "proj_momentum" not in state:
            state["proj_momentum"] = torch.zeros_like(grad)
        return super().refresh(state, self._advanced(state, grad), step, group)

    def refresh_sharded(self, state: dict[str, Any], grad_local: torch.Tensor, step: int,
                        group: dict[str, Any], ctx: Any) -> Any:
        """FSDP2: the basis of ``β M_{t−1} + (1 − β) G_t`` from this rank's rows of both (module doc):
        the SVD projector's sharded refresh on the momentum's rows, or, for ``svd_sharded="gather"``
        (and ``"gram"`` on the left side), the one-process refresh on the all-gathered momentum."""
        if "proj_momentum" not in state:
            state["proj_momentum"] = torch.zeros_like(grad_local)
        rows = self._advanced(state, grad_local)
        method = self.sharded_method()
        if method == "gather" or (method == "gram" and self.side != "right"):
            return super().refresh(state, ctx.all_gather_rows(rows), step, group)
        return super().refresh_sharded(state, rows, step, group, ctx)

    def advance(self, state: dict[str, Any], grad: torch.Tensor, low: torch.Tensor) -> None:
        """``M_t = β M_{t−1} + (1 − β) G_t`` (this rank's rows under FSDP2), once per step taken."""
        if state.get("proj_momentum") is not None:
            state["proj_momentum"] = self._advanced(state, grad)

    def carry_moments(self, rule: Any, state: dict[str, Any], old_state: dict[str, Any]) -> None:
        """The rule's first moment becomes ``down_new(M_{t−1})`` (plain tensors; quantized ones are carried
        by the transition); second moments stay as they are."""
        momentum = state["proj_momentum"]  # M_{t−1}: advance() runs after the refresh
        target = self.down_rows(momentum, self.basis(state).to(momentum.dtype))  # FSDP2: its rows / all-reduced
        carried = dict(state)
        rule.change_basis(carried, self.transition(old_state, state), self.side)
        for key in rule.linear_keys:
            value = state.get(key)
            if value is None:
                continue
            if isinstance(value, torch.Tensor) and value.is_floating_point() and value.shape == target.shape:
                state[key] = target.to(value.dtype)
            else:
                state[key] = carried[key]


__all__ = ["CondaProjector"]
