"""Ahead-of-time compile of every kernel launch for real GPU targets (no GPU needed).

``python -m lrgrad_experiments.tools.aot --set ci`` runs once per session (in a subprocess: the kernels must
be compiled, not interpreted, and ``triton.jit`` decides that at import time): Triton's compiler
down to cubin for sm_90 and sm_80 through the ptxas bundled in the triton wheel, and down to hsaco
for gfx90a (ROCm) for the GEMMs. The full set is ``python -m lrgrad_experiments.tools.aot`` (docs/kernels.md).

Grouped on one xdist worker (``--dist loadgroup`` in the Makefile) so the compile runs once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from lrgrad_experiments.tools import aot

pytestmark = pytest.mark.xdist_group("aot")

CUDA_ARCHS = ("sm_90", "sm_80")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = tmp_path_factory.mktemp("aot") / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", str(aot.__file__), "--set", "ci", "--json", str(path)],
        env=env, capture_output=True, text=True, timeout=1200, cwd=path.parent,
    )
    assert path.exists(), f"the AOT compile did not finish (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    data = json.loads(path.read_text())
    data["returncode"], data["stdout"] = proc.returncode, proc.stdout
    return data


def _results(report, kernel=None, arch=None, case=None):
    return [r for r in report["results"]
            if (kernel is None or r["kernel"] == kernel) and (arch is None or r["arch"] == arch)
            and (case is None or case in r["case"])]


def test_every_kernel_compiles_to_cubin_for_sm90_and_sm80(report, record_property):
    assert report["problems"] == [], "\n".join(report["problems"])
    assert report["returncode"] == 0, report["stdout"][-3000:]
    # every *_kernel of lrgrad.kernels was launched by the dispatch code and compiled for both targets
    assert set(report["kernels"]) == set(report["all_kernels"]) and len(report["all_kernels"]) >= 10
    for arch in CUDA_ARCHS:
        compiled = {r["kernel"] for r in _results(report, arch=arch) if r["ok"] and r["stage"] == "cubin"}
        assert compiled == set(report["all_kernels"]), arch
    cuda = [r for r in report["results"] if r["arch"] in CUDA_ARCHS]
    assert all(r["registers"] is not None and r["spill_bytes"] is not None for r in cuda), "ptxas log not parsed"
    summary = (f"{len(report['results'])} compiles of {len(report['kernels'])} kernels "
               f"({len(cuda)} to cubin for {'/'.join(CUDA_ARCHS)}, "
               f"{len(report['results']) - len(cuda)} to hsaco for gfx90a) in {report['seconds']:.0f} s; "
               f"max {max(r['registers'] for r in cuda)} registers, "
               f"max {max(r['spill_bytes'] for r in cuda)} B spills/thread, "
               f"max {max(r['shared_bytes'] for r in cuda)} B shared")
    record_property("aot_summary", summary)


def test_shared_memory_within_each_target(report):
    for r in report["results"]:
        assert r["shared_bytes"] <= aot.SHARED_LIMIT[r["arch"]], r


def test_16bit_gemms_use_ieee_dot_native_mma_and_compile_for_rocm(report):
    # fix 3: input_precision="tf32" on bf16 operands does not compile for gfx90a; "ieee" is the
    # same native bf16 MMA on NVIDIA (mma.sync on sm_80, wgmma on sm_90)
    for kernel in ("_gemm_epilogue_kernel", "_syrk_kernel"):
        bf16 = _results(report, kernel=kernel, case="/bf16/")
        assert bf16 and all("PRECISION=ieee" in r["constexprs"] for r in bf16)
        for arch in CUDA_ARCHS:
            assert all(r["mma"] > 0 for r in _results(report, kernel=kernel, arch=arch, case="/bf16/")), arch
        rocm = _results(report, kernel=kernel, arch="gfx90a")
        assert rocm and all(r["ok"] and r["stage"] == "hsaco" for r in rocm)
        # on ROCm even fp32 with TF32 allowed takes "ieee" (AMD's backend has no TF32)
        assert all("PRECISION=ieee" in r["constexprs"] for r in rocm)
    # fp32 operands with TF32 allowed do use the TF32 tensor cores on NVIDIA
    tf32 = _results(report, kernel="_gemm_epilogue_kernel", arch="sm_90", case="fp32-tf32")
    assert tf32 and all("PRECISION=tf32" in r["constexprs"] and r["mma"] > 0 for r in tf32)


def test_no_fma_contraction_where_one_rounding_is_promised(report):
    # fix 5: the quantizers and the Adam direction are launched with enable_fp_fusion=False
    for kernel in aot.NO_CONTRACTION:
        for arch in CUDA_ARCHS:
            found = _results(report, kernel=kernel, arch=arch)
            assert found and all(r["fma"] == 0 for r in found), (kernel, arch)
    # the detector works: the GEMM epilogue (contraction allowed, error bound promised) has FMAs
    assert all(r["fma"] > 0 for r in _results(report, kernel="_gemm_epilogue_kernel", arch="sm_90"))


def test_mixed_dtype_gemm_does_not_spill(report):
    # fix 6: fp32 × bf16 operands are cast to fp32 on the host; upcasting in-kernel made the
    # 128×128 IEEE config spill 20–25 KB per thread
    for arch in CUDA_ARCHS:
        mixed = _results(report, kernel="_gemm_epilogue_kernel", arch=arch, case="mixed-fp32xbf16")
        assert {r["case"].split("/")[2] for r in mixed} == {"tile64", "tile128"}
        assert all(r["ok"] and r["spill_bytes"] == 0 and "UPCAST=False" in r["constexprs"] for r in mixed), mixed


def test_problems_flags_every_kind_of_failure():
    # the checker itself, on synthetic results (no compile)
    ok = dict(case="c", arch="sm_90", ok=True, stage="cubin", registers=32, spill_bytes=0, shared_bytes=0, fma=0)
    results = [
        aot.Result(kernel="_gemm_epilogue_kernel", **ok),
        aot.Result(kernel="_syrk_kernel", **{**ok, "ok": False, "stage": "failed", "error": "CompilationError: x"}),
        aot.Result(kernel="_scale_kernel", **{**ok, "shared_bytes": aot.SHARED_LIMIT["sm_90"] + 1}),
        aot.Result(kernel="_auon_partials_kernel", **{**ok, "spill_bytes": aot.SPILL_LIMIT + 1}),
        aot.Result(kernel="_adam_direction_kernel", **{**ok, "fma": 3}),
    ]
    exercised = set(aot.all_kernels()) - {"_stochastic_round_kernel"}
    found = "\n".join(aot.problems(results, exercised))
    assert "_gemm_epilogue_kernel" not in found
    for needle in ("_syrk_kernel [c] on sm_90: compile failed", "_scale_kernel [c] on sm_90: 232449 B shared",
                   "_auon_partials_kernel [c] on sm_90: 65 B of register spills",
                   "_adam_direction_kernel [c] on sm_90: 3 fma", "_stochastic_round_kernel: never launched"):
        assert needle in found, found
