"""experiments/tools/gpu_check.py (make gpu-check) on a machine without CUDA: a clean exit, and the
report plumbing (sections → results/gpu.md) with stubbed subprocess results."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

from lrgrad_experiments.tools import gpu_check  # noqa: E402


def test_exits_cleanly_without_cuda_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "gpu.md"
    assert gpu_check.no_cuda_reason() is not None  # this machine: no CUDA (or interpreted kernels)
    assert gpu_check.main(["--out", str(out)]) == 0
    assert "nothing to do on this machine" in capsys.readouterr().out
    assert not out.exists()


def _result(cmd, stdout="", code=0, seconds=1.0):
    return {"cmd": " ".join(cmd), "returncode": code, "stdout": stdout, "stderr": "boom" if code else "",
            "seconds": seconds}


def test_run_all_writes_every_section(tmp_path, monkeypatch):
    bench_out = ("GPU: H200 · torch x · triton y\n\n| operation | goal |\n|---|---|\n"
                 "| lowrank_update_ (param bf16) | met (≥ 1.2×) |\n\ngoals met: 1/1\n")
    step_rows = [{"config": "llama_130m", "optimizer": "adamw_fused", "first_step_s": 0.5, "step_s": 0.1,
                  "peak_bytes": 4 * 2**30, "loss": 10.0},
                 {"config": "llama_130m", "optimizer": "galore_adamw", "first_step_s": 2.0, "step_s": 0.12,
                  "peak_bytes": 3 * 2**30, "loss": 10.0},
                 {"config": "llama_130m", "optimizer": "galore_torch", "error": "not installed"}]

    ns_rows = [{"shape": "4096x4096", "case": "lrgrad newton_schulz, fp32 iterates", "ms": 40.0, "tflops": 17.2},
               {"shape": "4096x4096", "case": "lrgrad newton_schulz, bf16 iterates", "ms": 10.0, "tflops": 68.7}]

    def fake_run(cmd, timeout, env=None):
        assert env == {"TRITON_INTERPRET": "0"} and timeout > 0
        if "pytest" in cmd:
            return _result(cmd, "....\n12 passed, 1 skipped in 30.0s\n")
        if "experiments/bench/bench_kernels.py" in cmd:
            return _result(cmd, bench_out)
        if "--section" in cmd and "ns" in cmd:
            return _result(cmd, json.dumps({"ns_rows": ns_rows}) + "\n")
        if "--section" in cmd:
            return _result(cmd, json.dumps({"rows": step_rows}) + "\n")
        out_dir = Path(cmd[cmd.index("--out-dir") + 1])
        out_dir.mkdir(parents=True)
        losses = {"adamw": (5.0, 4.0, 3.5), "galore_adamw": (5.1, 4.2, 3.7)}[cmd[cmd.index("--optimizer") + 1]]
        (out_dir / "eval.jsonl").write_text("".join(json.dumps({"step": s, "val_loss": v}) + "\n"
                                                    for s, v in zip((100, 200, 300), losses)))
        return _result(cmd, json.dumps({"step_time_s": 0.03}) + "\n", code=0 if "adamw" == cmd[5] else 3)

    monkeypatch.setattr(gpu_check, "_run", fake_run)
    monkeypatch.setattr(gpu_check, "machine_lines", lambda: ["- GPU 0: stub"])
    out = tmp_path / "gpu.md"
    assert gpu_check.run_all(out, 600.0, []) == 1  # the GaLore run "failed" (exit 3)
    text = out.read_text()
    assert "`12 passed, 1 skipped in 30.0s`" in text
    assert "| lowrank_update_ (param bf16) | met (≥ 1.2×) |" in text and "goals met: 1/1" in text
    assert "| llama_130m | galore_adamw | 120.0 | 2000 | 3.00 | 1.20× time, 0.75× memory |" in text
    assert "| llama_130m | galore_torch | – | – | – | not installed |" in text
    assert "| adamw | 5.0000 | 4.0000 | 3.5000 | 30 | ok |" in text
    assert "| galore_adamw | 5.1000 | 4.2000 | 3.7000 | 30 | FAILED (exit 3) |" in text
    assert "- GPU 0: stub" in text
    assert "| 4096x4096 | lrgrad newton_schulz, bf16 iterates | 10.00 | 68.7 | 4.00× |" in text


def test_pytest_summary_line():
    assert gpu_check.pytest_summary("x\n==== 3 failed, 70 passed in 12.1s ====\n") == "3 failed, 70 passed in 12.1s"
    assert gpu_check.pytest_summary("no summary") == ""


def test_step_section_builds_and_steps_every_optimizer_on_cpu():
    """Section (c)'s code path on the CPU (tiny shapes): every optimizer builds, steps and reports a finite
    loss, so a GPU session never spends its minutes on a broken row. galore-torch may be absent here."""
    import math

    rows = gpu_check.step_section("llama_9m", steps=1, batch=1, seq=16, device="cpu")
    assert [r["optimizer"] for r in rows] == list(gpu_check.STEP_OPTIMIZERS)
    for row in rows:
        if row["optimizer"] == "galore_torch" and "not installed" in row.get("error", ""):
            continue
        assert "error" not in row, row
        assert math.isfinite(row["loss"]) and row["step_s"] > 0


def test_ns_section_times_both_precisions_on_cpu(monkeypatch):
    """Section (b2)'s code path on the CPU (tiny shapes): every Newton–Schulz row runs, lrgrad's at each
    precision and torch.optim.Muon's, and the table gives each row's speed over lrgrad's fp32 row."""
    import math

    monkeypatch.setenv("LRGRAD_KERNELS", "torch")
    rows = gpu_check.ns_section(sizes=((12, 20), (20, 12)), device="cpu", repeats=1)
    cases = {r["case"] for r in rows}
    assert {"lrgrad newton_schulz, bf16 iterates", "lrgrad newton_schulz, fp32 iterates",
            "torch.optim.Muon (bf16)"} <= cases
    assert len(rows) == 2 * len(cases)
    for row in rows:
        assert "error" not in row, row
        assert math.isfinite(row["ms"]) and row["ms"] > 0 and row["tflops"] > 0
    table = gpu_check.ns_table(rows)
    fp32 = [line for line in table if "lrgrad newton_schulz, fp32 iterates" in line]
    assert len(fp32) == 2 and all(line.endswith("| 1.00× |") for line in fp32)
