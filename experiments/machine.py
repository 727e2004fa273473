"""One line that names the machine a measurement came from (a ratio from one CPU is not a ratio from another)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, else what platform reports)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def bf16_native() -> bool:
    """Whether the CPU has bf16 dot products (AVX512-BF16 or AMX; aarch64 BF16); without them bf16 GEMMs are
    emulated. The same test that picks Muon's Newton–Schulz precision (``ns_dtype="auto"``)."""
    from lrgrad.kernels.precision import native_bf16_matmul

    return native_bf16_matmul("cpu")


def describe() -> str:
    """`CPU <model> (bf16 GEMMs native|emulated), N cores, T torch threads, torch X[, GPU <name>]`."""
    parts = [f"CPU {cpu_model()} (bf16 GEMMs {'native' if bf16_native() else 'emulated'})",
             f"{os.cpu_count()} cores", f"{torch.get_num_threads()} torch threads", f"torch {torch.__version__}"]
    if torch.cuda.is_available():
        parts.append(f"GPU {torch.cuda.get_device_name()}")
    return ", ".join(parts)
