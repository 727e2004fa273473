"""Backend selection shared by every kernel entry point."""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")

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


def is_rocm() -> bool:
    """True on a ROCm build of torch, where ``tensor.is_cuda`` is also true (HIP masquerades as
    CUDA) but the Triton backend is AMD's: no TF32, other compile rules."""
    return torch.version.hip is not None


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


#: entry points whose Triton kernel failed to compile in this process (they stay on torch)
_COMPILE_FAILED: set[str] = set()


def _is_compile_failure(exc: BaseException) -> bool:
    """Errors Triton raises while compiling (before anything is launched), never launch errors."""
    try:
        from triton.compiler.errors import CompilationError
        from triton.runtime.errors import OutOfResources, PTXASError
    except Exception:  # pragma: no cover - triton layout changed
        return False
    if isinstance(exc, (CompilationError, PTXASError, OutOfResources)):
        return True
    # MLIR pass failures in the backend (e.g. an unsupported dot on one GPU architecture)
    return isinstance(exc, RuntimeError) and "PassManager" in str(exc)


def triton_or_torch(name: str, fast: Callable[[], T], reference: Callable[[], T]) -> T:
    """Run the Triton path ``fast``; if its kernel fails to *compile* on this device, warn once and
    run (now and from then on) the torch ``reference`` instead of raising in the middle of training.

    Only compile failures are caught: they happen before any launch, so in-place outputs are
    untouched and the reference starts from the same state. Runtime errors propagate.
    """
    if name in _COMPILE_FAILED:
        return reference()
    try:
        return fast()
    except Exception as exc:
        if not _is_compile_failure(exc):
            raise
        _COMPILE_FAILED.add(name)
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
        warnings.warn(
            f"lrgrad.kernels.{name}: the Triton kernel failed to compile on this device "
            f"({type(exc).__name__}: {first}); using the torch path for {name} from now on",
            RuntimeWarning, stacklevel=3,
        )
        return reference()
