"""Ahead-of-time compile of every Triton launch the dispatch code makes, for real GPU targets,
with no GPU: Triton's own compiler (TTIR → TTGIR → LLIR → PTX → cubin through the ``ptxas``
bundled in the triton wheel; AMDGCN → hsaco for ROCm targets).

    python -m lrgrad_experiments.tools.aot [--set ci|full] [--arch sm_90 sm_80 gfx90a] [--json out.json]

How the launches are found: this module drives the *public* entry points (``lrgrad.kernels.*``)
on CPU tensors, with the backend forced to Triton and ``JITFunction.run`` replaced by a recorder
that computes exactly the specialization the JIT would (argument types, ``tt.divisibility``
attributes, constexprs, ``num_warps``/``num_stages``/``enable_fp_fusion``) and launches nothing.
The recorded launches are then compiled for each target. It must run in a process where
``TRITON_INTERPRET`` is unset (``triton.jit`` decides at import time whether a kernel is
interpreted), which is why the CI test runs it in a subprocess.

What it checks: every launch compiles; shared memory fits the target; register spills stay under
``SPILL_LIMIT``; kernels that promise one rounding per operation have no ``fma`` in their PTX; every
``*_kernel`` in ``lrgrad.kernels`` was exercised. It reports registers, spills, shared memory and
tensor-core instructions per compile. What it cannot check: numerics and speed on hardware (see
``experiments/tools/gpu_check.py``).

Sets: ``ci`` is one launch per kernel × dtype × tile family (fast enough for ``make test``);
``full`` adds both sides, unaligned shapes, TF32 on/off, every group size family.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

import torch

#: max dynamic shared memory per block (opt-in), bytes
SHARED_LIMIT = {"sm_90": 232448, "sm_80": 166912, "gfx90a": 65536}
DEFAULT_ARCHS = ("sm_90", "sm_80", "gfx90a")
#: register spills tolerated per thread (bytes): ptxas spills a word or two in some prologues
#: (8 B in the sm_80 64×64 syrk); a config that spills a tile (KBs) fails the check
SPILL_LIMIT = 64
#: kernels that promise one rounding per operation (no FMA contraction): their PTX must hold no fma
NO_CONTRACTION = ("_adam_direction_kernel", "_minmax_quant_kernel", "_minmax_dequant_kernel",
                  "_blockwise_quant_kernel", "_blockwise_dequant_kernel", "_stochastic_round_kernel")


@dataclasses.dataclass
class Launch:
    """One recorded launch: enough to compile it again for any target."""

    case: str
    kernel: str
    fn: object = dataclasses.field(repr=False)
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict

    def key(self) -> str:
        """The JIT's cache identity: one compile per distinct key."""
        return json.dumps([self.kernel, self.signature, sorted(map(str, self.constexprs.items())),
                           sorted(map(str, self.attrs.items())), sorted(self.options.items())])


@dataclasses.dataclass
class Result:
    case: str
    kernel: str
    arch: str
    ok: bool
    stage: str  # deepest artifact produced: cubin / hsaco (or the failing stage's error)
    registers: int | None = None
    spill_bytes: int | None = None  # spill stores + spill loads reported by ptxas
    stack_bytes: int | None = None
    shared_bytes: int | None = None
    fma: int | None = None  # fp32 fma instructions in the PTX (contraction check)
    mma: int | None = None  # tensor-core instructions in the PTX (mma.sync on sm_80, wgmma on sm_90)
    seconds: float = 0.0
    error: str = ""
    constexprs: str = ""


# ----------------------------------------------------------------------------- the launch cases
def _gemm_case(m: int, n: int, r: int, side: str, dtypes: tuple, tf32: bool) -> Callable[[], None]:
    def run() -> None:
        from lrgrad import kernels

        param_dtype, update_dtype, basis_dtype = dtypes
        torch.backends.cuda.matmul.allow_tf32 = tf32
        param = torch.zeros(m, n, dtype=param_dtype)
        if side == "right":
            update, basis = torch.zeros(m, r, dtype=update_dtype), torch.zeros(r, n, dtype=basis_dtype)
        else:
            update, basis = torch.zeros(r, n, dtype=update_dtype), torch.zeros(m, r, dtype=basis_dtype)
        kernels.lowrank_update_(param, update, basis, side, alpha=-1e-3, decay=0.999)

    return run


