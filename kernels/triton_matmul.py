"""Triton GEMMs with an epilogue, shared by the projection and Newton–Schulz kernels.

Two kernels:

* ``gemm_epilogue``: ``out = alpha · A @ B + beta · C`` with fp32 accumulation; ``out`` may
  alias ``C`` (each program reads exactly the C tile it writes), which is how
  ``lowrank_update_`` updates a parameter in place without an m×n temporary.
* ``syrk``: ``out = alpha · X Xᵀ + beta · C`` for a symmetric ``C`` (or none): only the
  blocks on and above the diagonal are computed and each is stored twice (as itself and
  mirrored), half the FLOPs of a general GEMM. Newton–Schulz uses it for ``A = X Xᵀ`` and
  for ``A² = A Aᵀ`` (A is symmetric).

Import this module only on the Triton path (``triton.jit`` decides at import time whether
it runs in the interpreter).

Offsets are int64 (row/column indices and the K index): ``k·stride`` passes 2³¹ on large
matrices. Multiply-adds may be contracted into FMAs (``enable_fp_fusion=True``): the GEMM
promises the fp32-accumulation error bound, not bit-identity with cuBLAS.

Interpreter note: ``tl.dot`` on bf16 operands returns garbage in Triton 3.9's CPU
interpreter, so under ``TRITON_INTERPRET=1`` the operands are upcast to fp32 before the
dot. That is numerically the GPU computation: a bf16×bf16 product is exact in fp32, and
the GPU accumulates in fp32 too; only the summation order differs.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from lrgrad.kernels.dispatch import interpreting, is_rocm
from lrgrad.kernels.triton_utils import device_guard, fix_bf16, to_out

#: dtypes the Triton GEMMs take (fp64 stays on the torch path)
GEMM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _config(m: int, n: int) -> dict[str, int]:
    """Fixed tile sizes. Small tiles under the interpreter (it is slow); on a GPU the usual
    128×128×32 tiles with 8 warps and 3 stages (not tuned: no GPU was lent when this was written)."""
    if interpreting():
        return {"BM": 16, "BN": 16, "BK": 16, "num_warps": 1, "num_stages": 1}
    if max(m, n) <= 256:
        return {"BM": 64, "BN": 64, "BK": 32, "num_warps": 4, "num_stages": 3}
    return {"BM": 128, "BN": 128, "BK": 32, "num_warps": 8, "num_stages": 3}


def _precision(a: torch.Tensor, b: torch.Tensor) -> str:
    """``tl.dot``'s input precision. fp32 operands follow torch's own matmul setting: TF32 only when
    ``torch.backends.cuda.matmul.allow_tf32`` (and never under the interpreter or on ROCm, whose
    Triton backend has no TF32). 16-bit operands: "ieee", which on NVIDIA compiles to the same
    native bf16/fp16 MMA as "tf32" (the setting only concerns fp32 operands) and is the only value
    AMD's backend accepts for them (``input_precision="tf32"`` fails to compile on gfx90a)."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        allowed = torch.backends.cuda.matmul.allow_tf32 and not interpreting() and not is_rocm()
        return "tf32" if allowed else "ieee"
    return "ieee"


