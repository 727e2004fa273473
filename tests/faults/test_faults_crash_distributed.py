"""Kill a 2-process (gloo) DDP / FSDP2 run at each write of rank 0; the resumed run must be bit-identical.

Before step folders, ``--parallel`` wrote ``dcp/`` in place and then ``checkpoint.pt``: a kill between
the two resumed with optimizer state from step 8 and counters from step 7, and diverged silently.

Three spawned sessions keep this fast: (1) one uninterrupted run per mode with
``LRGRAD_FAULT_MODE=snapshot``, which copies the out-dir at every write of rank 0 (the disk a kill
there leaves; rank 1 only ever writes into an unpublished temporary folder) and is the reference;
(2) a real kill: rank 1 dies with ``os._exit`` just before writing its DCP shards of step 4, and
rank 0 is killed while it waits; (3) every crash image resumed, one after the other.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import harness  # noqa: E402
import pytest
import torch
import torch.multiprocessing as mp
from fault_helpers import assert_same_outcome, outcome, tiny_args

MODES = ("ddp", "fsdp2")


def _env(rank: int, world: int, **fault: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    for key in ("LRGRAD_FAULT_AT_WRITE", "LRGRAD_FAULT_MODE", "LRGRAD_FAULT_SNAPSHOTS", "LRGRAD_FAULT_RANK"):
        os.environ.pop(key, None)
    os.environ.update(fault)


def _reference_with_snapshots(rank: int, world: int, root: str) -> dict:
    from lrgrad_experiments.pretrain import checkpoint as ckpt
    from lrgrad_experiments.pretrain_llama import run

    results = {}
    for mode in MODES:
        _env(rank, world, LRGRAD_FAULT_MODE="snapshot", LRGRAD_FAULT_SNAPSHOTS=f"{root}/snap-{mode}")
        out = Path(root) / f"ref-{mode}"
        results[mode] = outcome(run(tiny_args(out, "--parallel", mode)), out)
        results[f"{mode}-writes"] = ckpt.write_log()
    return results


def _killed_run(rank: int, world: int, root: str, at_write: str) -> None:
    from lrgrad_experiments.pretrain_llama import run

    _env(rank, world, LRGRAD_FAULT_MODE="exit", LRGRAD_FAULT_RANK="1", LRGRAD_FAULT_AT_WRITE=at_write)
    run(tiny_args(Path(root) / "killed-ddp", "--parallel", "ddp"))


def _resume_all(rank: int, world: int, root: str, images: list[tuple[str, str]]) -> dict:
    import torch.distributed as dist
    from lrgrad_experiments.pretrain.checkpoint import NoCheckpointError
    from lrgrad_experiments.pretrain_llama import run

    _env(rank, world)
    results = {}
    for mode, image in images:
        out = Path(root) / f"resumed-{mode}-{Path(image).name}"
        if rank == 0:
            shutil.copytree(image, out)
        dist.barrier()
        try:
            summary = run(tiny_args(out, "--resume", "--parallel", mode))
        except NoCheckpointError:  # killed before the first checkpoint: nothing to resume, and it says so
            results[(mode, Path(image).name)] = (None, False)  # (--overwrite then is a fresh run)
            continue
        results[(mode, Path(image).name)] = (outcome(summary, out), True)
    return results


# Children fork from one server that imported torch and transformers once (tens of seconds on a
# loaded CI machine, per process, with the plain spawn start method).
PRELOAD = ["torch", "transformers.models.llama.modeling_llama", "harness", "fault_helpers",
           "lrgrad_experiments.pretrain_llama"]


def _run_pair(fn, *args, timeout: float = 300.0, dies: bool = False) -> tuple[list[int | None], list]:
    """``fn(rank, 2, *args)`` on 2 processes (tests/distributed/harness.py's entry, gloo); a rank may die.

    When one rank dies the survivor (blocked in a collective with it) is killed. Returns the exit
    codes and each rank's result (None for a rank without one).
    """
    mp.set_forkserver_preload(PRELOAD)
    with tempfile.TemporaryDirectory() as outdir:
        ctx = mp.start_processes(harness._entry, args=(2, harness.free_port(), outdir, fn, args), nprocs=2,
                                 join=False, start_method="forkserver")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            codes = [p.exitcode for p in ctx.processes]
            if any(c not in (None, 0) for c in codes) or all(c == 0 for c in codes):
                break
            time.sleep(0.05)
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
            p.join()
        codes = [p.exitcode for p in ctx.processes]
        errors = [open(os.path.join(outdir, f)).read() for f in sorted(os.listdir(outdir)) if f.endswith(".err")]
        assert dies or not errors, "worker failed:\n" + "\n".join(errors)
        results = [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False)
                   if os.path.exists(os.path.join(outdir, f"rank{r}.pt")) else None for r in range(2)]
        return codes, results


@pytest.fixture(scope="module")
def sessions(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel_faults")
    codes, results = _run_pair(_reference_with_snapshots, str(root))
    assert codes == [0, 0], codes
    reference = results[0]
    # rank 1's writes: [dcp (step 2), dcp (step 4)]; die before the second
    killed_codes, _ = _run_pair(_killed_run, str(root), "2", dies=True)
    images = [(mode, str(p)) for mode in MODES for p in sorted((root / f"snap-{mode}").iterdir())]
    images.append(("ddp", str(root / "killed-ddp")))
    codes, results = _run_pair(_resume_all, str(root), images)
    assert codes == [0, 0], codes
    return root, reference, killed_codes, results[0]


@pytest.mark.parametrize("mode", MODES)
def test_every_crash_image_resumes_bit_identically(sessions, mode):
    root, reference, _, resumed = sessions
    writes = reference[f"{mode}-writes"]
    # rank 0 writes: fresh log, run.json, then per checkpoint eval, folder, dcp, state, manifest, publish, + prune
    assert writes.count("publish") == 2 and writes.count("dcp") == 2, writes
    assert "discard step-00000002" in writes
    images = sorted(p.name for p in (root / f"snap-{mode}").iterdir())
    assert len(images) == len(writes)
    for k, name in enumerate(images, start=1):
        got, was_resumed = resumed[(mode, name)]
        assert was_resumed == ("publish" in writes[:k - 1]), name
        if was_resumed:
            assert_same_outcome(got, reference[mode], f"{mode}: killed before rank 0's write {name}")


def test_a_real_kill_of_one_rank_resumes_bit_identically(sessions):
    root, reference, codes, resumed = sessions
    assert codes[1] == 137 and codes[0] not in (None, 0), codes  # rank 1 died; rank 0 failed (or was killed)
    from lrgrad_experiments.pretrain.checkpoint import CheckpointStore

    store = CheckpointStore(root / "killed-ddp")
    assert [s for s, _ in store.published()] == [2]  # step 4 was never published
    got, was_resumed = resumed[("ddp", "killed-ddp")]
    assert was_resumed
    assert_same_outcome(got, reference["ddp"], "ddp: rank 1 killed before its shards of step 4")
