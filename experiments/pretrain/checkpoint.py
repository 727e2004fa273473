"""Checkpoints of an experiments run: one folder per step, published last, verified on resume.

Layout of ``OUT/checkpoints/``::

    step-00000008/          a complete checkpoint
        state.pt            torch.save'd dict (loads with ``weights_only=True``)
        dcp/                torch.distributed.checkpoint shards of a ``--parallel`` run
        lrgrad_manifest.json  sha256 + size of every other file (``lrgrad.distributed.write_manifest``)
    .tmp-step-00000010/     being written; removed on the next start if a crash left it
    .trash-step-00000004/   being deleted (pruning); removed on the next start

A checkpoint is written into ``.tmp-step-N``, its manifest last, and then published by one
``os.rename`` to ``step-N`` (atomic on POSIX). A kill at any moment therefore leaves either no
``step-N`` or a complete one; :meth:`CheckpointStore.select` verifies the manifest before
anything is unpickled and falls back to the newest *valid* checkpoint, saying which it skipped.

Everything in ``state.pt`` is tensors, numbers, strings and containers, so it loads with
``torch.load(weights_only=True)``. DCP's ``.metadata`` is a pickle (torch's format): trust a
``--parallel`` checkpoint as you would any pickle; its manifest is checked before ``dcp.load``.

Fault injection (tests and ``experiments/tools/fault_trial.py``): every durable write calls
:func:`write_point` first. With ``LRGRAD_FAULT_AT_WRITE=k`` the process dies (``os._exit(137)``,
no cleanup, like SIGKILL) just before its k-th write; ``LRGRAD_FAULT_MODE=raise`` raises
:class:`SimulatedCrash` instead (in-process tests) and ``LRGRAD_FAULT_MODE=snapshot`` copies the
out-dir to ``LRGRAD_FAULT_SNAPSHOTS/<k>-<write>`` at every write (the disk a kill there leaves).
``LRGRAD_FAULT_RANK`` (default 0) picks the process of a ``--parallel`` run that faults.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from lrgrad.distributed import MANIFEST_NAME, CheckpointError, fsync_dir, verify_manifest, write_manifest

CHECKPOINTS_DIR = "checkpoints"
STATE_NAME = "state.pt"
DCP_NAME = "dcp"
_STEP_DIR = re.compile(r"^step-(\d{8})$")

__all__ = ["CHECKPOINTS_DIR", "DCP_NAME", "MANIFEST_NAME", "STATE_NAME", "CheckpointError", "CheckpointStore",
           "NoCheckpointError", "SimulatedCrash", "arm_faults", "load_checkpoint", "rng_state", "save_checkpoint",
           "set_rng_state", "write_log", "write_point"]


class NoCheckpointError(CheckpointError, FileNotFoundError):
    """``--resume`` found no checkpoint at all (a FileNotFoundError too, as it was before step folders)."""


# ---------------------------------------------------------------------------- fault injection
class SimulatedCrash(BaseException):
    """Raised by :func:`write_point` in ``LRGRAD_FAULT_MODE=raise`` (a BaseException: nothing catches it)."""


class _Faults:
    at: int | None = None
    mode = "exit"
    count = 0
    out_dir: Path | None = None
    snapshots: Path | None = None
    log: list[str] = []


def arm_faults(out_dir: str | Path, process_rank: int = 0) -> None:
    """Reset the write counter and read the ``LRGRAD_FAULT_*`` variables (called when a run starts)."""
    _Faults.count, _Faults.log, _Faults.out_dir = 0, [], Path(out_dir)
    at = os.environ.get("LRGRAD_FAULT_AT_WRITE")
    rank = int(os.environ.get("LRGRAD_FAULT_RANK", "0"))
    _Faults.mode = os.environ.get("LRGRAD_FAULT_MODE", "exit")
    if _Faults.mode not in ("exit", "raise", "snapshot"):
        raise ValueError(f"Invalid LRGRAD_FAULT_MODE: {_Faults.mode!r} (expected exit, raise or snapshot)")
    snapshots = os.environ.get("LRGRAD_FAULT_SNAPSHOTS")
    _Faults.snapshots = Path(snapshots) if snapshots and _Faults.mode == "snapshot" else None
    if _Faults.mode == "snapshot" and _Faults.snapshots is None:
        raise ValueError("Invalid LRGRAD_FAULT_MODE=snapshot: set LRGRAD_FAULT_SNAPSHOTS to a folder")
    _Faults.at = int(at) if at and process_rank == rank else None
    if process_rank != rank:
        _Faults.snapshots = None


def write_point(name: str) -> None:
    """Mark the next durable write (``name`` says which); the fault injector may stop the process here."""
    _Faults.count += 1
    _Faults.log.append(name)
    if _Faults.snapshots is not None and _Faults.out_dir is not None:
        target = _Faults.snapshots / f"{_Faults.count:03d}-{name}"
        shutil.copytree(_Faults.out_dir, target, ignore=shutil.ignore_patterns("wandb"))
    if _Faults.at is not None and _Faults.count == _Faults.at:
        if _Faults.mode == "raise":
            raise SimulatedCrash(f"simulated crash before write {_Faults.count} ({name})")
        if _Faults.mode == "exit":
            os._exit(137)


def write_log() -> list[str]:
    """Names of the writes since :func:`arm_faults`, in order (what a crash sweep iterates over)."""
    return list(_Faults.log)


# ---------------------------------------------------------------------------- single files
def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Atomically write ``state`` to ``path`` (temporary file, fsync, ``os.replace``); returns ``path``.

    A crash leaves either the previous file or the new one at ``path``, never a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # do not leave the temporary behind (what a kill leaves is cleaned on the next start)
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a file written by :func:`save_checkpoint` (``weights_only=True``).

    Raises :class:`FileNotFoundError` for a missing file and :class:`CheckpointError` (naming the
    file and the cause) for an empty or unreadable one.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Invalid checkpoint path: {str(path)!r} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(path, "empty file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for bad bytes (EOFError, UnpicklingError, RuntimeError...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(path, f"not a readable checkpoint ({type(exc).__name__}: {first[:160]})") from None
    if not isinstance(state, dict):
        raise CheckpointError(path, f"not a checkpoint (holds a {type(state).__name__}, not a dict)")
    return state


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------- the step folders
def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


class CheckpointStore:
    """The checkpoint folders of one out-dir: write, publish, prune (keep ``keep``), select."""

    def __init__(self, out_dir: str | Path, keep: int = 2):
        if keep < 1:
            raise ValueError(f"Invalid keep_checkpoints: {keep} (must be >= 1)")
        self.out_dir = Path(out_dir)
        self.root = self.out_dir / CHECKPOINTS_DIR
        self.keep = keep

    # ------------------------------------------------------------ what is there
    def published(self) -> list[tuple[int, Path]]:
        """``(step, folder)`` of every published checkpoint, oldest first (not yet verified)."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
        return sorted(found)

    def temporaries(self) -> list[Path]:
        """What a killed writer leaves: ``.tmp-*``/``.trash-*`` folders and ``.*.tmp`` files."""
        out = []
        if self.root.is_dir():
            out += [p for p in self.root.iterdir() if p.name.startswith((".tmp-", ".trash-"))]
        if self.out_dir.is_dir():
            out += [p for p in self.out_dir.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]
        return sorted(out)

    def clean_temporaries(self) -> tuple[int, int]:
        """Remove what killed writers left; returns (count, bytes). Only one run may use an out-dir."""
        count = size = 0
        for p in self.temporaries():
            if p.is_dir():
                size += sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
                shutil.rmtree(p, ignore_errors=True)
            else:
                size += p.stat().st_size
                p.unlink(missing_ok=True)
            count += 1
        return count, size

    # ------------------------------------------------------------ writing
    def temporary(self, step: int) -> Path:
        return self.root / f".tmp-{step_dir_name(step)}"

    def begin(self, step: int) -> Path:
        """A fresh, empty temporary folder for the checkpoint of ``step`` (main process only)."""
        tmp = self.temporary(step)
        if tmp.exists():
            shutil.rmtree(tmp)
        write_point("mkdir")
        tmp.mkdir(parents=True)
        return tmp

    def publish(self, tmp: Path, step: int) -> Path:
        """Manifest last, then one rename makes the checkpoint visible; then prune to ``keep``."""
        write_point("manifest")
        write_manifest(tmp)
        final = self.root / step_dir_name(step)
        if final.exists():  # the same step written again (e.g. after resuming from an older checkpoint)
            self._discard(final)
        write_point("publish")
        os.rename(tmp, final)
        fsync_dir(self.root)
        self.prune()
        return final

    def prune(self) -> None:
        for _, folder in self.published()[:-self.keep]:
            self._discard(folder)

    def _discard(self, folder: Path) -> None:
        # rename first (atomic): a kill mid-delete leaves a .trash folder, never a half-deleted step folder
        trash = self.root / f".trash-{folder.name}"
        if trash.exists():
            shutil.rmtree(trash)
        write_point(f"discard {folder.name}")
        os.rename(folder, trash)
        write_point(f"delete {folder.name}")
        shutil.rmtree(trash)

    # ------------------------------------------------------------ reading
    def resolve(self, requested: str) -> Path:
        """A ``--resume`` value naming one checkpoint: ``step-N`` / ``N`` / a folder path."""
        if requested.isdigit():
            return self.root / step_dir_name(int(requested))
        path = Path(requested)
        if path.parent == Path(".") and _STEP_DIR.match(requested):
            return self.root / requested
        return path

    def select(self, requested: str | None = None) -> tuple[Path, list[tuple[Path, CheckpointError]]]:
        """The checkpoint to resume from, and ``(folder, error)`` of the newer ones skipped as damaged.

        ``requested=None``: the newest checkpoint whose manifest verifies. A named one must verify.
        Raises :class:`CheckpointError` when there is none to resume from.
        """
        if requested is not None:
            folder = self.resolve(requested)
            verify_manifest(folder)
            return folder, []
        published = self.published()
        if not published:
            raise NoCheckpointError(self.root, "no complete checkpoint to resume from (pass --overwrite to start "
                                               "over)")
        skipped: list[tuple[Path, CheckpointError]] = []
        for _, folder in reversed(published):
            try:
                verify_manifest(folder)
            except CheckpointError as exc:
                skipped.append((folder, exc))
                continue
            return folder, skipped
        first = skipped[0][1]
        older = f"; the {len(skipped) - 1} older checkpoint(s) do not verify either" if len(skipped) > 1 else ""
        raise CheckpointError(first.path, f"{first.cause}{older}")

    def set_aside(self, folder: Path) -> Path:
        """Rename a damaged checkpoint out of the way (kept for inspection, never loaded or pruned)."""
        target = folder.with_name(folder.name + ".damaged")
        n = 1
        while target.exists():
            n += 1
            target = folder.with_name(f"{folder.name}.damaged{n}")
        os.rename(folder, target)
        return target