def _same_dtype(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixed operand dtypes (fp32 × bf16) are cast to fp32 on the host before the launch. The
    operands here are the low-rank factors (m×r, r×n), so the copy is small; upcasting in-kernel
    instead made the 128×128 IEEE config spill 20–25 KB per thread (found by the AOT compile)."""
    if a.dtype != b.dtype:
        return a.float(), b.float()
    return a, b


def _upcast() -> bool:
    """Cast both operands to fp32 in-kernel: only under the interpreter (its bf16 ``tl.dot`` is broken)."""
    return interpreting()


@triton.jit
def _gemm_epilogue_kernel(
    a_ptr, b_ptr, c_ptr, out_ptr, M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, stride_om, stride_on,
    alpha, beta,
    HAS_C: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, FIX_BF16: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    # Grouped ordering: GROUP_M row-blocks sweep the columns together, so the B panel is reused from L2.
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    rm = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    rn = (pid_n * BN + tl.arange(0, BN)).to(tl.int64)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        # int64: kk·stride wraps in int32 once K·stride ≥ 2³¹ (Newton–Schulz: B X with stride n, K = m)
        kk = k0 + rk.to(tl.int64)
        a = tl.load(a_ptr + rm[:, None] * stride_am + kk[None, :] * stride_ak,
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        b = tl.load(b_ptr + kk[:, None] * stride_bk + rn[None, :] * stride_bn,
                    mask=(kk[:, None] < K) & (rn[None, :] < N), other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    # Epilogue: the only m×n traffic is this tile's read of C and write of out.
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    result = acc * alpha
    if HAS_C:
        c = tl.load(c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn, mask=mask, other=0.0)
        result += c.to(tl.float32) * beta
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on,
             to_out(result, out_ptr.dtype.element_ty, FIX_BF16), mask=mask)


def gemm_epilogue(
    a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, alpha: float = 1.0,
    c: torch.Tensor | None = None, beta: float = 0.0,
) -> torch.Tensor:
    """``out = alpha · a @ b + beta · c`` (fp32 accumulation, one rounding to ``out.dtype``).

    ``c`` may be ``out`` itself (in-place update) and is skipped when None. Any strides.
    """
    M, K = a.shape
    N = b.shape[1]
    if M == 0 or N == 0:
        return out
    a, b = _same_dtype(a, b)
    cfg = _config(M, N)
    has_c = c is not None
    c_arg = c if has_c else out
    grid = (triton.cdiv(M, cfg["BM"]) * triton.cdiv(N, cfg["BN"]),)
    with device_guard(out):
        _gemm_epilogue_kernel[grid](
            a, b, c_arg, out, M, N, K,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), c_arg.stride(0), c_arg.stride(1),
            out.stride(0), out.stride(1), float(alpha), float(beta),
            HAS_C=has_c, UPCAST=_upcast(), PRECISION=_precision(a, b),
            BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"], GROUP_M=8, FIX_BF16=fix_bf16(),
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], enable_fp_fusion=True,
        )
    return out


@functools.cache
def _upper_pairs(tiles: int, device: torch.device) -> torch.Tensor:
    """(i, j) block indices with i <= j, row-major: the programs of the triangular grid."""
    rows, cols = torch.triu_indices(tiles, tiles)
    return torch.stack([rows, cols], dim=1).to(device=device, dtype=torch.int32).contiguous()


@triton.jit
def _syrk_kernel(
    x_ptr, c_ptr, out_ptr, pairs_ptr, M, K,
    stride_xm, stride_xk, stride_cm, stride_cn, stride_om, stride_on,
    alpha, beta,
    HAS_C: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, FIX_BF16: tl.constexpr,
):
    pid = tl.program_id(0)
    bi = tl.load(pairs_ptr + 2 * pid)
    bj = tl.load(pairs_ptr + 2 * pid + 1)
    ri = (bi * BM + tl.arange(0, BM)).to(tl.int64)
    rj = (bj * BM + tl.arange(0, BM)).to(tl.int64)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BM), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + rk.to(tl.int64)  # int64 offsets, as in the GEMM
        a = tl.load(x_ptr + ri[:, None] * stride_xm + kk[None, :] * stride_xk,
                    mask=(ri[:, None] < M) & (kk[None, :] < K), other=0.0)
        # Xᵀ block read straight from X through its strides (no transposed copy)
        bt = tl.load(x_ptr + kk[:, None] * stride_xk + rj[None, :] * stride_xm,
                     mask=(kk[:, None] < K) & (rj[None, :] < M), other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            bt = bt.to(tl.float32)
        acc = tl.dot(a, bt, acc, input_precision=PRECISION)
    mask = (ri[:, None] < M) & (rj[None, :] < M)
    result = acc * alpha
    if HAS_C:
        c = tl.load(c_ptr + ri[:, None] * stride_cm + rj[None, :] * stride_cn, mask=mask, other=0.0)
        result += c.to(tl.float32) * beta
    result = to_out(result, out_ptr.dtype.element_ty, FIX_BF16)
    # Store the tile and its mirror image (the same values at the transposed positions), so out is
    # exactly symmetric. A diagonal tile keeps only its own upper triangle: the MMA need not sum
    # (r, c) and (c, r) in the same order, and the mirror writes the lower triangle from it.
    local = tl.arange(0, BM)
    mask = mask & (local[:, None] <= local[None, :] + (bi != bj).to(tl.int32) * BM)
    tl.store(out_ptr + ri[:, None] * stride_om + rj[None, :] * stride_on, result, mask=mask)
    tl.store(out_ptr + rj[None, :] * stride_om + ri[:, None] * stride_on, result, mask=mask)


def syrk(
    x: torch.Tensor, out: torch.Tensor, alpha: float = 1.0, c: torch.Tensor | None = None, beta: float = 0.0,
) -> torch.Tensor:
    """``out = alpha · x xᵀ + beta · c`` computing only the upper-triangle blocks.

    ``c`` must be symmetric (only its upper blocks are read); it may not alias ``out``.
    """
    M, K = x.shape
    if M == 0:
        return out
    cfg = _config(M, M)
    block = cfg["BM"]
    pairs = _upper_pairs(triton.cdiv(M, block), x.device)
    has_c = c is not None
    c_arg = c if has_c else out
    with device_guard(out):
        _syrk_kernel[(pairs.shape[0],)](
            x, c_arg, out, pairs, M, K,
            x.stride(0), x.stride(1), c_arg.stride(0), c_arg.stride(1), out.stride(0), out.stride(1),
            float(alpha), float(beta),
            HAS_C=has_c, UPCAST=_upcast(), PRECISION=_precision(x, x), BM=block, BK=cfg["BK"],
            FIX_BF16=fix_bf16(), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], enable_fp_fusion=True,
        )
    return out
