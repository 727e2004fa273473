"""AdamW with 8-bit blockwise-quantized moments (``rule="adamw8bit"``).

"8-bit Optimizers via Block-wise Quantization", Dettmers et al. 2021,
arXiv:2110.02861; used with INT4 projections in "Q-GaLore: Quantized GaLore with
INT4 Projection and Layer-Adaptive Low-Rank Gradients", Zhang et al. 2024,
arXiv:2407.08296.

The math is ``torch.optim.AdamW``'s (see ``lrgrad.rules.adamw``); only the
storage of the moments differs. A state with at least ``moment_min_size``
elements (default 4096; smaller ones stay fp32, as in bitsandbytes/torchao,
because their block statistics would cost as much as they save) keeps

* ``exp_avg_codes`` (int8) + ``exp_avg_absmax`` (fp32 per block of ``moment_block_size``),
* ``exp_avg_sq_codes`` (uint8) + ``exp_avg_sq_absmax`` (fp32 per block),

with the companded code maps of :func:`lrgrad.quant.quantize_blockwise_8bit`
(square-root map for m, fourth-root map for v, so small second moments are not
flushed to 0 and ``1/sqrt(v)`` cannot blow up). Each step dequantizes, runs the
fp32 AdamW update (the direction uses the unrounded new moments) and
requantizes. ``moment_policy="project"`` dequantizes, applies the change of
basis and requantizes; ``"reset"`` zeroes codes and block maxima.
"""

from __future__ import annotations

from typing import Any

import torch

from lrgrad import kernels, quant
from lrgrad._checks import check_int
from lrgrad.dtensor import from_local, is_dtensor, shard_block_state
from lrgrad.kernels.dispatch import backend_for
from lrgrad.rules import blockwise8bit
from lrgrad.rules.adamw import AdamWRule
from lrgrad.rules.base import UpdateRule
from lrgrad.subspace import apply_transition

#: (state key prefix, signed code map)
QUANTIZED_MOMENTS = (("exp_avg", True), ("exp_avg_sq", False))
#: elements per chunk of the quantized update (a multiple of the block size is used)
UPDATE_CHUNK = 1 << 20