def _newton_schulz_case(m: int, n: int, dtype: torch.dtype, tf32: bool) -> Callable[[], None]:
    def run() -> None:
        from lrgrad import kernels

        torch.backends.cuda.matmul.allow_tf32 = tf32
        kernels.newton_schulz(torch.ones(m, n, dtype=dtype), steps=1)

    return run


def _adam_case(shape: tuple, dtype: torch.dtype, out_dtype: torch.dtype) -> Callable[[], None]:
    def run() -> None:
        from lrgrad import kernels

        m, v, g = (torch.zeros(shape, dtype=dtype) for _ in range(3))
        kernels.adam_direction_(m, v, g, 0.9, 0.999, 1e-8, 1, out=torch.empty(shape, dtype=out_dtype))

    return run


def _auon_case(shape: tuple, dtype: torch.dtype) -> Callable[[], None]:
    def run() -> None:
        from lrgrad import kernels

        kernels.auon_normalize(torch.ones(shape, dtype=dtype))

    return run


def _channel_scale_case(shape: tuple, dtype: torch.dtype) -> Callable[[], None]:
    """APOLLO/Fira's channel passes: the sums of squares (with Fira's residual base) and the update."""

    def run() -> None:
        from lrgrad import kernels

        grad, base = torch.ones(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)
        kernels.channel_sumsq(grad, base, channel_dim=1)
        scales = torch.ones(shape[0], dtype=torch.float32)
        kernels.channel_scale_update_(torch.zeros(shape, dtype=dtype), grad, scales, 0, alpha=-1.0, decay=1.0)

    return run


def _quant_case(numel: int, group: int, dtype: torch.dtype, kinds: tuple[str, ...]) -> Callable[[], None]:
    def run() -> None:
        from lrgrad import kernels

        x = torch.ones(numel, dtype=dtype)
        if "int4" in kinds:
            packed, scale, zero = kernels.quantize_int4(x, group)
            kernels.dequantize_int4(packed, scale, zero, x.shape, group, dtype=dtype)
        if "int8" in kinds or "int8_sr" in kinds:
            codes, scale, zero = kernels.quantize_int8(x, group, stochastic="int8_sr" in kinds, seed=1)
            kernels.dequantize_int8(codes, scale, zero, x.shape, group, dtype=dtype)
        for signed in (True, False):
            if ("blockwise_signed" if signed else "blockwise_unsigned") in kinds:
                codes, absmax = kernels.quantize_blockwise_8bit(x, group, signed=signed)
                kernels.dequantize_blockwise_8bit(codes, absmax, x.shape, group, signed=signed, dtype=dtype)
        if "round" in kinds:
            kernels.stochastic_round(x, seed=1)

    return run


_F32, _BF16, _F16 = torch.float32, torch.bfloat16, torch.float16
_ALL_QUANT = ("int4", "int8", "int8_sr", "blockwise_signed", "blockwise_unsigned", "round")


