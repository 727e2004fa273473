"""AdamW's multi-tensor step: torch's fused kernel behind one function, its op-by-op reference beside it.

"Decoupled Weight Decay Regularization", Loshchilov & Hutter, arXiv:1711.05101; torch's arithmetic
(``eps`` outside the bias-corrected square root):

    m ← m + (1 − β1)(g − m);   v ← β2 v + (1 − β2) g²
    p ← p (1 − lr λ) − lr · (m / (1 − β1ᵗ)) / (√v / √(1 − β2ᵗ) + ε)

``torch._fused_adamw_`` is a private op (what ``torch.optim.AdamW(fused=True)`` calls): one pass over
every tensor of a list instead of seven. lrgrad reaches it only through this file, and picks it in one
place, :func:`fused_adamw_applies`, as ``torch/optim/adam.py`` picks its fused, foreach or single-tensor
path. Two uses:

* :func:`adamw_step_`: the plain step (full-rank params, online PCA's basis P);
* :func:`adamw_directions_`: the rule's direction ``u = m̂ / (√v̂ + ε)`` for every projected param, read
  off the kernel with ``lr = −1`` into a zeroed buffer (``p = 0``: ``p − lr·u = u``), or on CPU into the
  gradients themselves with ``λ = −1`` (``p = g``: ``g (1 − lr λ) = g · 0 = 0`` for a finite ``g``).
  The second relies on the CPU kernel reading each vector of ``g`` before storing ``p`` (load, compute,
  store per vector); GPUs take the zeroed buffer.

``tests/kernels/test_kernels_adamw.py`` compares each fused path with its reference on every dtype
(fp32, fp64) and device (CPU; CUDA in the GPU check) that reaches it, within a few roundings, and the
aliased directions with the zeroed-buffer ones bit for bit: a torch upgrade that changes the kernel's
arithmetic or its load/store order fails there.
"""

from __future__ import annotations

import torch

from lrgrad.dtensor import is_dtensor
from lrgrad.step_counts import step_counts


def fused_adamw_applies(*tensor_lists: list[torch.Tensor]) -> bool:
    """The one choice of path: torch has the fused kernel, and every tensor of the lists is on one CPU or
    CUDA device, in one dtype, and dense (contiguous; all DTensors or none, as the kernel walks memory)."""
    tensors = [t for ts in tensor_lists for t in ts]
    if not tensors or not hasattr(torch, "_fused_adamw_"):
        return False
    first = tensors[0]
    if first.device.type not in ("cpu", "cuda"):
        return False
    sharded = is_dtensor(first)
    return all(t.device == first.device and t.dtype == first.dtype and t.is_contiguous()
               and is_dtensor(t) == sharded for t in tensors)


def check_shapes(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                 exp_avg_sqs: list[torch.Tensor]) -> None:
    """Refuse lists of unequal lengths or a grad/moment whose shape is not its param's, with one ``ValueError``:
    torch's CPU fused kernel walks every list by the param's size unchecked, so a smaller moment (a group's
    rank changed by hand) would be written out of bounds and corrupt the heap."""
    if not len(params) == len(grads) == len(exp_avgs) == len(exp_avg_sqs):
        raise ValueError(f"Invalid AdamW step: {len(params)} params, {len(grads)} grads, {len(exp_avgs)} exp_avg, "
                         f"{len(exp_avg_sqs)} exp_avg_sq")
    shapes = [p.shape for p in params]  # one list comparison per list (the step's hot path); details below
    if shapes == [g.shape for g in grads] == [m.shape for m in exp_avgs] == [v.shape for v in exp_avg_sqs]:
        return
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        for key, t in (("grad", g), ("exp_avg", m), ("exp_avg_sq", v)):
            if t.shape != p.shape:
                raise ValueError(
                    f"Invalid AdamW step: {key} {i} has shape {tuple(t.shape)}, its param {tuple(p.shape)} (was a "
                    "group's rank, proj_type or projector changed after the state was created? build a new optimizer)"
                )


def adamw_step_(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                exp_avg_sqs: list[torch.Tensor], steps: list[int], *, lr: float, beta1: float, beta2: float,
                weight_decay: float, eps: float, fused: bool | None = None) -> None:
    """One AdamW step of every param in place (moments advanced): torch's fused kernel where
    :func:`fused_adamw_applies` (and ``fused`` is not ``False``), else :func:`adamw_step_reference_`."""
    if not params:
        return
    check_shapes(params, grads, exp_avgs, exp_avg_sqs)
    if fused is not False and fused_adamw_applies(params, grads, exp_avgs, exp_avg_sqs):
        torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, [], step_counts(steps, params[0].device),
                            amsgrad=False, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps,
                            maximize=False)
        return
    adamw_step_reference_(params, grads, exp_avgs, exp_avg_sqs, steps, lr=lr, beta1=beta1, beta2=beta2,
                          weight_decay=weight_decay, eps=eps)


def adamw_step_reference_(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                          exp_avg_sqs: list[torch.Tensor], steps: list[int], *, lr: float, beta1: float,
                          beta2: float, weight_decay: float, eps: float) -> None:
    """:func:`adamw_step_` op by op (torch's foreach arithmetic). Params in a lower precision than their
    moments (bf16 params, fp32 moments) are stepped on work copies in the moments' dtype and rounded
    once. The moments advance before the param is written, so ``params`` may alias ``grads``."""
    work = [p if p.dtype == m.dtype else p.to(m.dtype) for p, m in zip(params, exp_avgs)]
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    if weight_decay != 0:
        torch._foreach_mul_(work, 1 - lr * weight_decay)
    step_sizes = [-lr / (1 - beta1**t) for t in steps]
    bias_correction2_sqrt = [(1 - beta2**t) ** 0.5 for t in steps]
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bias_correction2_sqrt)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(work, exp_avgs, denom, step_sizes)
    for p, w in zip(params, work):
        if w is not p:
            p.copy_(w)


def adamw_directions_(grads: list[torch.Tensor], exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor],
                      steps: list[int], *, beta1: float, beta2: float, eps: float,
                      into_grads: bool = False) -> list[torch.Tensor] | None:
    """Advance the moments and return every direction ``m̂ / (√v̂ + ε)`` from one fused pass, or ``None``
    when :func:`fused_adamw_applies` says no (the caller then runs its per-param reference).
    ``into_grads``: the caller no longer needs ``grads``; on CPU the directions overwrite them."""
    # DTensors go param by param: the zeroed buffer below is a plain tensor
    if any(is_dtensor(g) for g in grads) or not fused_adamw_applies(grads, exp_avgs, exp_avg_sqs):
        return None
    device = grads[0].device
    if into_grads and device.type == "cpu":
        outs, decay = grads, -1.0
    else:
        # one zeroed buffer, split per param: a single memset
        flat = torch.zeros(sum(g.numel() for g in grads), dtype=grads[0].dtype, device=device)
        outs = [chunk.view_as(g) for chunk, g in zip(flat.split([g.numel() for g in grads]), grads)]
        decay = 0.0
    adamw_step_(outs, grads, exp_avgs, exp_avg_sqs, steps, lr=-1.0, beta1=beta1, beta2=beta2,
                weight_decay=decay, eps=eps)
    return outs


__all__ = ["adamw_directions_", "adamw_step_", "adamw_step_reference_", "check_shapes", "fused_adamw_applies"]
