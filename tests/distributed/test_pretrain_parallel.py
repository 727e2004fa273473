"""`experiments/pretrain_llama.py --parallel ddp|fsdp2` under torchrun (2 CPU processes, gloo).

Every rank trains on its slice of the same global batch, so the run must follow the
single-process run on that batch; a DCP checkpoint taken mid-run must resume exactly.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
from lrgrad_experiments.paths import PRETRAIN_SCRIPT as SCRIPT  # noqa: E402

COMMON = ["--config", "llama_9m", "--optimizer", "galore_adamw", "--batch-size", "4", "--seq-len", "32",
          "--max-steps", "4", "--eval-every", "2", "--eval-batches", "2", "--update-proj-gap", "2",
          "--rank", "8", "--threads", "1", "--no-progress", "--quiet",
          "--opt-arg", "moment_policy=project",
          # FSDP2 refreshes with the seeded sketch; the single process runs the same one
          "--opt-arg", "svd=randomized"]


def launch(out: Path, *extra: str, world: int = 2) -> subprocess.CompletedProcess:
    if world == 1:
        command = [sys.executable, str(SCRIPT)]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
                   str(SCRIPT)]
    return subprocess.run([*command, *COMMON, "--out-dir", str(out), *extra], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def val_losses(out: Path) -> list[float]:
    return [json.loads(line)["val_loss"] for line in (out / "eval.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    result = launch(out, world=1)
    assert result.returncode == 0, result.stderr[-3000:]
    return val_losses(out)


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_parallel_run_follows_the_single_process_run(tmp_path, single, mode):
    result = launch(tmp_path, "--parallel", mode)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = val_losses(tmp_path)
    assert len(losses) == len(single) == 2
    for got, expected in zip(losses, single):
        assert abs(got - expected) < 1e-4 * abs(expected), (losses, single)


def test_ddp_checkpoint_resumes_exactly(tmp_path, single):
    first = launch(tmp_path, "--parallel", "ddp", "--stop-after", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    # stopped after step 2, with the DCP shards inside the step's checkpoint folder
    assert (tmp_path / "checkpoints" / "step-00000002" / "dcp").is_dir() and len(val_losses(tmp_path)) == 1
    second = launch(tmp_path, "--parallel", "ddp", "--resume")
    assert second.returncode == 0, second.stderr[-3000:]
    uninterrupted = tmp_path / "uninterrupted"
    assert launch(uninterrupted, "--parallel", "ddp").returncode == 0
    assert val_losses(tmp_path) == val_losses(uninterrupted)


def test_bad_parallel_arguments(tmp_path):
    result = launch(tmp_path, "--parallel", "ddp", "--batch-size", "3")
    assert result.returncode != 0 and "batch_size" in result.stderr
