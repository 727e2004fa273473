"""GEMM offsets past 2³¹ elements (int32 ``k·stride`` would wrap).

Newton–Schulz multiplies ``B X`` with X of stride n and K = m, so ``k·stride`` reaches m·n: past
2³¹ for a 32768×65536 matrix. A real one is far too big for CI, so the operand here is a small
K×16 view with a 2²⁰-element row stride into a sparse (never materialized) anonymous mapping:
its last rows sit past element 2³¹. The view starts 2³² elements into the mapping, so a wrapped
int32 offset would land inside the mapping (on zeros) and give a wrong product rather than a
crash. Only the pages actually touched (one per row) are ever backed by memory.
"""

from __future__ import annotations

import mmap

import torch
from kernel_tolerances import assert_within, gemm_bound

from lrgrad.kernels import triton_matmul

ROW_STRIDE = 2**20
K = 2**31 // ROW_STRIDE + 16  # rows 2048.. lie past element 2³¹
N = 16
LANDING = 2**32  # elements before the view: where a wrapped (offset − 2³²) address would land
_MAP_NORESERVE = 0x4000  # Linux: do not reserve swap for the sparse mapping


def _sparse_view(gen: torch.Generator) -> tuple[mmap.mmap, torch.Tensor]:
    elements = LANDING + (K - 1) * ROW_STRIDE + N
    flags = mmap.MAP_PRIVATE | getattr(mmap, "MAP_ANONYMOUS", 0x20) | _MAP_NORESERVE
    buffer = mmap.mmap(-1, elements * 2, flags=flags)
    flat = torch.frombuffer(buffer, dtype=torch.bfloat16)
    view = flat.as_strided((K, N), (ROW_STRIDE, 1), storage_offset=LANDING)
    view.copy_(torch.randn(K, N, generator=gen).bfloat16())  # touches one page per row
    return buffer, view


def test_gemm_k_offsets_past_2_31_do_not_wrap():
    gen = torch.Generator().manual_seed(0)
    buffer, b = _sparse_view(gen)
    try:
        assert (K - 1) * b.stride(0) >= 2**31  # the premise: int32 k·stride would wrap
        a = torch.randn(N, K, generator=gen).bfloat16()
        out = torch.empty(N, N)
        triton_matmul.gemm_epilogue(a, b, out)
        expected = a.double() @ b.double()
        bound = gemm_bound(a.double().abs() @ b.double().abs(), torch.zeros(1), K, torch.float32, expected)
        assert_within(out, expected, bound)
    finally:
        del b
        buffer.close()


def test_syrk_k_offsets_past_2_31_do_not_wrap():
    # x = bᵀ: 16 × K with k-stride 2²⁰, read by the syrk kernel through its strides
    gen = torch.Generator().manual_seed(1)
    buffer, b = _sparse_view(gen)
    try:
        x = b.T
        out = torch.empty(N, N)
        triton_matmul.syrk(x, out)
        expected = x.double() @ x.double().T
        bound = gemm_bound(x.double().abs() @ x.double().abs().T, torch.zeros(1), K, torch.float32, expected)
        assert_within(out, expected, bound)
    finally:
        del b, x
        buffer.close()
