"""Q-GaLore's projector: an SVD basis stored in INT4, refreshed on a layer-adaptive schedule.

"Q-GaLore: Quantized GaLore with INT4 Projection and Layer-Adaptive Low-Rank
Gradients", Zhang et al. 2024, arXiv:2407.08296.

Storage. The dense basis from the wrapped SVD projector (exact or randomized,
same options as ``projector="svd"``) is quantized with asymmetric min–max
groups (``lrgrad.quant``) and only the codes are kept:

* ``proj_bits=4``: ``state["proj_codes"]`` is uint8 with two codes per byte
  (``ceil(r·d / 2)`` bytes), ``proj_scale``/``proj_zero`` fp16 per group of
  ``proj_quant_group_size`` (default 256) consecutive row-major elements;
* ``proj_bits=8``: int8 codes, one per element, same fp16 scale/zero.

No fp32 basis is stored; ``basis()`` dequantizes on use (in fp32; the maps cast
it to the gradient's dtype).

Adaptive refresh. After each refresh the new subspace is compared with the
previous one by the sign- and rotation-invariant overlap

    overlap(P₁, P₂) = ‖P₁ P₂ᵀ‖²_F / r   (right side; ‖P₁ᵀ P₂‖²_F / r on the left),

1 for the same subspace whatever the signs or order of its vectors, about
r / d for unrelated ones. (The reference compares the signed cosine of the
first singular vector only: a sign flip there reads as a new subspace.) When
the last ``adaptive_window`` overlaps are all ``≥ adaptive_threshold`` the gap
doubles (capped at ``max_proj_gap``, default ``8 · update_proj_gap``; a cap
below a group's base gap keeps that group's gap fixed) and the
history restarts; an overlap below the threshold halves the gap (down to
``update_proj_gap``) and restarts the history. Refreshes happen when
``step − proj_last_refresh ≥ proj_gap``; with a constant gap this is the SVD
projector's schedule 1, gap+1, 2·gap+1, ...

State (weights_only-safe): ``proj_codes``, ``proj_scale``, ``proj_zero`` (tensors),
``proj_overlaps`` (fp32 tensor of the last ``adaptive_window`` overlaps, ``-1``
= not measured yet), ``proj_gap``, ``proj_last_refresh``, ``proj_rows``,
``proj_cols`` (ints).
"""

from __future__ import annotations

from typing import Any

import torch

from lrgrad import kernels
from lrgrad._checks import check_bool, check_choice, check_float, check_int
from lrgrad.projectors.svd import SVDProjector
from lrgrad.subspace import basis_shape

PROJ_BITS = (4, 8)


def subspace_overlap(p1: torch.Tensor, p2: torch.Tensor, side: str) -> float:
    """``‖P₁P₂ᵀ‖²_F / r`` (right, r x d bases) or ``‖P₁ᵀP₂‖²_F / r`` (left, d x r bases).

    Invariant to the sign, order and any rotation of the basis vectors within
    each subspace: 1 for the same subspace, 0 for orthogonal ones.
    """
    if side == "right":
        cross, rank = p1.float() @ p2.float().T, p1.shape[0]
    else:
        cross, rank = p1.float().T @ p2.float(), p1.shape[1]
    return float(cross.square().sum() / rank)



