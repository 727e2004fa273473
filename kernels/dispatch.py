"""Backend selection shared by every kernel entry point."""

from __future__ import annotations

import functools
import os
import warnings

import torch

BACKENDS = ("auto", "torch", "triton")


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - depends on the machine
        return False
    return True


def requested_backend() -> str:
    value = os.environ.get("LRGRAD_KERNELS", "auto").lower()
    if value not in BACKENDS:
        raise ValueError(f"Invalid LRGRAD_KERNELS: {value!r}; expected one of {BACKENDS}")
    return value


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


#: reasons already reported for ``LRGRAD_KERNELS=triton`` falling back (one warning each per process)
_WARNED: set[str] = set()


def warn_triton_unusable(reason: str) -> None:
    """``LRGRAD_KERNELS=triton`` was asked for but cannot run: say so once per reason (a
    ``UserWarning``), then use the torch reference — a forced backend never falls back silently."""
    if reason in _WARNED:
        return
    _WARNED.add(reason)
    warnings.warn(f"LRGRAD_KERNELS=triton: {reason}; using the torch reference kernels instead",
                  UserWarning, stacklevel=3)


def backend_for(tensor: torch.Tensor) -> str:
    """``"triton"`` for CUDA tensors when triton imports (or when forced), else ``"torch"``.

    ``LRGRAD_KERNELS=triton`` needs triton and CUDA tensors (or ``TRITON_INTERPRET=1`` for CPU
    tensors, how CI checks kernels); otherwise it warns once (:func:`warn_triton_unusable`) and
    runs the torch reference rather than crash.
    """
    requested = requested_backend()
    if requested == "torch":
        return "torch"
    if not triton_available():
        if requested == "triton":
            warn_triton_unusable("triton is not installed or does not import (pip install 'lrgrad[kernels]')")
        return "torch"
    if tensor.is_cuda:
        return "triton"
    if requested == "triton":
        if interpreting():
            return "triton"
        warn_triton_unusable(f"tensors on {tensor.device.type} need CUDA (or TRITON_INTERPRET=1 to interpret "
                             "the kernels on the CPU)")
    return "torch"


def fp32_gemm_prefers_cublas(*tensors: torch.Tensor) -> bool:
    """True when every GEMM operand is fp32 and TF32 is off: the Triton GEMM would run the IEEE
    FMA path, which cannot beat cuBLAS SGEMM, so matmul-based entry points keep the torch path
    (``param.addmm_(…, beta=decay)`` is already in place with no m×n temporary). The Triton GEMMs
    pay with tensor-core operands (bf16/fp16, or TF32 when ``torch.backends.cuda.matmul.allow_tf32``)
    and where torch needs an fp32 copy of a bf16/fp16 parameter. Tests patch this to False so
    the fp32 kernels are checked too."""
    return all(t.dtype == torch.float32 for t in tensors) and not torch.backends.cuda.matmul.allow_tf32
