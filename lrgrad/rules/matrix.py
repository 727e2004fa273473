"""The base of every matrix-only rule (Muon, AuON, Hybrid-AuON): momentum, then a whole-matrix map.

Matrix-only rules (``matrix_only = True``) do not update params with ``dim() < 2``: the optimizer
runs those through ``fallback_group(group)`` — AdamW with the group's ``adamw_lr``,
``adamw_betas``, ``adamw_eps`` and ``adamw_weight_decay`` — in the same optimizer.
N-d params are viewed as ``(shape[0], numel // shape[0])`` matrices.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from lrgrad._checks import (
    check_beta,
    check_betas,
    check_bool,
    check_coefficients,
    check_int,
    check_nonnegative,
    check_positive,
)
from lrgrad.kernels.newton_schulz import MUON_COEFFICIENTS
from lrgrad.kernels.precision import check_ns_dtype
from lrgrad.rules.adamw import AdamWRule
from lrgrad.rules.base import UpdateRule

#: the AdamW hyperparameters a matrix-only rule gives its 1-D params (``adamw_lr`` is the
#: AdamW lr that goes with the group lr in ``PAIRED_LR_KEY``: see ``MatrixRule.fallback_group``)
ADAMW_FALLBACK_DEFAULTS: dict[str, Any] = {
    "adamw_lr": 3e-3,
    "adamw_betas": (0.9, 0.95),
    "adamw_eps": 1e-8,
    "adamw_weight_decay": None,
}
#: the group key holding the lr ``adamw_lr`` goes with: the group's lr when it was added to the optimizer
#: (``LowRankOptimizer.add_param_group`` sets it). A group key, not an attribute of the optimizer, so a
#: ``state_dict`` round trip, ``deepcopy`` and pickle keep it with the lr it belongs to.
PAIRED_LR_KEY = "adamw_lr_pairs_with"


#: the Newton–Schulz options of the rules that orthogonalize (Muon: 5 iterations; Hybrid-AuON changes ns_steps)
NEWTON_SCHULZ_DEFAULTS: dict[str, Any] = {"ns_steps": 5, "ns_coefficients": MUON_COEFFICIENTS, "ns_dtype": "auto"}


def validate_newton_schulz(group: dict[str, Any]) -> None:
    """``ns_steps`` >= 1, three quintic coefficients, an ``ns_dtype`` (``lrgrad.kernels.precision``)."""
    check_int("ns_steps", group["ns_steps"], 1)
    check_coefficients(group["ns_coefficients"])
    check_ns_dtype(group["ns_dtype"])


class MatrixRule(UpdateRule):
    """Momentum rules that normalize a whole matrix; 1-D params fall back to AdamW.

    Subclasses implement :meth:`normalize` (momentum matrix -> direction).
    """

    matrix_only: ClassVar[bool] = True
    option_defaults: ClassVar[dict[str, Any]] = {"momentum": 0.95, "nesterov": True, **ADAMW_FALLBACK_DEFAULTS}
    linear_keys = ("momentum_buffer",)

    @classmethod
    def validate_options(cls, group: dict[str, Any]) -> None:
        check_beta("momentum", group["momentum"])
        check_bool("nesterov", group["nesterov"])
        if group["adamw_lr"] is not None:
            check_nonnegative("adamw_lr", group["adamw_lr"])
        check_betas(group["adamw_betas"], name="adamw_betas")
        check_nonnegative("adamw_eps", group["adamw_eps"])
        if group["adamw_weight_decay"] is not None:
            check_nonnegative("adamw_weight_decay", group["adamw_weight_decay"])
        if group.get(PAIRED_LR_KEY) is not None:
            check_positive(PAIRED_LR_KEY, group[PAIRED_LR_KEY])

    @classmethod
    def fallback_group(cls, group: dict[str, Any]) -> dict[str, Any]:
        """The group 1-D params of ``group`` run in: AdamW with the ``adamw_*`` keys.

        ``adamw_lr`` pairs with the lr in ``group[PAIRED_LR_KEY]``, the group's lr when it was added:
        the AdamW lr is ``adamw_lr · lr / that``, so every LR scheduler and an lr set by hand reach the
        1-D params (warmup, cosine, a zero lr; ReduceLROnPlateau records no ``initial_lr``, OneCycleLR
        records its own start ``max_lr / div_factor``). Without the key a torch scheduler's
        ``initial_lr`` stands in. ``adamw_lr=None`` uses ``lr`` itself and ``adamw_weight_decay=None``
        the group's ``weight_decay``.
        """
        derived = {k: v for k, v in group.items() if k not in cls.option_defaults and k != PAIRED_LR_KEY}
        derived.update(AdamWRule.option_defaults)
        derived["rule"] = AdamWRule.name
        derived["betas"] = tuple(group["adamw_betas"])
        derived["eps"] = group["adamw_eps"]
        if group["adamw_weight_decay"] is not None:
            derived["weight_decay"] = group["adamw_weight_decay"]
        lr, base = group["lr"], group["adamw_lr"]
        if base is not None:
            reference = group.get(PAIRED_LR_KEY) or group.get("initial_lr")
            derived["lr"] = base * float(lr) / float(reference) if reference else base
        return derived

    def init_state(self, state: dict[str, Any], like: torch.Tensor) -> None:
        state["momentum_buffer"] = torch.zeros_like(like, memory_format=torch.preserve_format)

    def momentum_direction(self, state: dict[str, Any], grad: torch.Tensor) -> torch.Tensor:
        """Advance the EMA momentum; return the (Nesterov) direction as a new tensor."""
        beta = self.group["momentum"]
        buf = state["momentum_buffer"]
        buf.lerp_(grad, 1 - beta)
        return torch.lerp(grad, buf, beta) if self.group["nesterov"] else buf.clone()

    def normalize(self, matrix: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def update(self, state: dict[str, Any], grad: torch.Tensor, step: int) -> torch.Tensor:
        direction = self.momentum_direction(state, grad)
        shape = direction.shape
        if direction.dim() != 2:  # N-d params (conv kernels) are updated as (shape[0], rest) matrices
            direction = direction.reshape(shape[0], -1)
        return self.normalize(direction).reshape(shape)
