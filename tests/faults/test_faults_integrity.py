"""Damaged checkpoints are never loaded silently, and every refusal is one line naming the file.

The oracle for "damaged" is independent of the code under test: bytes flipped or replaced by the
test itself, and the expected outcome is an uninterrupted run's weights and logs.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from fault_helpers import TINY, assert_same_outcome, outcome, tiny_args
from lrgrad_experiments.pretrain import checkpoint as ckpt
from lrgrad_experiments.pretrain_llama import main, run

from lrgrad.distributed import MANIFEST_NAME, CheckpointError, verify_manifest, write_manifest

KEEP2 = ("--keep-checkpoints", "2")


def _flip(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _main(out, capsys, *extra: str) -> tuple[int, list[str]]:
    code = main([*TINY, "--out-dir", str(out), *extra])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return code, err


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 4-step run keeping checkpoints at steps 2 and 4, and its outcome."""
    out = tmp_path_factory.mktemp("finished")
    summary = run(tiny_args(out, *KEEP2))
    return out, outcome(summary, out)


def _copy(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished[0], out)
    return out


def test_every_single_bit_flip_is_detected(finished, tmp_path):
    """30 flips spread over state.pt (tensor data included): each one fails verification, naming the file."""
    out = _copy(finished, tmp_path)
    folder = out / "checkpoints" / "step-00000004"
    state = folder / "state.pt"
    size = state.stat().st_size
    for offset in range(0, size, max(1, size // 30))[:30]:
        _flip(state, offset)
        with pytest.raises(CheckpointError, match="sha256 mismatch") as err:
            verify_manifest(folder)
        assert err.value.path == str(state)
        _flip(state, offset)
    verify_manifest(folder)  # restored: verifies again


def test_resume_skips_a_damaged_newest_checkpoint_and_says_which(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path)
    state = out / "checkpoints" / "step-00000004" / "state.pt"
    _flip(state, state.stat().st_size // 2)
    for line in (out / "eval.jsonl").read_text().splitlines()[:-1]:
        assert json.loads(line)["step"] <= 2
    code, err = _main(out, capsys, *KEEP2, "--resume")
    assert code == 0
    assert f"skipped damaged checkpoint {state}: sha256 mismatch" in err[0]
    assert err[1].startswith(f"resuming from {out / 'checkpoints' / 'step-00000002'} (step 2)")
    assert "dropped 1 eval.jsonl record(s) past step 2" in err[1]  # no duplicate step-4 record
    assert (out / "checkpoints" / "step-00000004.damaged").is_dir()  # kept for inspection, never loaded
    # replayed steps 3-4 from step 2: the same as never having been damaged
    summary = run(tiny_args(out, *KEEP2, "--resume"))  # (already finished: loads the new step 4)
    assert_same_outcome(outcome(summary, out), finished[1], "resumed past a damaged checkpoint")


def test_naming_a_damaged_checkpoint_refuses_it(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path)
    state = out / "checkpoints" / "step-00000004" / "state.pt"
    _flip(state, 100)
    code, err = _main(out, capsys, *KEEP2, "--resume", "step-00000004")
    assert code == 2 and len(err) == 1
    assert err[0] == f"error: {state}: sha256 mismatch: the file changed after it was written (damaged)"


@pytest.mark.parametrize("damage,cause", [
    ("empty", "empty file: 0 bytes, the manifest says"),
    ("truncated", "truncated:"),
    ("no_manifest", "missing manifest"),
    ("extra_file", "not listed in the manifest"),
    ("empty_consistent", "empty file"),  # manifest rewritten to match: the loader itself refuses
    ("garbage_consistent", "not a readable checkpoint (UnpicklingError"),
])
def test_each_damage_exits_2_with_one_line_naming_the_file(tmp_path, capsys, damage, cause):
    out = tmp_path / "run"
    run(tiny_args(out))  # --keep-checkpoints 1: nothing older to fall back to
    folder = out / "checkpoints" / "step-00000004"
    state = folder / "state.pt"
    named = state
    if damage in ("empty", "empty_consistent"):
        state.write_bytes(b"")
    elif damage == "truncated":
        state.write_bytes(state.read_bytes()[:-10])
    elif damage == "no_manifest":
        (folder / MANIFEST_NAME).unlink()
        named = folder / MANIFEST_NAME
    elif damage == "extra_file":
        named = folder / "planted.bin"
        named.write_bytes(b"x")
    elif damage == "garbage_consistent":
        state.write_bytes(b"D" * 4096)  # what the trial fed torch.load ("Unsupported operand 68")
    if damage.endswith("_consistent"):
        write_manifest(folder)
    code, err = _main(out, capsys, "--resume")
    assert code == 2
    assert len(err) == 1 and err[0].startswith(f"error: {named}: "), err
    assert cause in err[0]


def test_a_renamed_checkpoint_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    run(tiny_args(out))
    root = out / "checkpoints"
    (root / "step-00000004").rename(root / "step-00000006")
    code, err = _main(out, capsys, "--resume")
    assert code == 2 and len(err) == 1
    assert err[0] == (f"error: {root / 'step-00000006' / 'state.pt'}: holds step 4 but its folder is "
                      "step-00000006 (renamed or mixed up)")


def test_a_checkpoint_of_the_earlier_single_file_layout_is_named(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    torch.save({"step": 3}, out / "checkpoint.pt")
    code, err = _main(out, capsys, "--resume")
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"error: {out / 'checkpoint.pt'}: a checkpoint of an earlier pretrain_llama.py")
    code, err = _main(out, capsys)  # and it is a run: not overwritten without asking
    assert code == 2 and "already holds a run (checkpoint.pt)" in err[0]


def test_resume_with_layerwise_added_is_refused_in_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    run(tiny_args(out, "--max-steps", "2"))
    code, err = _main(out, capsys, "--max-steps", "2", "--resume", "--layerwise")
    state = out / "checkpoints" / "step-00000002" / "state.pt"
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"error: Invalid resume from {state}: --layerwise was False, now True.")


@pytest.mark.parametrize("part", ["optimizer", "data"])
def test_a_state_file_that_does_not_fit_is_refused_in_one_line(tmp_path, capsys, part):
    """A consistent checkpoint missing a piece: one line naming state.pt, not a KeyError traceback."""
    out = tmp_path / "run"
    run(tiny_args(out, "--max-steps", "2"))
    folder = out / "checkpoints" / "step-00000002"
    state = torch.load(folder / "state.pt", weights_only=True)
    if part == "optimizer":
        del state["optimizer"]["param_groups"]
    else:
        del state["data"]
    torch.save(state, folder / "state.pt")
    write_manifest(folder)
    code, err = _main(out, capsys, "--max-steps", "2", "--resume")
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"error: {folder / 'state.pt'}: does not fit this run ("), err
    if part == "data":
        assert err[0].endswith("(KeyError: 'data')")


def test_stale_temporaries_are_removed_on_start(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path)
    legacy = out / ".checkpoint.pt.abc123.tmp"  # what the old single-file writer left behind
    legacy.write_bytes(b"\0" * 1000)
    half = out / "checkpoints" / ".tmp-step-00000006"
    half.mkdir()
    (half / "state.pt").write_bytes(b"\0" * 500)
    trash = out / "checkpoints" / ".trash-step-00000001"
    trash.mkdir()
    code, err = _main(out, capsys, *KEEP2, "--resume")
    assert code == 0
    assert any("removed 3 temporary" in line for line in err), err
    assert not legacy.exists() and not half.exists() and not trash.exists()
    assert ckpt.CheckpointStore(out).temporaries() == []


def test_keep_checkpoints_keeps_the_newest(tmp_path):
    out = tmp_path / "run"
    run(tiny_args(out, "--save-every", "1", "--keep-checkpoints", "3"))
    assert [s for s, _ in ckpt.CheckpointStore(out).published()] == [2, 3, 4]
    with pytest.raises(ValueError, match="keep_checkpoints"):
        tiny_args(out, "--keep-checkpoints", "0")
