"""Data pipeline and checkpoint file handling of experiments/ (fast, no model)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from lrgrad_experiments.pretrain import checkpoint as ckpt  # noqa: E402
from lrgrad_experiments.pretrain import data  # noqa: E402


def test_stdlib_split_is_deterministic_disjoint_and_complete():
    files = data.list_text_files(data.stdlib_root(), suffixes=(".py",))
    assert len(files) > 100
    train, val = data.split_files(files, 5.0)
    shuffled = list(files)
    random.Random(0).shuffle(shuffled)
    train2, val2 = data.split_files(shuffled, 5.0)
    # same sets whatever the listing order (the split depends on the path only)
    assert set(train) == set(train2) and set(val) == set(val2)
    assert not set(train) & set(val)
    assert set(train) | set(val) == set(files)
    assert 0.02 < len(val) / len(files) < 0.10  # ~5% of the files
    # the hash is of the relative path, so it is the same on every machine
    assert data.is_validation("json/decoder.py", 5.0) == data.is_validation("json/decoder.py", 5.0)


def test_corpus_files_land_on_their_side(tmp_path):
    for i in range(40):
        (tmp_path / f"doc{i:02d}.txt").write_text(f"document {i} " * 20)
    corpus = data.load_folder(tmp_path, val_percent=20.0)
    assert not set(corpus.train_files) & set(corpus.val_files) and corpus.val_files
    train_text = data.decode_bytes(corpus.train)
    val_text = data.decode_bytes(corpus.val)
    for name in corpus.val_files:
        doc = (tmp_path / name).read_text()
        assert doc in val_text and doc not in train_text
    for name in corpus.train_files:
        assert (tmp_path / name).read_text() in train_text
    # documents are separated by the separator byte, exactly once each
    assert int((corpus.train == data.DOC_SEPARATOR).sum()) == len(corpus.train_files)


def test_byte_level_round_trip():
    text = "def f(x):\n    return x ** 2  # ünïcödé ✓ 中文\n"
    tokens = data.encode_bytes(text)
    assert tokens.dtype == np.uint8 and len(tokens) == len(text.encode("utf-8"))
    assert data.decode_bytes(tokens) == text
    assert data.decode_bytes(torch.from_numpy(tokens.astype(np.int64))) == text


def test_batch_loader_is_a_pure_function_of_position():
    tokens = np.arange(10_000, dtype=np.int64)  # token i sits at position i
    a = data.BatchLoader(tokens, batch_size=4, seq_len=15, seed=3)
    seq = [a.next() for _ in range(a.batches_per_epoch + 3)]  # crosses an epoch boundary
    b = data.BatchLoader(tokens, batch_size=4, seq_len=15, seed=3)
    b.load_state_dict({"position": 7, "seed": 3})
    assert torch.equal(b.next(), seq[7])
    # each window is a contiguous slice of the stream
    w = seq[0][0]
    start = int(w[0])
    assert start % 16 == 0  # non-overlapping windows
    assert torch.equal(w, torch.from_numpy(tokens[start:start + 16]))
    # one epoch visits every window once
    firsts = torch.cat([s[:, 0] for s in seq[: a.batches_per_epoch]])
    assert len(set(firsts.tolist())) == len(firsts)
    with pytest.raises(ValueError, match="seed"):
        b.load_state_dict({"position": 0, "seed": 4})


def test_bin_file_split_and_vocab(tmp_path):
    ids = (np.arange(5000) * 7 % 1000).astype("<u2")
    path = tmp_path / "tokens.bin"
    ids.tofile(path)
    corpus = data.load_corpus(str(path), val_percent=10.0)
    assert corpus.vocab_size == 1000
    assert np.array_equal(np.concatenate([corpus.train, corpus.val]), ids)
    assert len(corpus.val) == 500
    with pytest.raises(ValueError, match="vocab_size"):
        data.load_corpus(str(path), vocab_size=10)
    u8 = tmp_path / "bytes.bin"
    np.frombuffer(b"hello world " * 100, dtype=np.uint8).tofile(u8)
    assert data.load_corpus(str(u8), data_dtype="uint8").vocab_size == 256


def test_bad_data_paths_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="Invalid data path"):
        data.load_corpus(str(tmp_path / "missing"))
    (tmp_path / "notes.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="Invalid data path"):
        data.load_corpus(str(tmp_path / "notes.csv"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no files"):
        data.load_corpus(str(empty))


def test_bits_per_byte():
    assert data.bits_per_byte(np.log(256), 1.0) == pytest.approx(8.0)
    assert data.bits_per_byte(np.log(256), 4.0) == pytest.approx(2.0)


def test_checkpoint_crash_mid_write_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    ckpt.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    real_save = torch.save

    def crashing_save(obj, f, *args, **kwargs):
        f.write(b"partial garbage")  # some bytes reach the disk, then the process "dies"
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(ckpt.torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    state = ckpt.load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no temp file left behind
    ckpt.save_checkpoint({"step": 3, "w": torch.full((3,), 3.0)}, path)
    assert ckpt.load_checkpoint(path)["step"] == 3


def test_checkpoint_missing_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        ckpt.load_checkpoint(tmp_path / "nope.pt")
