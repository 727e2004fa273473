"""Benchmark the Triton kernels of ``lrgrad.kernels`` against their torch reference paths (CUDA only).

    python experiments/bench/bench_kernels.py [--size 4096] [--rank 512] [--peak-tbps auto] [--json out.json]

Times each operation with ``triton.testing.do_bench`` (median ms) on both backends and prints a
markdown table: time, achieved TB/s for the memory-bound kernels (bytes the kernel must move,
the same numerator for both backends) and TFLOP/s for the matmul kernels (the FLOPs of the plain
formulation, so the symmetric kernel's saved FLOPs show up as speed). Without CUDA it prints a
message and exits 0.

Goals (issues 6 and 16, H100/H200): fused projection+update ≥ 1.2× torch at 4096², r = 512;
Newton–Schulz ≥ 1.3× torch at 4096 (bf16); quantization kernels ≥ 70 % of peak memory bandwidth.
The ``goal`` column says whether each row meets its goal. ``--peak-tbps auto`` looks the peak HBM
bandwidth up from the device name (H200 4.8, H100 SXM 3.35, H100 PCIe 2.0, A100 80GB 2.0, A100 40GB 1.55).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

import torch


def _bench(fn: Callable[[], object]) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


#: peak HBM bandwidth (TB/s) by a substring of torch.cuda.get_device_name(), most specific first
PEAK_TBPS = (("H200", 4.8), ("H100 PCIe", 2.0), ("H100", 3.35), ("A100-SXM4-80GB", 2.04), ("A100 80GB", 2.0),
             ("A100", 1.55), ("L40S", 0.864), ("A10", 0.6))
#: speedup goals by operation prefix; quantization rows: share of peak bandwidth instead
SPEEDUP_GOALS = {"lowrank_update_": 1.2, "newton_schulz": 1.3}
BANDWIDTH_GOAL = 0.70


def peak_bandwidth(name: str) -> float | None:
    """Peak HBM bandwidth of a device by name, or None when unknown."""
    return next((tbps for key, tbps in PEAK_TBPS if key in name), None)


def goal(op: str, speedup: float, share_of_peak: float | None) -> str:
    """'met (…)' / 'MISSED (…)' against the goal for ``op``, or '' when none applies."""
    for prefix, target in SPEEDUP_GOALS.items():
        if op.startswith(prefix):
            return f"{'met' if speedup >= target else 'MISSED'} (≥ {target:.1f}×)"
    if "quantize" in op or "stochastic_round" in op:
        if share_of_peak is None:
            return "unknown peak"
        return f"{'met' if share_of_peak >= BANDWIDTH_GOAL else 'MISSED'} (≥ {BANDWIDTH_GOAL:.0%} BW)"
    return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=4096, help="m = n of the matrices (default 4096)")
    parser.add_argument("--rank", type=int, default=512, help="projection rank r (default 512)")
    parser.add_argument("--peak-tbps", default="auto",
                        help="peak memory bandwidth (TB/s) for the %%-of-peak column; auto: from the device name")
    parser.add_argument("--json", default=None, help="also write the rows (with goal verdicts) here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA device; the Triton kernels are benchmarked on GPUs only "
              "(run this script on a CUDA machine; CPU correctness is covered by tests/kernels).")
        return 0
    try:
        import triton
    except ImportError:
        print("bench_kernels: triton is not installed (pip install triton); nothing to benchmark.")
        return 0

    if os.environ.get("TRITON_INTERPRET") == "1":
        print("bench_kernels: unset TRITON_INTERPRET to benchmark compiled kernels.")
        return 0

    from lrgrad import quant as qref
    from lrgrad.kernels import reference, triton_normalize, triton_projection, triton_quant
    from lrgrad.kernels import triton_newton_schulz as tns
    from lrgrad.kernels.newton_schulz import newton_schulz_reference
    from lrgrad.kernels.normalize import auon_normalize_reference

    torch.manual_seed(0)
    dev = torch.device("cuda")
    n, r = args.size, args.rank
    rows: list[tuple[str, str, float, float, str, float]] = []  # (op, shape, torch ms, triton ms, unit, work)

    def add(op: str, shape: str, torch_fn, triton_fn, work: float, unit: str) -> None:
        t_ms, k_ms = _bench(torch_fn), _bench(triton_fn)
        rows.append((op, shape, t_ms, k_ms, unit, work))

    # ---------------------------------------------------------------- projection
    for dtype in (torch.float32, torch.bfloat16):
        param = torch.randn(n, n, device=dev, dtype=dtype)
        update = torch.randn(n, r, device=dev)
        basis = torch.randn(r, n, device=dev) / n**0.5
        add(f"lowrank_update_ (param {str(dtype)[6:]})", f"{n}x{n}, r={r}",
            lambda p=param, u=update, b=basis: reference.lowrank_update_(p, u, b, "right", -1e-3, 0.999),
            lambda p=param, u=update, b=basis: triton_projection.lowrank_update_(p, u, b, "right", -1e-3, 0.999),
            2.0 * n * n * r, "TFLOP/s")
    # bf16 param with bf16 factors: the native bf16 tensor-core path
    param, update, basis = (torch.randn(*s_, device=dev, dtype=torch.bfloat16) for s_ in ((n, n), (n, r), (r, n)))
    add("lowrank_update_ (param bf16, bf16 factors)", f"{n}x{n}, r={r}",
        lambda: reference.lowrank_update_(param, update, basis, "right", -1e-3, 0.999),
        lambda: triton_projection.lowrank_update_(param, update, basis, "right", -1e-3, 0.999),
        2.0 * n * n * r, "TFLOP/s")
    m_ = torch.zeros(r, n, device=dev)
    v_ = torch.zeros(r, n, device=dev)
    g_ = torch.randn(r, n, device=dev)
    u_ = torch.empty(r, n, device=dev)
    add("adam_direction_", f"{r}x{n}",
        lambda: reference.adam_direction_(m_, v_, g_, u_, 0.9, 0.999, 1e-8, 10),
        lambda: triton_projection.adam_direction_(m_, v_, g_, u_, 0.9, 0.999, 1e-8, 10),
        6.0 * 4 * r * n, "TB/s")

    # ---------------------------------------------------------------- Newton–Schulz, AuON
    x_ns = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    ns_flops = 5 * (2.0 * n * n * n + 2.0 * n * n * n + 2.0 * n * n * n)  # X Xᵀ, A·A, B·X per step
    add("newton_schulz (bf16, 5 steps)", f"{n}x{n}",
        lambda: newton_schulz_reference(x_ns), lambda: tns.newton_schulz(x_ns, 5, (3.4445, -4.7750, 2.0315), 1e-7),
        ns_flops, "TFLOP/s")
    x_au = torch.randn(n, n, device=dev)
    add("auon_normalize (fp32)", f"{n}x{n}",
        lambda: auon_normalize_reference(x_au), lambda: triton_normalize.auon_normalize(x_au, 1e-7, 1e-8),
        3.0 * 4 * n * n, "TB/s")  # the minimum: read twice (reduce, scale), write once

    # ---------------------------------------------------------------- quantization
    x_q = torch.randn(n * n, device=dev)
    numel = x_q.numel()
    add("quantize_int4 (g=256)", f"{n}x{n} fp32",
        lambda: qref.quantize_int4(x_q, 256), lambda: triton_quant.minmax_quantize(x_q, 256, int4=True),
        4.0 * numel + 0.5 * numel, "TB/s")
    packed, scale, zero = triton_quant.minmax_quantize(x_q, 256, int4=True)
    add("dequantize_int4 (g=256)", f"{n}x{n} fp32",
        lambda: qref.dequantize_int4(packed, scale, zero, (numel,), 256),
        lambda: triton_quant.minmax_dequantize(packed, scale, zero, numel, 256, True, torch.float32),
        0.5 * numel + 4.0 * numel, "TB/s")
    add("quantize_int8 stochastic (g=256)", f"{n}x{n} fp32",
        lambda: qref.quantize_int8(x_q, 256, True, 1),
        lambda: triton_quant.minmax_quantize(x_q, 256, int4=False, stochastic=True, seed=1),
        4.0 * numel + 1.0 * numel, "TB/s")
    add("quantize_blockwise_8bit (b=256)", f"{n}x{n} fp32",
        lambda: qref.quantize_blockwise_8bit(x_q, 256), lambda: triton_quant.blockwise_quantize(x_q, 256, True),
        4.0 * numel + 1.0 * numel, "TB/s")
    codes, absmax = triton_quant.blockwise_quantize(x_q, 256, True)
    add("dequantize_blockwise_8bit (b=256)", f"{n}x{n} fp32",
        lambda: qref.dequantize_blockwise_8bit(codes, absmax, None, 256, True),
        lambda: triton_quant.blockwise_dequantize(codes, absmax, numel, 256, True, torch.float32),
        1.0 * numel + 4.0 * numel, "TB/s")

    name = torch.cuda.get_device_name()
    peak_tbps = peak_bandwidth(name) if args.peak_tbps == "auto" else float(args.peak_tbps)
    print(f"GPU: {name} · torch {torch.__version__} · triton {triton.__version__} · "
          f"peak bandwidth {peak_tbps if peak_tbps else 'unknown'} TB/s\n")
    print("| operation | shape | torch ms | triton ms | speedup | torch | triton | % of peak BW | goal |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    records = []
    for op, shape, t_ms, k_ms, unit, work in rows:
        rate_t, rate_k = work / (t_ms * 1e-3) / 1e12, work / (k_ms * 1e-3) / 1e12
        share = rate_k / peak_tbps if unit == "TB/s" and peak_tbps else None
        verdict = goal(op, t_ms / k_ms, share)
        peak = f"{100 * share:.0f} %" if share is not None else ""
        print(f"| {op} | {shape} | {t_ms:.3f} | {k_ms:.3f} | {t_ms / k_ms:.2f}x | "
              f"{rate_t:.2f} {unit} | {rate_k:.2f} {unit} | {peak} | {verdict} |")
        records.append({"op": op, "shape": shape, "torch_ms": t_ms, "triton_ms": k_ms, "speedup": t_ms / k_ms,
                        "unit": unit, "triton_rate": rate_k, "share_of_peak": share, "goal": verdict})
    met = sum(r["goal"].startswith("met") for r in records)
    judged = sum(r["goal"].startswith(("met", "MISSED")) for r in records)
    print(f"\ngoals met: {met}/{judged}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": name, "peak_tbps": peak_tbps, "rows": records}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
