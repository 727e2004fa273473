"""Kill a single-process run before each of its durable writes; the resumed run must be bit-identical.

The crash is injected deterministically (experiments/pretrain/checkpoint.py ``write_point``): in-process
with ``LRGRAD_FAULT_MODE=raise`` for the sweep over every write (nothing in the writer catches the
``SimulatedCrash``, so the disk is left exactly as a kill leaves it), and once for real with
``os._exit`` in a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from fault_helpers import ROOT, TINY, assert_same_outcome, outcome, tiny_args
from lrgrad_experiments.paths import PRETRAIN_SCRIPT
from lrgrad_experiments.pretrain import checkpoint as ckpt
from lrgrad_experiments.pretrain_llama import run


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    summary = run(tiny_args(out))
    return outcome(summary, out), ckpt.write_log()


def test_the_run_makes_every_kind_of_write(reference):
    _, writes = reference
    # fresh log, 2 evaluations, 2 checkpoints (folder, state, manifest, rename), 1 prune (rename, delete)
    assert writes == ["eval.jsonl", "run.json",
                      "eval.jsonl", "mkdir", "state.pt", "manifest", "publish",
                      "eval.jsonl", "mkdir", "state.pt", "manifest", "publish",
                      "discard step-00000002", "delete step-00000002"]


def test_kill_before_every_write_then_resume_is_bit_identical(tmp_path, monkeypatch, reference):
    want, writes = reference
    monkeypatch.setenv("LRGRAD_FAULT_MODE", "raise")
    for k, name in enumerate(writes, start=1):
        out = tmp_path / f"kill{k}"
        monkeypatch.setenv("LRGRAD_FAULT_AT_WRITE", str(k))
        with pytest.raises(ckpt.SimulatedCrash):
            run(tiny_args(out))
        monkeypatch.delenv("LRGRAD_FAULT_AT_WRITE")
        published = "publish" in writes[:k - 1]
        if published:
            got = run(tiny_args(out, "--resume"))
        else:  # nothing to resume from: --resume says so, --overwrite starts over
            with pytest.raises(ckpt.NoCheckpointError, match="no complete checkpoint"):
                run(tiny_args(out, "--resume"))
            got = run(tiny_args(out, "--overwrite"))
        assert_same_outcome(outcome(got, out), want, f"killed before write {k} ({name})")
        store = ckpt.CheckpointStore(out, keep=1)
        assert store.temporaries() == [], k  # what the kill left was cleaned on start
        assert [s for s, _ in store.published()] == [4], k  # --keep-checkpoints 1, including a resumed prune


def test_a_real_kill_mid_checkpoint_resumes_bit_identically(tmp_path, reference):
    """os._exit between the manifest and the rename of step 4: the process dies, nothing cleans up."""
    want, writes = reference
    k = len(writes) - writes[::-1].index("publish")  # the last publish (step 4)
    out = tmp_path / "killed"
    env = dict(os.environ, LRGRAD_FAULT_AT_WRITE=str(k), LRGRAD_FAULT_MODE="exit")
    result = subprocess.run([sys.executable, str(PRETRAIN_SCRIPT), *TINY,
                             "--out-dir", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 137, result.stderr[-2000:]
    store = ckpt.CheckpointStore(out, keep=1)
    assert [p.name for p in store.temporaries()] == [".tmp-step-00000004"]  # complete but never published
    assert [s for s, _ in store.published()] == [2]
    got = run(tiny_args(out, "--resume"))
    assert_same_outcome(outcome(got, out), want, "killed before the rename of step 4")
    assert store.temporaries() == [] and [s for s, _ in store.published()] == [4]
