"""lrgrad.distributed's DCP checkpoints: a manifest written last, verified before ``dcp.load`` unpickles anything."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp

import lrgrad
from lrgrad.distributed import MANIFEST_NAME, CheckpointError, load_checkpoint, save_checkpoint

# DCP in one process without a process group is what these tests mean to do
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def _model_and_opt(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 12), torch.nn.Linear(12, 4))
    opt = lrgrad.GaLoreAdamW(lrgrad.param_groups(model, rank=2, update_proj_gap=2), lr=1e-2)
    for i in range(3):
        torch.manual_seed(100 + i)
        model(torch.randn(5, 16)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


@pytest.fixture
def saved(tmp_path):
    model, opt = _model_and_opt()
    path = tmp_path / "ckpt"
    save_checkpoint(path, model, opt)
    return path, model


def _shard(path):
    return next(p for p in sorted(path.iterdir()) if p.suffix == ".distcp")


def test_save_writes_a_manifest_and_load_restores_exactly(saved):
    path, model = saved
    assert (path / MANIFEST_NAME).is_file()
    fresh, opt = _model_and_opt(seed=1)  # other weights
    load_checkpoint(path, fresh, opt)
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)


def test_a_flipped_shard_byte_is_refused_before_dcp_load(saved, monkeypatch):
    path, _ = saved
    shard = _shard(path)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10
    shard.write_bytes(bytes(data))

    def never(*args, **kwargs):
        raise AssertionError("dcp.load must not run on a damaged checkpoint")

    monkeypatch.setattr(dcp, "load", never)
    model, opt = _model_and_opt(seed=1)
    with pytest.raises(CheckpointError, match="sha256 mismatch") as err:
        load_checkpoint(path, model, opt)
    assert err.value.path == str(shard)


def test_a_crafted_metadata_pickle_is_refused_before_it_runs(saved, tmp_path):
    """DCP's .metadata is a pickle: a replaced one would run code; the manifest check stops it first."""
    path, _ = saved
    marker = tmp_path / "code_ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (path / ".metadata").write_bytes(pickle.dumps(Payload()))
    model, opt = _model_and_opt(seed=1)
    with pytest.raises(CheckpointError, match=r"\.metadata: .*sha256 mismatch|\.metadata: (truncated|longer)"):
        load_checkpoint(path, model, opt)
    assert not marker.exists()
    # what the documentation warns about: without verification, loading runs the pickle's code
    with pytest.raises(BaseException):  # noqa: B017 - DCP's CheckpointException (a BaseException)
        load_checkpoint(path, model, opt, verify=False)
    assert marker.exists()


def test_an_interrupted_overwrite_is_not_mistaken_for_a_checkpoint(saved, monkeypatch):
    """Saving again into the folder removes the old manifest first: dying mid-save leaves none."""
    path, _ = saved
    model, opt = _model_and_opt(seed=2)

    def dies(*args, **kwargs):
        raise KeyboardInterrupt("killed inside dcp.save")

    monkeypatch.setattr(dcp, "save", dies)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model, opt)
    with pytest.raises(CheckpointError, match="missing manifest"):
        load_checkpoint(path, model, opt)


def test_missing_and_unlisted_files_are_named(saved):
    path, _ = saved
    model, opt = _model_and_opt(seed=1)
    extra = path / "extra.distcp"
    extra.write_bytes(b"1234")
    with pytest.raises(CheckpointError, match="not listed in the manifest") as err:
        load_checkpoint(path, model, opt)
    assert err.value.path == str(extra)
    extra.unlink()
    shard = _shard(path)
    shard.unlink()
    with pytest.raises(CheckpointError, match="missing") as err:
        load_checkpoint(path, model, opt)
    assert err.value.path == str(shard)
    (path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(CheckpointError, match="not a checkpoint manifest"):
        load_checkpoint(path, model, opt)


def test_a_counter_that_appears_later_survives_a_dcp_resume(tmp_path):
    """``nonfinite_skips`` exists only after a skipped step; DCP loads the keys of a template made by a fresh
    step, so without adding the checkpoint's extra keys to it a resume silently reset the counter."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 12), torch.nn.Linear(12, 4))
    opt = lrgrad.GaLoreAdamW(lrgrad.param_groups(model, rank=2, update_proj_gap=2), lr=1e-2, skip_nonfinite=True)
    for i in range(3):
        torch.manual_seed(100 + i)
        model(torch.randn(5, 16)).square().mean().backward()
        if i == 1:
            model[0].weight.grad[0, 0] = float("nan")
        opt.step()
        opt.zero_grad()
    assert opt.state[model[0].weight]["nonfinite_skips"] == 1
    save_checkpoint(tmp_path / "ckpt", model, opt)
    torch.manual_seed(1)
    fresh = torch.nn.Sequential(torch.nn.Linear(16, 12), torch.nn.Linear(12, 4))
    resumed = lrgrad.GaLoreAdamW(lrgrad.param_groups(fresh, rank=2, update_proj_gap=2), lr=1e-2, skip_nonfinite=True)
    load_checkpoint(tmp_path / "ckpt", fresh, resumed)
    for p, q in zip(model.parameters(), fresh.parameters()):
        want, got = opt.state[p], resumed.state[q]
        assert set(got) == set(want), (set(want) ^ set(got))
        for key, value in want.items():
            assert torch.equal(got[key], value) if isinstance(value, torch.Tensor) else got[key] == value, key