def cases(which: str) -> dict[str, Callable[[], None]]:
    """Named launch drivers. ``ci``: one per kernel × dtype × tile family; ``full``: everything."""
    if which not in ("ci", "full"):
        raise ValueError(f"Invalid which: {which!r}; expected 'ci' or 'full'")
    out: dict[str, Callable[[], None]] = {}
    # lowrank_update_ dtype combos (param, update, basis) the optimizers produce, and the TF32 setting
    # under which dispatch sends them to Triton (all-fp32 without TF32 stays on cuBLAS).
    gemm_dtypes = {
        "bf16": ((_BF16, _BF16, _BF16), False), "fp32-tf32": ((_F32, _F32, _F32), True),
        "bf16param-fp32ops": ((_BF16, _F32, _F32), False), "mixed-fp32xbf16": ((_F32, _F32, _BF16), False),
    }
    if which == "full":
        gemm_dtypes |= {
            "fp16": ((_F16, _F16, _F16), False),
            "bf16param-fp32ops-tf32": ((_BF16, _F32, _F32), True), "mixed-fp32xbf16-tf32": ((_F32, _F32, _BF16), True),
            "mixed-bf16xfp32": ((_F32, _BF16, _F32), False), "fp16param-fp32ops": ((_F16, _F32, _F32), False),
        }
    families = {"tile64": (192, 256, 32), "tile128": (1024, 768, 128)}
    if which == "full":
        families |= {"tile64-unaligned": (37, 200, 5), "tile128-unaligned": (1000, 777, 100)}
    for fam, (m, n, r) in families.items():
        for name, (dtypes, tf32) in gemm_dtypes.items():
            for side in ("right", "left") if which == "full" else ("right",):
                out[f"lowrank_update_/{name}/{fam}/{side}"] = _gemm_case(m, n, r, side, dtypes, tf32)
    ns_families = {"tile64": (128, 384), "tile128": (512, 1024)}
    if which == "full":
        ns_families |= {"tile64-tall": (300, 100), "tile128-unaligned": (333, 1001)}
    ns_dtypes = {"bf16": (_BF16, False), "fp32-tf32": (_F32, True)}
    if which == "full":
        ns_dtypes["fp16"] = (_F16, False)
    for fam, (m, n) in ns_families.items():
        for name, (dtype, tf32) in ns_dtypes.items():
            out[f"newton_schulz/{name}/{fam}"] = _newton_schulz_case(m, n, dtype, tf32)
    adam = {"fp32": (_F32, _F32), "bf16": (_BF16, _BF16)}
    if which == "full":
        adam |= {"fp16": (_F16, _F16), "fp32-out-bf16": (_F32, _BF16)}
    for name, (dtype, out_dtype) in adam.items():
        out[f"adam_direction_/{name}"] = _adam_case((256, 1024), dtype, out_dtype)
    for name, dtype in {"fp32": _F32, "bf16": _BF16, **({"fp16": _F16} if which == "full" else {})}.items():
        out[f"auon_normalize/{name}"] = _auon_case((512, 1024), dtype)
        out[f"channel_scale/{name}"] = _channel_scale_case((512, 1024), dtype)
    if which == "ci":  # each quantizer variant once, spread over the dtypes and chunk families
        out["quant/int4+blockwise-signed+round/fp32/chunk256"] = _quant_case(
            64 * 256, 256, _F32, ("int4", "blockwise_signed", "round"))
        out["quant/int8-stochastic+blockwise-unsigned+round/bf16/chunk256"] = _quant_case(
            64 * 256, 256, _BF16, ("int8_sr", "blockwise_unsigned", "round"))
        out["quant/int8+blockwise-signed/fp32/chunk1024"] = _quant_case(
            64 * 4096, 4096, _F32, ("int8", "blockwise_signed"))
        return out
    groups = {"chunk256": 256, "chunk1024": 4096, "chunk128": 128, "chunk-odd": 6, "chunk2048-unaligned": 2000}
    for fam, group in groups.items():
        for name, dtype in {"fp32": _F32, "bf16": _BF16, "fp16": _F16}.items():
            out[f"quant/{name}/{fam}"] = _quant_case(64 * group + (3 if "unaligned" in fam else 0), group, dtype,
                                                      _ALL_QUANT)
    return out


# ----------------------------------------------------------------------------- recording
def _check_compiled_mode() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("the AOT build needs compiled (not interpreted) kernels: unset TRITON_INTERPRET")