class QGaLoreProjector(SVDProjector):
    """SVD subspace stored as INT4 (or INT8) codes, with Q-GaLore's adaptive refresh gap."""

    name = "qgalore"
    structural_state_keys = ("proj_rows", "proj_cols")
    orthonormal = False  # orthonormal up to the quantization error
    option_defaults: dict[str, Any] = {
        **SVDProjector.option_defaults,
        "proj_bits": 4,
        "proj_quant_group_size": 256,
        "adaptive_gap": True,
        "adaptive_threshold": 0.4,
        "adaptive_window": 5,
        "max_proj_gap": None,
    }

    @classmethod
    def validate_options(cls, group: dict[str, Any]) -> None:
        super().validate_options(group)
        check_choice("proj_bits", group["proj_bits"], PROJ_BITS)
        check_int("proj_quant_group_size", group["proj_quant_group_size"], 1)
        check_bool("adaptive_gap", group["adaptive_gap"])
        check_float("adaptive_threshold", group["adaptive_threshold"], minimum=0.0, maximum=1.0)
        check_int("adaptive_window", group["adaptive_window"], 1)
        cap = group["max_proj_gap"]
        if cap is not None:
            check_int("max_proj_gap", cap, 1)

    # ---------------------------------------------------------------- lifecycle
    def init_state(self, state: dict[str, Any], shape2d: tuple[int, int], seed: int) -> None:
        super().init_state(state, shape2d, seed)
        rows, cols = basis_shape(shape2d, self.rank, self.side)
        state["proj_rows"] = rows
        state["proj_cols"] = cols
        state["proj_gap"] = self.update_proj_gap
        state["proj_last_refresh"] = 0
        state["proj_overlaps"] = torch.full((self.options["adaptive_window"],), -1.0)

    def has_basis(self, state: dict[str, Any]) -> bool:
        return "proj_codes" in state

    def should_refresh(self, state: dict[str, Any], step: int) -> bool:
        """Refresh when ``proj_gap`` steps have passed since the last refresh."""
        return self.lacks_subspace(state) or step - state["proj_last_refresh"] >= state["proj_gap"]

    @property
    def max_gap(self) -> int:
        cap = self.options["max_proj_gap"]
        # a cap below a group's base gap (one max_proj_gap for groups with different gaps) means "never grow"
        return 8 * self.update_proj_gap if cap is None else max(cap, self.update_proj_gap)

    def store_basis(self, state: dict[str, Any], dense: torch.Tensor, step: int, counted: bool = True) -> None:
        """Quantize the new dense basis (one refresh path for one process and for FSDP2 row
        shards, whose sharded refresh is the SVD projector's) and adapt the gap."""
        old = self.previous_basis(state)
        # new tensors, never in place: the optimizer's shallow copy keeps the old subspace
        state["proj_codes"], state["proj_scale"], state["proj_zero"] = self.quantize(dense)
        state["proj_refreshes"] += int(counted)  # not a provisional basis (SVDProjector.store_basis)
        state["proj_last_refresh"] = step
        if old is not None and self.options["adaptive_gap"]:
            self._adapt_gap(state, subspace_overlap(old, self.basis(state), self.side))

    def _adapt_gap(self, state: dict[str, Any], overlap: float) -> None:
        history = state["proj_overlaps"]
        threshold = self.options["adaptive_threshold"]
        fresh = torch.full_like(history, -1.0)
        if overlap < threshold:
            state["proj_gap"] = max(self.update_proj_gap, state["proj_gap"] // 2)
            state["proj_overlaps"] = fresh
            return
        history = torch.cat([history[1:], history.new_tensor([overlap])])
        if bool((history >= threshold).all()):
            state["proj_gap"] = min(self.max_gap, 2 * state["proj_gap"])
            history = fresh
        state["proj_overlaps"] = history

    # ---------------------------------------------------------------- quantized storage
    def refresh_state_spec(
        self, shape2d: tuple[int, int], dtype: torch.dtype
    ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Packed codes (two INT4 codes a byte as uint8, or one INT8 each) + an fp16 scale and zero
        per group of ``proj_quant_group_size`` elements."""
        rows, cols = basis_shape(shape2d, self.rank, self.side)
        numel = rows * cols
        four = self.options["proj_bits"] == 4
        codes = ((-(-numel // 2),), torch.uint8) if four else ((numel,), torch.int8)
        groups = (-(-numel // self.options["proj_quant_group_size"]),)
        return {"proj_codes": codes, "proj_scale": (groups, torch.float16), "proj_zero": (groups, torch.float16)}

    def quantize(self, dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        group_size = self.options["proj_quant_group_size"]
        if self.options["proj_bits"] == 4:
            return kernels.quantize_int4(dense, group_size)
        codes, scale, zero = kernels.quantize_int8(dense, group_size)
        return codes.reshape(-1), scale, zero

    def basis(self, state: dict[str, Any]) -> torch.Tensor:
        """The dequantized basis (fp32): r x n (right) or m x r (left)."""
        shape = (state["proj_rows"], state["proj_cols"])
        group_size = self.options["proj_quant_group_size"]
        codes, scale, zero = state["proj_codes"], state["proj_scale"], state["proj_zero"]
        if codes.dtype == torch.uint8:
            return kernels.dequantize_int4(codes, scale, zero, shape, group_size)
        return kernels.dequantize_int8(codes, scale, zero, shape, group_size)

    # ---------------------------------------------------------------- maps (basis cast to the compute dtype)
    def down(self, state: dict[str, Any], grad: torch.Tensor) -> torch.Tensor:
        return kernels.project_down(grad, self.basis(state).to(grad.dtype), self.side)

    def up(self, state: dict[str, Any], update: torch.Tensor) -> torch.Tensor:
        return kernels.project_up(update, self.basis(state).to(update.dtype), self.side)

    def update_param_(
        self, state: dict[str, Any], param2d: torch.Tensor, update: torch.Tensor, alpha: float, decay: float
    ) -> None:
        basis = self.basis(state).to(update.dtype)
        kernels.lowrank_update_(param2d, update, basis, self.side, alpha=alpha, decay=decay)


__all__ = ["PROJ_BITS", "QGaLoreProjector", "subspace_overlap"]
