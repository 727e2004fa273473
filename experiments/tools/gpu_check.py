"""Validate a GPU box in one command (≈ 10 minutes of an H100/H200): ``make gpu-check``.

    python experiments/tools/gpu_check.py [--out results/gpu.md] [--budget-s 600]

Sections, each in its own subprocess with its own time limit (a failure is reported in the table
and the rest still runs):

  (a) tests   ``TRITON_INTERPRET=0 pytest -m cuda`` on ``CUDA_TEST_FILES``: the compiled
              kernels against the torch references at every dtype and tile family the dispatch uses
              (native bf16/fp16 MMA, TF32, the IEEE fp32 path), quantizer exactness, NaN semantics,
              no FMA contraction, the device guard (two GPUs); online PCA's batched basis step
              against the one-param-at-a-time step on the GPU; the fused Adam calls' step counts
              and a steady GaLoreAdamW step with no host sync (``set_sync_debug_mode("error")``).
  (b) bench   ``experiments/bench/bench_kernels.py --size 4096 --rank 512`` with the goals: fused low-rank
              update ≥ 1.2× torch, Newton–Schulz ≥ 1.3× torch at 4096², quantization ≥ 70 % of HBM.
  (b2) ns     Newton–Schulz (Muon's 5 quintic steps) with bf16 and fp32 iterates at 1024² and 4096²:
              ``lrgrad.kernels.newton_schulz(dtype=...)`` (bf16: the Triton syrk kernels; fp32: cuBLAS),
              the torch reference at the same precision and ``torch.optim.Muon``'s bf16 iteration: ms,
              TFLOP/s and bf16's speed-up over fp32 (Muon's ``ns_dtype``: docs/normalized.md).
  (c) step    a full training step (forward, backward, optimizer; bf16 autocast, batch 8 × 256) on
              LLaMA-130M and -350M shapes: median step time and ``torch.cuda.max_memory_allocated``
              for AdamW (fused), GaLoreAdamW, OnlineSubspaceAdamW, QGaLoreAdamW + INT8 weights and galore-torch's
              GaLoreAdamW (when ``galore_torch`` is installed).
  (d) train   300 steps of LLaMA-60M on the embedded corpus, AdamW vs GaLoreAdamW
              (``experiments/pretrain_llama.py``): validation losses at steps 100/200/300.

Writes ``results/gpu.md`` (machine, versions, commands, one table per section). On a machine
without CUDA it prints why and exits 0 without writing anything. Exits 1 when a section fails
(tests failing, a crash or a timeout); missed performance goals are reported, not failures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from lrgrad_experiments.paths import REPO as ROOT  # noqa: E402

STEP_CONFIGS = ("llama_130m", "llama_350m")
STEP_OPTIMIZERS = ("adamw_fused", "galore_adamw", "online_subspace_adamw", "qgalore_adamw_int8", "galore_torch")
#: seconds per section (sum ≈ 10 min); scaled down together when --budget-s is smaller
#: the GPU-only tests (marked ``cuda``): the compiled kernels, and optimizer steps whose batched torch ops
#: (bmm, batched Cholesky) take other library paths on a GPU than on the CPU
CUDA_TEST_FILES = ("tests/kernels/test_kernels_cuda.py", "tests/projectors/test_projector_online_pca_batched.py",
                   "tests/optim/test_step_counts.py")
LIMITS = {"tests": 200, "bench": 100, "ns": 40, "step": 130, "train": 130}
#: (b2): square sizes of the Newton–Schulz precision rows
NS_SIZES = ((1024, 1024), (4096, 4096))


def no_cuda_reason() -> str | None:
    """Why this machine cannot run the check, or None when it can."""
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "TRITON_INTERPRET=1 is set: the kernels must be compiled; unset it"
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the machine
        return f"triton does not import ({exc})"
    return None


def _run(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd`` from the repository root; never raises (timeouts and crashes are results)."""
    start = time.perf_counter()
    try:
        # PYTHONSAFEPATH: `python -m` from the root must not put the root (and its kernels/ folder,
        # which shadows Hugging Face's `kernels`) on the child's sys.path
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONSAFEPATH": "1", **(env or {})})
        code, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        code = "timeout"
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
    return {"cmd": " ".join(shlex.quote(c) for c in cmd), "returncode": code, "stdout": out, "stderr": err,
            "seconds": time.perf_counter() - start}