@contextlib.contextmanager
def _recording(into: list[Launch], case: list[str], rocm: bool) -> Iterator[None]:
    """Force the Triton backend on CPU tensors and record launches instead of running them.
    ``rocm``: make dispatch believe it runs on a ROCm build of torch (its launches differ)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    # newton_schulz and auon_normalize look backend_for up in dispatch at call time; projection and
    # quantization imported the name, so it is replaced there too
    from lrgrad.kernels import channel_scale, dispatch, projection, quantization, triton_matmul

    backend = make_backend(GPUTarget("cuda", 90, 32))
    binders: dict[int, Callable] = {}

    def record(self, *args, grid, warmup, **kwargs):  # noqa: ARG001 - JITFunction.run's signature
        binder = binders.setdefault(id(self), create_function_from_signature(self.signature, self.params, backend))
        bound_args, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound_args, specialization, options)
        launch_options = {k: v for k, v in kwargs.items() if k in ("num_warps", "num_stages", "enable_fp_fusion")}
        into.append(Launch(case[0], self.fn.__name__, self, signature, constexprs, attrs, launch_options))

    saved = (JITFunction.run, dispatch.backend_for, projection.backend_for, quantization.backend_for,
             channel_scale.backend_for, triton_matmul.is_rocm, torch.backends.cuda.matmul.allow_tf32)
    forced = lambda tensor: "triton"  # noqa: E731
    JITFunction.run = record
    dispatch.backend_for = projection.backend_for = quantization.backend_for = channel_scale.backend_for = forced
    triton_matmul.is_rocm = lambda: rocm
    try:
        yield
    finally:
        (JITFunction.run, dispatch.backend_for, projection.backend_for, quantization.backend_for,
         channel_scale.backend_for, triton_matmul.is_rocm, torch.backends.cuda.matmul.allow_tf32) = saved


def record_launches(which: str = "ci", rocm: bool = False) -> list[Launch]:
    """Run every case's entry points and return the distinct launches (first case that made each)."""
    _check_compiled_mode()
    launches: list[Launch] = []
    current = [""]
    with _recording(launches, current, rocm):
        for name, run in cases(which).items():
            current[0] = name
            run()
    if which == "ci":  # one launch per kernel and case (= kernel × dtype × tile family)
        firsts: dict[tuple[str, str], Launch] = {}
        for launch in launches:
            firsts.setdefault((launch.case, launch.kernel), launch)
        launches = list(firsts.values())
    unique: dict[str, Launch] = {}
    for launch in launches:
        unique.setdefault(launch.key(), launch)
    return list(unique.values())


def all_kernels() -> dict[str, object]:
    """Every launchable kernel of lrgrad.kernels (by convention named ``*_kernel``; the other
    ``@triton.jit`` functions are device helpers inlined into them)."""
    import importlib
    import pkgutil

    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    import lrgrad.kernels as pkg

    found = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.name.startswith("triton_"):
            continue
        module = importlib.import_module(f"lrgrad.kernels.{info.name}")
        for name, obj in vars(module).items():
            if isinstance(obj, (JITFunction, InterpretedFunction)) and name.endswith("_kernel"):
                found[name] = obj
    return found


# ----------------------------------------------------------------------------- compiling
_REGS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_STACK = re.compile(r"(\d+) bytes stack frame")


def _target(arch: str):
    from triton.backends.compiler import GPUTarget

    if arch.startswith("sm_"):
        return GPUTarget("cuda", int(arch[3:]), 32)
    if arch.startswith("gfx"):
        return GPUTarget("hip", arch, 64)
    raise ValueError(f"Invalid arch: {arch!r}; expected sm_XX or gfxXXX")


def compile_launch(launch: Launch, arch: str) -> Result:
    """Compile one recorded launch for ``arch``; registers/spills from the ptxas log (CUDA) or the
    kernel metadata (ROCm)."""
    import triton
    from triton import knobs
    from triton.compiler import ASTSource

    source = ASTSource(launch.fn, launch.signature, constexprs=launch.constexprs, attrs=launch.attrs)
    consts = ",".join(f"{launch.fn.arg_names[k[0]]}={v}" for k, v in launch.constexprs.items()
                      if launch.fn.arg_names[k[0]].isupper())
    result = Result(launch.case, launch.kernel, arch, ok=False, stage="", constexprs=consts)
    log = io.StringIO()
    start = time.perf_counter()
    saved = knobs.nvidia.dump_ptxas_log
    knobs.nvidia.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(source, target=_target(arch), options=dict(launch.options))
    except Exception as exc:  # report every failure, keep compiling the rest
        result.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        result.stage = "failed"
        return result
    finally:
        knobs.nvidia.dump_ptxas_log = saved
        result.seconds = time.perf_counter() - start
    result.ok = True
    result.stage = next((s for s in ("cubin", "hsaco") if s in compiled.asm), list(compiled.asm)[-1])
    result.shared_bytes = int(compiled.metadata.shared)
    if "ptx" in compiled.asm:
        ptx = compiled.asm["ptx"]
        result.fma = len(re.findall(r"\bfma\.rn\.f32\b", ptx))
        result.mma = len(re.findall(r"\b(?:mma\.sync|wgmma\.mma_async)\b", ptx))
    text = log.getvalue()
    if (m := _REGS.search(text)) is not None:
        result.registers = int(m.group(1))
    if (m := _SPILL.search(text)) is not None:
        result.spill_bytes = int(m.group(1)) + int(m.group(2))
    if (m := _STACK.search(text)) is not None:
        result.stack_bytes = int(m.group(1))
    return result


