"""Which precision Newton–Schulz iterates in: the ``ns_dtype`` option and native-bf16 detection.

Muon's reference code and ``torch.optim.Muon`` run the quintic iteration in bf16: the
coefficients already trade accuracy for speed (singular values land in about [0.68, 1.13]), and
bf16 products run at 2× (CPU with bf16 dot products) to 8×+ (GPU tensor cores) fp32's rate.
Where bf16 is *emulated* (x86 CPUs without AVX512-BF16/AMX, CUDA GPUs before sm_80) bf16 GEMMs
are no faster than fp32, or slower, and only the rounding remains; ``"auto"`` keeps fp32 there.

``ns_dtype`` values (a rule option; strings, so they round-trip through a state dict):

* ``"auto"`` (default): bf16 where bf16 GEMMs are native (:func:`native_bf16_matmul`), the
  input's dtype otherwise; fp64 inputs always stay fp64 (fp64 params ask for exact arithmetic);
* ``"bf16"``: bf16 iterates everywhere (torch.optim.Muon's choice, also on emulating hardware);
* ``"fp32"``: fp32 iterates (fp64 inputs stay fp64).

``torch.bfloat16`` / ``torch.float32`` are accepted as aliases of ``"bf16"`` / ``"fp32"``.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path
from typing import Any

import torch

NS_DTYPES: tuple[str, ...] = ("auto", "bf16", "fp32")
_ALIASES: dict[Any, str] = {torch.bfloat16: "bf16", torch.float32: "fp32"}
#: x86 CPU flags of native bf16 dot products (AVX512-BF16's vdpbf16ps, AMX's tdpbf16ps)
X86_BF16_FLAGS: tuple[str, ...] = ("avx512_bf16", "amx_bf16")
#: the aarch64 feature of the BFDOT/BFMMLA instructions (Armv8.6 BF16)
ARM_BF16_FEATURE = "bf16"


def check_ns_dtype(value: Any, name: str = "ns_dtype") -> str:
    """The canonical name (``"auto"``, ``"bf16"``, ``"fp32"``) of an ``ns_dtype`` value, or a clear error."""
    if isinstance(value, torch.dtype):
        if value not in _ALIASES:
            raise ValueError(f"Invalid {name}: {value}; expected one of {NS_DTYPES} (or torch.bfloat16, "
                             "torch.float32)")
        return _ALIASES[value]
    if not isinstance(value, str):
        raise TypeError(f"Invalid {name}: expected one of {NS_DTYPES}, got {type(value).__name__}")
    if value not in NS_DTYPES:
        raise ValueError(f"Invalid {name}: {value!r}; expected one of {NS_DTYPES}")
    return value


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The CPU's feature flags as Linux lists them (x86 ``flags``, aarch64 ``Features``); empty
    where /proc/cpuinfo does not exist (macOS, Windows)."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        try:
            cpuinfo = path.read_text(errors="replace")
        except OSError:
            return frozenset()
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return frozenset(flags)


def cpu_has_native_bf16(flags: frozenset[str] | None = None, machine: str | None = None) -> bool:
    """Whether this CPU computes bf16 dot products natively (so torch's bf16 GEMM beats fp32's).

    x86: AVX512-BF16 or AMX-BF16 (torch's own ``torch.cpu._is_avx512_bf16_supported`` /
    ``_is_amx_tile_supported`` when they exist, the /proc/cpuinfo flags otherwise); aarch64: the
    ``bf16`` feature. Anything else: no.
    """
    machine = (machine or platform.machine()).lower()
    if flags is None:
        probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        if machine in ("x86_64", "amd64") and any(probes):
            return any(bool(probe()) for probe in probes if probe is not None)
        flags = cpu_flags()
    if machine in ("x86_64", "amd64", "i686", "x86"):
        return any(f in flags for f in X86_BF16_FLAGS)
    if machine in ("aarch64", "arm64"):
        return ARM_BF16_FEATURE in flags
    return False


@functools.cache
def _cpu_native_bf16() -> bool:
    return cpu_has_native_bf16()


def native_bf16_matmul(device: torch.device | str) -> bool:
    """Whether bf16 matrix products are native on ``device``: CUDA sm_80+ (and ROCm GPUs that report
    bf16), CPUs with bf16 dot products (:func:`cpu_has_native_bf16`, cached per process)."""
    device = torch.device(device)
    if device.type == "cuda":
        if torch.version.hip is not None:
            return bool(torch.cuda.is_bf16_supported())
        return torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == "cpu":
        return _cpu_native_bf16()
    return False


def resolve_ns_dtype(ns_dtype: Any, like: torch.Tensor) -> torch.dtype:
    """The dtype Newton–Schulz iterates in for ``like`` (the momentum matrix) under ``ns_dtype``."""
    name = check_ns_dtype(ns_dtype)
    if like.dtype == torch.float64 and name != "bf16":
        return torch.float64
    if name == "bf16" or (name == "auto" and native_bf16_matmul(like.device)):
        return torch.bfloat16
    return torch.float32


def describe_cpu() -> str:
    """``"<lscpu model name>, bf16 GEMMs native|emulated (<flags>)"``: what every results page prints."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.lower().startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    model = model or platform.processor() or platform.machine()
    native = _cpu_native_bf16()
    seen = sorted(cpu_flags() & {*X86_BF16_FLAGS, ARM_BF16_FEATURE})
    return f"{model}, bf16 GEMMs {'native' if native else 'emulated'} ({', '.join(seen) or 'no bf16 flags'})"