class AdamW8bitRule(AdamWRule):
    name = "adamw8bit"
    option_defaults: dict[str, Any] = {
        **AdamWRule.option_defaults,
        "moment_block_size": 256,
        "moment_min_size": 4096,
    }
    # the quantized forms too, so projectors that treat first and second moments differently
    # (e.g. Flora's random projector) can tell them apart
    linear_keys = ("exp_avg", "exp_avg_codes", "exp_avg_absmax")
    quadratic_keys = ("exp_avg_sq", "exp_avg_sq_codes", "exp_avg_sq_absmax")
    #: quantization blocks span elements: slices must start on a block (:meth:`slice_state`)
    elementwise = False

    @classmethod
    def validate_options(cls, group: dict[str, Any]) -> None:
        super().validate_options(group)
        check_int("moment_block_size", group["moment_block_size"], 1)
        check_int("moment_min_size", group["moment_min_size"], 0)

    # ---------------------------------------------------------------- state
    @staticmethod
    def is_quantized(state: dict[str, Any]) -> bool:
        return "exp_avg_codes" in state

    def init_state(self, state: dict[str, Any], like: torch.Tensor) -> None:
        if like.numel() < self.group["moment_min_size"]:
            super().init_state(state, like)
            return
        if is_dtensor(like):  # FSDP2: per-shard blocks (see shard_block_state)
            state.update(shard_block_state(like, self.group["moment_block_size"], QUANTIZED_MOMENTS))
            return
        blocks = quant.num_groups(like.numel(), self.group["moment_block_size"])
        for key, signed in QUANTIZED_MOMENTS:
            state[f"{key}_codes"] = torch.zeros(like.shape, dtype=torch.int8 if signed else torch.uint8,
                                                device=like.device)
            state[f"{key}_absmax"] = torch.zeros(blocks, dtype=torch.float32, device=like.device)

    def local_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """FSDP2: this rank's codes and the block maxima of its own blocks (views: in-place
        writes land in the DTensors; the padding of a shard with fewer blocks is left out)."""
        local = super().local_state(state)
        if self.is_quantized(local):
            for key, _ in QUANTIZED_MOMENTS:
                blocks = quant.num_groups(local[f"{key}_codes"].numel(), self.group["moment_block_size"])
                local[f"{key}_absmax"] = local[f"{key}_absmax"].view(-1)[:blocks]
        return local

    def slice_state(self, state: dict[str, Any], param: torch.Tensor, start: int, stop: int) -> dict[str, Any] | None:
        """Whole blocks are independent: a slice that starts on a block boundary and ends on one (or at the
        end) is stepped exactly as the same elements of the whole param. Small (fp32) moments slice as
        AdamW's."""
        if not self.is_quantized(state):
            return self.slice_like_param(state, param, start, stop)  # AdamW's arithmetic: elementwise
        block = self.group["moment_block_size"]
        if start % block or (stop % block and stop != param.numel()) or any(is_dtensor(v) for v in state.values()):
            return None
        out = dict(state)
        for key, _ in QUANTIZED_MOMENTS:
            out[f"{key}_codes"] = state[f"{key}_codes"].view(-1)[start:stop]
            out[f"{key}_absmax"] = state[f"{key}_absmax"][start // block: quant.num_groups(stop, block)]
        return out

    def load_moment(self, state: dict[str, Any], key: str, signed: bool, dtype: torch.dtype) -> torch.Tensor:
        """The dequantized moment ``key`` (``"exp_avg"`` / ``"exp_avg_sq"``) in ``dtype``."""
        return kernels.dequantize_blockwise_8bit(
            state[f"{key}_codes"], state[f"{key}_absmax"], block_size=self.group["moment_block_size"],
            signed=signed, dtype=dtype,
        )

    def store_moment(self, state: dict[str, Any], key: str, signed: bool, value: torch.Tensor) -> None:
        """Requantize ``value`` into the existing tensors (in place: under FSDP2 they are views
        of this rank's part of the DTensors)."""
        codes, absmax = kernels.quantize_blockwise_8bit(value, self.group["moment_block_size"], signed=signed)
        state[f"{key}_codes"].copy_(codes)
        state[f"{key}_absmax"].copy_(absmax)

    # ---------------------------------------------------------------- update
    def update_many(
        self, states: list[dict[str, Any]], grads: list[torch.Tensor], steps: list[int],
        reuse_grads: bool = False,
    ) -> list[torch.Tensor]:
        """Param by param (:meth:`update`): the moments are codes, not what torch's fused AdamW reads."""
        return UpdateRule.update_many(self, states, grads, steps)

    def update(self, state: dict[str, Any], grad: torch.Tensor, step: int) -> torch.Tensor:
        """Dequantize -> Adam -> requantize, one chunk of whole blocks at a time.

        Blocks are independent, so chunking is exact (bit-identical to one pass) while
        the fp32 temporaries stay at ``UPDATE_CHUNK`` elements instead of several
        copies of the whole moment - an embedding's moments would otherwise cost
        ~5x their fp32 size at the peak, undoing the 8-bit saving.

        fp32 off the Triton backend (CPU) takes :meth:`update_eager_fast` (the same
        arithmetic in fewer passes, bit-identical); everything else :meth:`update_reference`.
        """
        if not self.is_quantized(state):
            return super().update(state, grad, step)
        if is_dtensor(grad):  # FSDP2: every rank updates the blocks of its own rows
            direction = self.update(self.local_state(state), grad.to_local(), step)
            return from_local(direction, grad, list(grad.placements), tuple(grad.shape))
        if grad.dtype == torch.float32 and backend_for(grad) != "triton":
            return self.update_eager_fast(state, grad, step)
        return self.update_reference(state, grad, step)

    def _moment_views(self, state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        codes = {key: state[f"{key}_codes"].view(-1) for key, _ in QUANTIZED_MOMENTS}
        absmax = {key: state[f"{key}_absmax"] for key, _ in QUANTIZED_MOMENTS}
        return codes, absmax

    def _update_range_reference(self, codes: dict[str, torch.Tensor], absmax: dict[str, torch.Tensor],
                                flat_grad: torch.Tensor, direction: torch.Tensor, start: int, end: int,
                                step: int) -> None:
        """Elements ``[start, end)`` (``start`` on a block boundary) through the dispatched kernels."""
        beta1, beta2 = self.group["betas"]
        block = self.group["moment_block_size"]
        blocks = slice(start // block, quant.num_groups(end, block))
        moments = [kernels.dequantize_blockwise_8bit(codes[key][start:end], absmax[key][blocks],
                                                     block_size=block, signed=signed, dtype=flat_grad.dtype)
                   for key, signed in QUANTIZED_MOMENTS]
        kernels.adam_direction_(*moments, flat_grad[start:end], beta1, beta2, self.group["eps"], step,
                                out=direction[start:end])
        for (key, signed), moment in zip(QUANTIZED_MOMENTS, moments):
            new_codes, new_absmax = kernels.quantize_blockwise_8bit(moment, block, signed=signed)
            codes[key][start:end] = new_codes
            absmax[key][blocks] = new_absmax

    def update_reference(self, state: dict[str, Any], grad: torch.Tensor, step: int) -> torch.Tensor:
        """The plain path: the dispatched (de)quantizers and Adam kernel, chunk by chunk."""
        block = self.group["moment_block_size"]
        chunk = max(block, UPDATE_CHUNK // block * block)
        flat_grad = grad.reshape(-1)
        direction = torch.empty_like(flat_grad)
        codes, absmax = self._moment_views(state)
        for start in range(0, flat_grad.numel(), chunk):
            end = min(start + chunk, flat_grad.numel())
            self._update_range_reference(codes, absmax, flat_grad, direction, start, end, step)
        return direction.view_as(grad)

    def update_eager_fast(self, state: dict[str, Any], grad: torch.Tensor, step: int) -> torch.Tensor:
        """:meth:`update_reference` in fewer passes (``lrgrad.rules.blockwise8bit``): table
        dequantization into two reused fp32 chunk buffers, in-place requantization; the
        trailing partial block (if any) goes through the reference. Bit-identical."""
        beta1, beta2 = self.group["betas"]
        block = self.group["moment_block_size"]
        chunk = max(block, UPDATE_CHUNK // block * block)
        flat_grad = grad.reshape(-1)
        numel = flat_grad.numel()
        whole = numel // block * block
        direction = torch.empty_like(flat_grad)
        codes, absmax = self._moment_views(state)
        buffers = [torch.empty(min(chunk, whole), dtype=torch.float32, device=grad.device) for _ in range(2)]
        for start in range(0, whole, chunk):
            end = min(start + chunk, whole)
            blocks = slice(start // block, end // block)
            moments = [blockwise8bit.dequantize_blocks(codes[key][start:end], absmax[key][blocks], block, signed,
                                                       buffer[: end - start])
                       for (key, signed), buffer in zip(QUANTIZED_MOMENTS, buffers)]
            kernels.adam_direction_(*moments, flat_grad[start:end], beta1, beta2, self.group["eps"], step,
                                    out=direction[start:end])
            for (key, signed), moment in zip(QUANTIZED_MOMENTS, moments):
                blockwise8bit.quantize_blocks(moment, block, signed, codes[key][start:end], absmax[key][blocks])
        if whole < numel:
            self._update_range_reference(codes, absmax, flat_grad, direction, whole, numel, step)
        return direction.view_as(grad)

    def apply_full_rank(self, params: list[torch.Tensor], grads: list[torch.Tensor], states: list[dict[str, Any]],
                        steps: list[int], lr: float, weight_decay: float) -> None:
        # Small (fp32) states take AdamW's foreach path untouched; quantized ones go one by one.
        small = [i for i, s in enumerate(states) if not self.is_quantized(s)]
        large = [i for i, s in enumerate(states) if self.is_quantized(s)]
        if small:
            super().apply_full_rank([params[i] for i in small], [grads[i] for i in small],
                                    [states[i] for i in small], [steps[i] for i in small], lr, weight_decay)
        if large:
            UpdateRule.apply_full_rank(self, [params[i] for i in large], [grads[i] for i in large],
                                       [states[i] for i in large], [steps[i] for i in large], lr, weight_decay)

    # ---------------------------------------------------------------- subspace changes
    def change_basis(self, state: dict[str, Any], transition: torch.Tensor, side: str) -> None:
        if not self.is_quantized(state):
            super().change_basis(state, transition, side)
            return
        for key, signed in QUANTIZED_MOMENTS:
            moment = self.load_moment(state, key, signed, transition.dtype)
            moved = apply_transition(moment, transition, side, quadratic=not signed)
            self.store_moment(state, key, signed, moved)

    def reset_state(self, state: dict[str, Any]) -> None:
        if not self.is_quantized(state):
            super().reset_state(state)
            return
        for key, _ in QUANTIZED_MOMENTS:  # new tensors: a snapshot keeps the old
            state[f"{key}_codes"] = torch.zeros_like(state[f"{key}_codes"])
            state[f"{key}_absmax"] = torch.zeros_like(state[f"{key}_absmax"])


__all__ = ["AdamW8bitRule"]