# ----------------------------------------------------------------------------- (c) step time + memory
def _build(name: str, config: str, seq: int, device: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from lrgrad_experiments.pretrain.configs import build_model, get_config
    from lrgrad_experiments.pretrain.optimizers import build_optimizer

    import lrgrad

    rank = get_config(config)["rank"]
    model = build_model(config, vocab_size=32000, max_seq_len=seq).to(device)
    if name == "adamw_fused":
        return model, build_optimizer("adamw", model, adamw_impl="fused")
    if name in ("galore_adamw", "online_subspace_adamw"):  # online PCA: its batched basis step on the GPU
        return model, build_optimizer(name, model, rank=rank)
    if name == "qgalore_adamw_int8":
        widths = [m.in_features for n, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
        group = 256
        while group > 1 and any(w % group for w in widths):
            group //= 2
        model = lrgrad.quantize_weights(model, bits=8, group_size=group)
        return model, build_optimizer("qgalore_adamw", model, rank=rank)
    if name == "galore_torch":
        from galore_torch import GaLoreAdamW  # optional: pip install galore-torch

        groups = lrgrad.param_groups(model, rank=rank)
        projected = [p for _, p in groups[0]["params"]]
        ids = {id(p) for p in projected}
        rest = [p for p in model.parameters() if id(p) not in ids]
        return model, GaLoreAdamW([{"params": rest},
                                   {"params": projected, "rank": rank, "update_proj_gap": 200, "scale": 0.25,
                                    "proj_type": "std"}], lr=1e-2, weight_decay=0.0)
    raise ValueError(f"Invalid optimizer: {name!r}; expected one of {STEP_OPTIMIZERS}")


def step_section(config: str, steps: int = 6, batch: int = 8, seq: int = 256,
                 device: str = "cuda") -> list[dict[str, Any]]:
    """Median full-step time and peak memory per optimizer, one after the other (``device="cpu"``
    only exercises the code: tests; the peak memory is then not measured)."""
    import torch.nn.functional as F

    cuda = device == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    rows = []
    for name in STEP_OPTIMIZERS:
        torch.manual_seed(0)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        row: dict[str, Any] = {"config": config, "optimizer": name}
        try:
            model, opt = _build(name, config, seq, device)
            ids = torch.randint(0, 32000, (batch, seq), device=device)
            times = []
            for _ in range(steps + 1):
                sync()
                t0 = time.perf_counter()
                with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
                    out = model(ids)
                    logits = out.logits if hasattr(out, "logits") else out
                    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                sync()
                times.append(time.perf_counter() - t0)
            row.update(first_step_s=times[0], step_s=statistics.median(times[1:]),
                       peak_bytes=torch.cuda.max_memory_allocated() if cuda else None, loss=float(loss))
            del model, opt, out, logits, loss
        except ImportError as exc:
            row["error"] = f"not installed ({exc.name}: pip install galore-torch)"
        except Exception as exc:  # one broken optimizer must not hide the others
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- (b2) Newton–Schulz precision
def _median_ms(fn, device: str, repeats: int) -> float:
    """Median wall time of ``fn()`` in ms (synchronized; after one warm-up call that compiles)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _ns_cases(x: torch.Tensor, steps: int) -> dict[str, Any]:
    """The Newton–Schulz calls (b2) times on ``x``."""
    from lrgrad.kernels import newton_schulz
    from lrgrad.kernels.newton_schulz import MUON_COEFFICIENTS, newton_schulz_reference

    cases = {
        "lrgrad newton_schulz, bf16 iterates": lambda: newton_schulz(x, steps, dtype=torch.bfloat16),
        "lrgrad newton_schulz, fp32 iterates": lambda: newton_schulz(x, steps, dtype=torch.float32),
        "torch reference, bf16 iterates": lambda: newton_schulz_reference(x, steps, dtype=torch.bfloat16),
        "torch reference, fp32 iterates": lambda: newton_schulz_reference(x, steps, dtype=torch.float32),
    }
    try:
        from torch.optim._muon import _zeropower_via_newtonschulz

        cases["torch.optim.Muon (bf16)"] = lambda: _zeropower_via_newtonschulz(x, MUON_COEFFICIENTS, steps, 1e-7)
    except ImportError:  # an older torch without Muon: the row is left out
        pass
    return cases


def ns_section(sizes=NS_SIZES, device: str = "cuda", repeats: int = 20, steps: int = 5) -> list[dict[str, Any]]:
    """Newton–Schulz with bf16 and fp32 iterates: the dispatched entry point (on CUDA: the Triton kernel for
    bf16, cuBLAS for fp32 without TF32), the torch reference at each precision, and torch.optim.Muon's bf16
    iteration; ``device="cpu"`` only exercises the code (tests)."""
    rows = []
    for m, n in sizes:
        x = torch.randn(m, n, device=device)
        k, d = min(m, n), max(m, n)
        flops = steps * (4.0 * k * k * d + 2.0 * k**3)  # X Xᵀ, B·X (2k²d each) and A·A (2k³) on the wide side
        for name, fn in _ns_cases(x, steps).items():
            row: dict[str, Any] = {"shape": f"{m}x{n}", "case": name}
            try:
                ms = _median_ms(fn, device, repeats)
                row.update(ms=ms, tflops=flops / ms / 1e9)
            except Exception as exc:  # one broken row must not hide the others
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            rows.append(row)
    return rows


def ns_table(rows: list[dict[str, Any]]) -> list[str]:
    """(b2)'s markdown: each row with its speed over the lrgrad fp32 row of the same shape."""
    out = ["| shape | Newton–Schulz (5 steps) | ms | TFLOP/s | speed vs lrgrad fp32 |", "|---|---|---:|---:|---:|"]
    base = {r["shape"]: r["ms"] for r in rows if r["case"] == "lrgrad newton_schulz, fp32 iterates" and "ms" in r}
    for r in rows:
        if "error" in r:
            out.append(f"| {r['shape']} | {r['case']} | – | – | {r['error']} |")
            continue
        speed = f"{base[r['shape']] / r['ms']:.2f}×" if r["shape"] in base else "–"
        out.append(f"| {r['shape']} | {r['case']} | {r['ms']:.2f} | {r['tflops']:.1f} | {speed} |")
    return out


# ----------------------------------------------------------------------------- (d) 300-step run
def train_command(optimizer: str, out_dir: Path, steps: int = 300) -> list[str]:
    return [sys.executable, "experiments/pretrain_llama.py", "--config", "llama_60m", "--optimizer", optimizer,
            "--max-steps", str(steps), "--batch-size", "32", "--seq-len", "256", "--eval-every", "100",
            "--eval-batches", "8", "--no-progress", "--out-dir", str(out_dir)]


def read_evals(out_dir: Path) -> list[dict[str, Any]]:
    path = out_dir / "eval.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


# ----------------------------------------------------------------------------- report
def machine_lines() -> list[str]:
    lines = [f"- python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda})"]
    try:
        import triton

        lines[0] += f", triton {triton.__version__}"
    except Exception:  # pragma: no cover
        pass
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        lines.append(f"- GPU {i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}, "
                     f"{p.multi_processor_count} SMs")
    smi = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], 20) \
        if _which("nvidia-smi") else None
    if smi and smi["returncode"] == 0:
        lines.append(f"- driver {smi['stdout'].strip().splitlines()[0]}")
    lines.append(f"- host {platform.node()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    sha = _run(["git", "rev-parse", "--short", "HEAD"], 10)
    if sha["returncode"] == 0:
        lines.append(f"- lrgrad commit {sha['stdout'].strip()}")
    return lines


def _which(program: str) -> bool:
    return any((Path(d) / program).exists() for d in os.environ.get("PATH", "").split(os.pathsep))


def _status(result: dict[str, Any]) -> str:
    code = result["returncode"]
    return "timeout" if code == "timeout" else ("ok" if code == 0 else f"FAILED (exit {code})")


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def pytest_summary(stdout: str) -> str:
    """The last pytest summary line ('12 passed, 1 failed in 3.2s'), or ''."""
    found = re.findall(r"^=*\s*(\d+ (?:passed|failed|skipped|error).*?)\s*=*$", stdout, flags=re.M)
    return found[-1] if found else ""


def render(sections: dict[str, dict[str, Any]], started: str, total_s: float, argv: list[str]) -> str:
    out = ["# GPU check", "", f"`python experiments/tools/gpu_check.py {' '.join(argv)}` — {started}, "
           f"{total_s / 60:.1f} min in all (`make gpu-check`).", "", "## Machine", "", *machine_lines(), "",
           "| section | status | seconds | command |", "|---|---|---:|---|"]
    for key, sec in sections.items():
        for res in sec.get("runs", []):
            out.append(f"| {key} | {_status(res)} | {res['seconds']:.0f} | `{res['cmd']}` |")
    tests = sections.get("tests")
    if tests:
        res = tests["runs"][0]
        out += ["", "## (a) kernels on CUDA vs the torch references", "",
                f"`{pytest_summary(res['stdout']) or _status(res)}`", ""]
        if res["returncode"] != 0:
            out += ["```", _tail(res["stdout"] + "\n" + res["stderr"], 60), "```"]
    bench = sections.get("bench")
    if bench:
        res = bench["runs"][0]
        table = [line for line in res["stdout"].splitlines() if line.startswith(("|", "GPU:", "goals met"))]
        out += ["", "## (b) kernel benchmarks (`experiments/bench/bench_kernels.py`)", "", *(table or ["(no output)"])]
        if res["returncode"] != 0:
            out += ["", "```", _tail(res["stderr"]), "```"]
    ns = sections.get("ns")
    if ns:
        out += ["", "## (b2) Newton–Schulz: bf16 vs fp32 iterates", "", *ns_table(ns.get("rows", []))]
        for res in ns.get("runs", []):
            if res["returncode"] != 0:
                out += ["", "```", _tail(res["stderr"]), "```"]
    step = sections.get("step")
    if step:
        out += ["", "## (c) training step: time and peak memory (batch 8 × 256, bf16 autocast)", "",
                "| model | optimizer | step ms | first step ms | peak memory GiB | vs AdamW (fused) |",
                "|---|---|---:|---:|---:|---:|"]
        for rows in step.get("rows", []):
            base = next((r for r in rows if r["optimizer"] == "adamw_fused" and "error" not in r), None)
            for r in rows:
                if "error" in r:
                    out.append(f"| {r['config']} | {r['optimizer']} | – | – | – | {r['error']} |")
                    continue
                rel = (f"{r['step_s'] / base['step_s']:.2f}× time, "
                       f"{r['peak_bytes'] / base['peak_bytes']:.2f}× memory" if base else "")
                out.append(f"| {r['config']} | {r['optimizer']} | {r['step_s'] * 1e3:.1f} | "
                           f"{r['first_step_s'] * 1e3:.0f} | {r['peak_bytes'] / 2**30:.2f} | {rel} |")
        for res in step.get("runs", []):
            if res["returncode"] != 0:
                out += ["", "```", _tail(res["stderr"]), "```"]
    train = sections.get("train")
    if train:
        out += ["", "## (d) LLaMA-60M, 300 steps on the embedded corpus", "",
                "| optimizer | val loss @100 | @200 | @300 | step ms | status |", "|---|---:|---:|---:|---:|---|"]
        for name, res, evals in train.get("rows", []):
            by_step = {e.get("step"): e.get("val_loss") for e in evals}
            summary = _last_json(res["stdout"])
            step_ms = f"{summary['step_time_s'] * 1e3:.0f}" if summary.get("step_time_s") else "–"
            cells = [f"{by_step[s]:.4f}" if by_step.get(s) is not None else "–" for s in (100, 200, 300)]
            out.append(f"| {name} | {' | '.join(cells)} | {step_ms} | {_status(res)} |")
        for _, res, _ in train.get("rows", []):
            if res["returncode"] != 0:
                out += ["", "```", _tail(res["stderr"]), "```"]
    return "\n".join(out) + "\n"


def _last_json(stdout: str) -> dict[str, Any]:
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return {}
    return {}


def run_all(out: Path, budget_s: float, argv: list[str]) -> int:
    scale = min(1.0, budget_s / sum(LIMITS.values()))
    limit = {k: v * scale for k, v in LIMITS.items()}
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    t0 = time.perf_counter()
    sections: dict[str, dict[str, Any]] = {}
    py = sys.executable
    print("gpu_check (a): kernels and batched optimizer steps on CUDA vs the torch references", flush=True)
    sections["tests"] = {"runs": [_run([py, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                                        *CUDA_TEST_FILES], limit["tests"],
                                       env={"TRITON_INTERPRET": "0"})]}
    print("gpu_check (b): kernel benchmarks", flush=True)
    sections["bench"] = {"runs": [_run([py, "experiments/bench/bench_kernels.py", "--size", "4096", "--rank", "512"],
                                       limit["bench"], env={"TRITON_INTERPRET": "0"})]}
    print("gpu_check (b2): Newton–Schulz, bf16 vs fp32 iterates", flush=True)
    res = _run([py, "experiments/tools/gpu_check.py", "--section", "ns"], limit["ns"], env={"TRITON_INTERPRET": "0"})
    ns_rows = _last_json(res["stdout"]).get("ns_rows")
    if not ns_rows and res["returncode"] == 0:
        res["returncode"] = "no result"
    sections["ns"] = {"runs": [res], "rows": ns_rows or []}
    print("gpu_check (c): step time and peak memory", flush=True)
    step_runs, step_rows = [], []
    for config in STEP_CONFIGS:
        res = _run([py, "experiments/tools/gpu_check.py", "--section", "step", "--config", config],
                   limit["step"] / len(STEP_CONFIGS), env={"TRITON_INTERPRET": "0"})
        step_runs.append(res)
        rows = _last_json(res["stdout"]).get("rows")
        if rows:
            step_rows.append(rows)
        elif res["returncode"] == 0:
            res["returncode"] = "no result"
    sections["step"] = {"runs": step_runs, "rows": step_rows}
    print("gpu_check (d): LLaMA-60M, 300 steps, AdamW vs GaLoreAdamW", flush=True)
    train_rows, train_runs = [], []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        for name in ("adamw", "galore_adamw"):
            out_dir = Path(tmp) / name
            res = _run(train_command(name, out_dir), limit["train"] / 2, env={"TRITON_INTERPRET": "0"})
            train_runs.append(res)
            train_rows.append((name, res, read_evals(out_dir)))
    sections["train"] = {"runs": train_runs, "rows": train_rows}
    total = time.perf_counter() - t0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(sections, started, total, argv))
    failed = [f"{k}: {_status(r)}" for k, s in sections.items() for r in s["runs"] if r["returncode"] != 0]
    print(f"gpu_check: wrote {out} in {total / 60:.1f} min" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "results" / "gpu.md"))
    parser.add_argument("--budget-s", type=float, default=600.0, help="time for all sections together")
    parser.add_argument("--section", choices=("step", "ns"), default=None, help=argparse.SUPPRESS)  # subprocesses
    parser.add_argument("--config", default="llama_130m", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    reason = no_cuda_reason()
    if reason is not None:
        print(f"gpu_check: nothing to do on this machine: {reason}. The GPU check (kernel tests on CUDA, "
              "benchmarks against their goals, step time/memory, a 300-step run) needs a CUDA GPU; "
              "CPU correctness is covered by `make test` (interpreter + AOT compile for sm_90/sm_80).")
        return 0
    if args.section == "step":
        print(json.dumps({"rows": step_section(args.config)}))
        return 0
    if args.section == "ns":
        print(json.dumps({"ns_rows": ns_section()}))
        return 0
    shown = sys.argv[1:] if argv is None else argv
    return run_all(Path(args.out), args.budget_s, shown)


if __name__ == "__main__":
    sys.exit(main())
