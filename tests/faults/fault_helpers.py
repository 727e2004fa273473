"""Shared pieces of the fault tests: a tiny pretraining run, and what two runs must agree on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]

# 4 steps, a checkpoint every 2, keep 1: every kind of write happens (log, step folder, publish, prune)
TINY = ["--config", "llama_test", "--optimizer", "galore_adamw", "--batch-size", "4", "--seq-len", "32",
        "--eval-batches", "2", "--max-bytes", "120000", "--no-progress", "--quiet", "--threads", "1",
        "--max-steps", "4", "--eval-every", "2", "--save-every", "2", "--keep-checkpoints", "1",
        "--update-proj-gap", "2"]


def tiny_args(out: Path, *extra: str):
    from lrgrad_experiments.pretrain_llama import parse_args

    return parse_args([*TINY, "--out-dir", str(out), *extra])


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters by name as plain full tensors (DTensors gathered; DDP's prefix dropped)."""
    out = {}
    for k, v in model.state_dict().items():
        v = v.full_tensor() if hasattr(v, "full_tensor") else v
        out[k.removeprefix("module.")] = v.detach().clone()
    return out


def eval_records(out: Path) -> list[dict[str, Any]]:
    """eval.jsonl without the wall-clock field."""
    lines = (out / "eval.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "time"} for line in lines]


def outcome(summary: dict[str, Any], out: Path) -> dict[str, Any]:
    """What an interrupted-and-resumed run must reproduce exactly."""
    return {"weights": weights(summary["model"]), "train_losses": summary["train_losses"],
            "eval": eval_records(out), "steps": summary["steps"]}


def assert_same_outcome(got: dict[str, Any], want: dict[str, Any], label: str) -> None:
    assert got["steps"] == want["steps"], label
    assert got["train_losses"] == want["train_losses"], label
    assert got["eval"] == want["eval"], label
    assert got["weights"].keys() == want["weights"].keys(), label
    for k in want["weights"]:
        assert torch.equal(got["weights"][k], want["weights"][k]), f"{label}: {k}"
