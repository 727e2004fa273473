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
    """Whether the CPU has bf16 dot products (AVX512-BF16 or AMX); without them bf16 GEMMs are emulated."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def describe() -> str:
    """`CPU <model> (bf16 GEMMs native|emulated), N cores, T torch threads, torch X[, GPU <name>]`."""
    parts = [f"CPU {cpu_model()} (bf16 GEMMs {'native' if bf16_native() else 'emulated'})",
             f"{os.cpu_count()} cores", f"{torch.get_num_threads()} torch threads", f"torch {torch.__version__}"]
    if torch.cuda.is_available():
        parts.append(f"GPU {torch.cuda.get_device_name()}")
    return ", ".join(parts)