def compile_all(which: str, archs: list[str] | tuple[str, ...]) -> tuple[list[Launch], list[Result]]:
    """Record the launches (once as on CUDA, once as on ROCm when a gfx target is asked for) and
    compile each for every target of its platform. In the ``ci`` set, ROCm targets compile only
    the GEMM kernels (the ones whose constexprs differ there)."""
    launches: list[Launch] = []
    results: list[Result] = []
    for rocm in (False, True):
        targets = [a for a in archs if a.startswith("gfx") == rocm]
        if not targets:
            continue
        recorded = record_launches(which, rocm=rocm)
        if rocm and which == "ci":  # the GEMMs are what differs on ROCm (no TF32); one tile family
            recorded = [x for x in recorded
                        if x.kernel in ("_gemm_epilogue_kernel", "_syrk_kernel") and "tile128" in x.case]
        launches += recorded
        results += [compile_launch(launch, arch) for launch in recorded for arch in targets]
    return launches, results


def problems(results: list[Result], exercised: set[str]) -> list[str]:
    """Everything that fails the check: compile errors, shared memory over the limit, spills,
    kernels never exercised."""
    out = []
    for r in results:
        where = f"{r.kernel} [{r.case}] on {r.arch}"
        if not r.ok:
            out.append(f"{where}: compile failed: {r.error}")
            continue
        limit = SHARED_LIMIT.get(r.arch)
        if limit is not None and r.shared_bytes is not None and r.shared_bytes > limit:
            out.append(f"{where}: {r.shared_bytes} B shared memory > {limit} B limit")
        if r.spill_bytes is not None and r.spill_bytes > SPILL_LIMIT:
            out.append(f"{where}: {r.spill_bytes} B of register spills per thread (limit {SPILL_LIMIT} B)")
        if r.kernel in NO_CONTRACTION and r.fma:
            out.append(f"{where}: {r.fma} fma.rn.f32 in the PTX; this kernel promises no contraction")
    for name in sorted(set(all_kernels()) - exercised):
        out.append(f"{name}: never launched by any case (add a case that reaches it)")
    return out


def markdown(results: list[Result]) -> str:
    def cell(value: object) -> str:
        return "–" if value is None else str(value)

    lines = ["| kernel | case | constexprs | arch | stage | regs | spills (B) | shared (B) | mma | fma | s |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r.kernel} | {r.case} | {r.constexprs} | {r.arch} | {r.stage if r.ok else 'FAILED'} "
                     f"| {cell(r.registers)} | {cell(r.spill_bytes)} | {cell(r.shared_bytes)} | {cell(r.mma)} "
                     f"| {cell(r.fma)} | {r.seconds:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", dest="which", choices=("ci", "full"), default="full")
    parser.add_argument("--arch", nargs="+", default=list(DEFAULT_ARCHS))
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--keep-cache", action="store_true",
                        help="use Triton's normal cache (default: a fresh one, so ptxas runs and reports)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("aot: unset TRITON_INTERPRET (the kernels must be compiled, not interpreted)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="lrgrad-aot-") as cache:
        if not args.keep_cache:
            os.environ["TRITON_CACHE_DIR"] = cache
        start = time.perf_counter()
        launches, results = compile_all(args.which, args.arch)
        elapsed = time.perf_counter() - start
    found = problems(results, {launch.kernel for launch in launches})
    print(markdown(results))
    ok = sum(r.ok for r in results)
    print(f"\n{len(results)} compiles ({len({x.kernel for x in launches})} kernels, targets {' '.join(args.arch)}): "
          f"{ok} compiled in {elapsed:.0f} s; max registers {max((r.registers or 0) for r in results)}, "
          f"max spills {max((r.spill_bytes or 0) for r in results)} B/thread")
    for line in found:
        print(f"PROBLEM: {line}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"launches": len(launches), "kernels": sorted({x.kernel for x in launches}),
                       "all_kernels": sorted(all_kernels()), "results": [dataclasses.asdict(r) for r in results],
                       "problems": found, "seconds": elapsed}, fh, indent=1)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
