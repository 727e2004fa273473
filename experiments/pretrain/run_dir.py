"""The files of a run's out-dir besides its checkpoints: the guard against overwriting a run,
``eval.jsonl`` (one JSON line per evaluation) and ``run.json`` (arguments and resumes).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from lrgrad_experiments.pretrain.checkpoint import CHECKPOINTS_DIR, write_point

EVAL_LOG = "eval.jsonl"
RUN_FILE = "run.json"
# what earlier versions of pretrain_llama.py wrote (a run in an out-dir from before step folders)
LEGACY = ("checkpoint.pt", "dcp")


class RunExistsError(ValueError):
    """The out-dir already holds a run and neither ``--resume`` nor ``--overwrite`` was given."""


def run_files(out_dir: Path) -> list[str]:
    """Names of what marks ``out_dir`` as holding a run (empty: a fresh directory)."""
    found = []
    root = out_dir / CHECKPOINTS_DIR
    if root.is_dir() and any(p.name.startswith("step-") for p in root.iterdir()):
        found.append(CHECKPOINTS_DIR)
    log = out_dir / EVAL_LOG
    if log.is_file() and log.stat().st_size > 0:
        found.append(EVAL_LOG)
    found += [name for name in (RUN_FILE, *LEGACY) if (out_dir / name).exists()]
    return found


def check_out_dir(out_dir: Path, resume: bool, overwrite: bool) -> list[str]:
    """Refuse to write a fresh run over an existing one; returns what marks the existing run."""
    found = run_files(out_dir)
    if found and not resume and not overwrite:
        raise RunExistsError(
            f"Invalid out-dir: {str(out_dir)!r} already holds a run ({', '.join(found)}); pass --resume to "
            "continue it, or --overwrite to delete it and start over")
    return found


def remove_run(out_dir: Path) -> None:
    """``--overwrite``: delete the previous run's checkpoints, logs and run file (nothing else)."""
    for name in (CHECKPOINTS_DIR, EVAL_LOG, RUN_FILE, *LEGACY):
        path = out_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _write_text_atomic(path: Path, text: str, what: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    write_point(what)
    os.replace(tmp, path)


def append_eval(out_dir: Path, record: dict[str, Any]) -> None:
    write_point(EVAL_LOG)
    with open(out_dir / EVAL_LOG, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_eval_log(out_dir: Path, step: int) -> int:
    """Keep the records of steps ``<= step`` (a resume replays the rest); returns how many were dropped.

    A line a kill cut short is dropped too.
    """
    path = out_dir / EVAL_LOG
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            keep = int(json.loads(line)["step"]) <= step
        except (ValueError, KeyError, TypeError):
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        _write_text_atomic(path, "".join(f"{line}\n" for line in kept), f"truncate {EVAL_LOG}")
    return dropped


def start_eval_log(out_dir: Path) -> None:
    write_point(EVAL_LOG)
    (out_dir / EVAL_LOG).write_text("")


def write_run_file(out_dir: Path, args: dict[str, Any], resumes: list[dict[str, Any]]) -> None:
    """``run.json``: this run's arguments and every resume (step, checkpoint, arguments it changed)."""
    text = json.dumps({"args": args, "resumes": resumes}, indent=1, sort_keys=True) + "\n"
    _write_text_atomic(out_dir / RUN_FILE, text, RUN_FILE)
