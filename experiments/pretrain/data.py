"""Training data for the pretraining experiments, with no download by default.

Sources (``--data``):

* ``stdlib`` (default): the Python standard library's ``.py`` files, located with
  ``sysconfig.get_paths()["stdlib"]`` — text that exists on every machine that runs
  this script. Read byte-level (vocab 256, one token per byte, so bits per byte =
  loss / ln 2). Files are split into train/validation by a hash of their relative path
  (deterministic, disjoint, independent of file order or machine).
* ``PATH`` to a folder: every regular file below it (recursively) is read byte-level and
  split by file exactly like ``stdlib``.
* ``PATH`` to a ``.bin`` file: a pre-tokenized stream of little-endian token ids,
  ``uint16`` by default (the nanoGPT convention; ``--data-dtype uint8`` for bytes). The
  last ``val_fraction`` of the tokens is the validation split. ``--vocab-size`` gives the
  vocabulary size (default: the largest id + 1); ``--bytes-per-token`` the average number
  of text bytes per token, used for bits per byte (default 1).
* ``c4``: the GaLore paper's recipe — C4 (``allenai/c4``, ``en``) streamed with the
  ``datasets`` package and tokenized with a Hugging Face tokenizer (``t5-base``). Needs
  ``datasets`` installed and a reachable hub; otherwise it fails with a clear message.

Documents are joined with a 0 byte (never present in text files) as separator.

Batches are windows of ``seq_len + 1`` tokens. The order is a permutation of the
non-overlapping windows drawn from ``numpy.random.default_rng(seed + epoch)``, so a
batch is a pure function of ``(seed, position)``: the loader's whole state is one integer,
which is what makes resuming bit-identical.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

DOC_SEPARATOR = 0
BYTE_VOCAB = 256


def stdlib_root() -> Path:
    """The directory of the Python standard library's source files."""
    return Path(sysconfig.get_paths()["stdlib"])


def is_validation(relative_path: str, val_percent: float) -> bool:
    """Deterministic file-level split: a hash of the relative path picks the side."""
    digest = hashlib.sha256(relative_path.replace(os.sep, "/").encode("utf-8")).digest()
    bucket = int.from_bytes(digest[:8], "little") % 10_000
    return bucket < val_percent * 100


def list_text_files(root: Path, suffixes: tuple[str, ...] | None = None) -> list[str]:
    """Relative paths of the regular files below ``root``, sorted (``site-packages`` skipped)."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__", ".git"))
        for name in filenames:
            if suffixes is not None and not name.endswith(suffixes):
                continue
            full = Path(dirpath) / name
            if full.is_file() and not full.is_symlink():
                files.append(str(full.relative_to(root)))
    return sorted(files)


def split_files(files: list[str], val_percent: float) -> tuple[list[str], list[str]]:
    """(train, validation) lists of relative paths; disjoint, order-preserving."""
    train = [f for f in files if not is_validation(f, val_percent)]
    val = [f for f in files if is_validation(f, val_percent)]
    return train, val


def encode_bytes(text: str | bytes) -> np.ndarray:
    """Byte-level tokens (vocab 256) of ``text``."""
    raw = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return np.frombuffer(raw, dtype=np.uint8).copy()


def decode_bytes(tokens: np.ndarray | torch.Tensor | list[int]) -> str:
    """Inverse of :func:`encode_bytes`."""
    arr = np.asarray(tokens.cpu() if isinstance(tokens, torch.Tensor) else tokens, dtype=np.int64)
    return bytes(arr.astype(np.uint8).tolist()).decode("utf-8", errors="replace")


def _read_corpus(root: Path, files: list[str], max_bytes: int | None) -> np.ndarray:
    chunks: list[bytes] = []
    total = 0
    for rel in files:
        data = (root / rel).read_bytes().replace(b"\x00", b"")
        chunks.append(data)
        chunks.append(bytes([DOC_SEPARATOR]))
        total += len(data) + 1
        if max_bytes is not None and total >= max_bytes:
            break
    arr = np.frombuffer(b"".join(chunks), dtype=np.uint8)
    return arr[:max_bytes].copy() if max_bytes is not None else arr.copy()


@dataclass
class Corpus:
    """Train and validation token streams plus what evaluation needs to know."""

    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    bytes_per_token: float = 1.0
    name: str = ""
    train_files: list[str] = field(default_factory=list)
    val_files: list[str] = field(default_factory=list)


_CACHE: dict[tuple[Any, ...], Corpus] = {}


def load_folder(root: str | Path, val_percent: float = 5.0, max_bytes: int | None = None,
                suffixes: tuple[str, ...] | None = None, name: str | None = None) -> Corpus:
    """Byte-level corpus from the files below ``root``, split by file."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"Invalid data path: {str(root)!r} is not a directory")
    key = ("folder", str(root.resolve()), val_percent, max_bytes, suffixes)
    if key in _CACHE:
        return _CACHE[key]
    files = list_text_files(root, suffixes)
    if not files:
        raise ValueError(f"Invalid data path: no files found below {str(root)!r}")
    train_files, val_files = split_files(files, val_percent)
    if not train_files or not val_files:
        # Tiny folders: the hash split can leave one side empty; fall back to the last file for validation.
        train_files, val_files = files[:-1], files[-1:]
        if not train_files:
            raise ValueError(f"Invalid data path: {str(root)!r} needs at least two files (train and validation)")
    val_budget = None if max_bytes is None else max(max_bytes // 10, 1)
    corpus = Corpus(
        train=_read_corpus(root, train_files, max_bytes),
        val=_read_corpus(root, val_files, val_budget),
        vocab_size=BYTE_VOCAB,
        bytes_per_token=1.0,
        name=name or str(root),
        train_files=train_files,
        val_files=val_files,
    )
    _CACHE[key] = corpus
    return corpus


def load_stdlib(val_percent: float = 5.0, max_bytes: int | None = None) -> Corpus:
    """The embedded corpus: the standard library's ``.py`` files, byte-level."""
    return load_folder(stdlib_root(), val_percent, max_bytes, suffixes=(".py",), name="python-stdlib")


def load_bin(path: str | Path, dtype: str = "uint16", val_fraction: float = 0.005,
             vocab_size: int | None = None, bytes_per_token: float = 1.0) -> Corpus:
    """A pre-tokenized ``.bin`` stream of little-endian ``dtype`` token ids."""
    path = Path(path)
    if dtype not in ("uint16", "uint8"):
        raise ValueError(f"Invalid data_dtype: {dtype!r}; expected 'uint16' or 'uint8'")
    if not 0 < val_fraction < 1:
        raise ValueError(f"Invalid val_fraction: {val_fraction} (must be in (0, 1))")
    tokens = np.memmap(path, dtype=np.dtype(dtype).newbyteorder("<"), mode="r")
    if len(tokens) < 4:
        raise ValueError(f"Invalid data path: {str(path)!r} holds {len(tokens)} tokens")
    n_val = max(int(len(tokens) * val_fraction), 2)
    max_id = int(tokens.max())
    if vocab_size is None:
        vocab_size = BYTE_VOCAB if dtype == "uint8" else max_id + 1
    if max_id >= vocab_size:
        raise ValueError(f"Invalid vocab_size: {vocab_size}; {str(path)!r} contains token id {max_id}")
    return Corpus(train=tokens[:-n_val], val=tokens[-n_val:], vocab_size=vocab_size,
                  bytes_per_token=bytes_per_token, name=str(path))


def load_corpus(data: str = "stdlib", val_percent: float = 5.0, max_bytes: int | None = None,
                data_dtype: str = "uint16", vocab_size: int | None = None,
                bytes_per_token: float = 1.0) -> Corpus:
    """Resolve ``--data``: ``stdlib``, a folder, or a ``.bin`` file (``c4`` is streamed, see :class:`C4Stream`)."""
    if data == "stdlib":
        return load_stdlib(val_percent, max_bytes)
    path = Path(data)
    if not path.exists():
        raise ValueError(f"Invalid data path: {data!r} does not exist (expected 'stdlib', 'c4', a folder or a .bin)")
    if path.is_dir():
        return load_folder(path, val_percent, max_bytes)
    if path.suffix == ".bin":
        return load_bin(path, data_dtype, val_fraction=val_percent / 100, vocab_size=vocab_size,
                        bytes_per_token=bytes_per_token)
    raise ValueError(f"Invalid data path: {data!r} is neither a folder nor a .bin token file")


class BatchLoader:
    """Deterministic batches of ``seq_len + 1``-token windows; state is one integer (``position``)."""

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int = 0):
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"Invalid batch_size/seq_len: {batch_size}/{seq_len} (must be >= 1)")
        self.tokens = tokens
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.n_windows = len(tokens) // (seq_len + 1)
        if self.n_windows < batch_size:
            raise ValueError(
                f"Invalid data: {len(tokens)} tokens give {self.n_windows} windows of {seq_len + 1}, "
                f"fewer than batch_size {batch_size}"
            )
        self.batches_per_epoch = self.n_windows // batch_size
        self.position = 0
        self._order_epoch = -1
        self._order: np.ndarray | None = None

    def _order_for(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            self._order = np.random.default_rng(self.seed + epoch).permutation(self.n_windows)
            self._order_epoch = epoch
        return self._order  # type: ignore[return-value]

    def batch(self, position: int) -> torch.Tensor:
        """The batch at ``position`` (a ``batch_size x (seq_len + 1)`` int64 tensor)."""
        epoch, index = divmod(position, self.batches_per_epoch)
        windows = self._order_for(epoch)[index * self.batch_size:(index + 1) * self.batch_size]
        w = self.seq_len + 1
        rows = [np.asarray(self.tokens[i * w:(i + 1) * w], dtype=np.int64) for i in windows]
        return torch.from_numpy(np.stack(rows))

    def next(self) -> torch.Tensor:
        out = self.batch(self.position)
        self.position += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(f"Invalid data state: seed {state['seed']} != {self.seed}")
        self.position = int(state["position"])


def eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int, n_batches: int) -> list[torch.Tensor]:
    """Fixed validation batches: the first windows of the validation stream, in order."""
    w = seq_len + 1
    n_windows = len(tokens) // w
    if n_windows < 1:
        raise ValueError(f"Invalid data: the validation split ({len(tokens)} tokens) is shorter than seq_len + 1")
    total = min(n_windows, batch_size * n_batches)
    arr = np.asarray(tokens[: total * w], dtype=np.int64).reshape(total, w)
    return [torch.from_numpy(arr[i:i + batch_size]) for i in range(0, total, batch_size)]


def bits_per_byte(loss_nats: float, bytes_per_token: float) -> float:
    """Cross-entropy in nats per token -> bits per byte of text."""
    return loss_nats / math.log(2) / bytes_per_token


class DataSourceError(RuntimeError):
    """A data source that cannot be used here (missing package, unreachable hub)."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


class C4Stream:
    """The paper's data: documents tokenized with a Hugging Face tokenizer, packed into windows.

    ``source="c4"`` streams C4 (``allenai/c4``, ``en``) from the hub with ``datasets`` (the train split
    shuffled with ``seed`` in a 10,000-document buffer); a folder path reads its text files instead,
    one document per file, split train/validation by file exactly like the byte-level folders (the
    train files in a seeded order) — the tokenizing and packing are the same code, only the documents'
    source differs, which is how this is tested without a network. ``tokenizer`` is a hub name
    (``t5-base``) or a local tokenizer folder. Position = batches consumed; resuming re-reads the
    stream and skips that many batches.
    """

    def __init__(self, batch_size: int, seq_len: int, seed: int = 0, tokenizer: str = "t5-base",
                 split: str = "train", source: str = "c4", val_percent: float = 5.0):
        if split not in ("train", "validation"):
            raise ValueError(f"Invalid split: {split!r}; expected 'train' or 'validation'")
        try:
            from transformers import AutoTokenizer
        except ImportError as exc:  # pragma: no cover - transformers is a dependency of the experiments
            raise DataSourceError(f"tokenized data needs transformers ({exc})") from exc
        self.source, self.split, self.val_percent = source, split, val_percent
        if source == "c4":
            try:
                import datasets  # noqa: F401
            except ImportError as exc:
                raise DataSourceError(
                    "--data c4 needs the 'datasets' package (pip install datasets) and a reachable Hugging Face "
                    "hub; use the embedded corpus (--data stdlib) or --data PATH instead"
                ) from exc
            try:
                self.tokenizer = AutoTokenizer.from_pretrained(tokenizer)
                self.dataset = datasets.load_dataset("allenai/c4", "en", split=split, streaming=True)
                if split == "train":
                    self.dataset = self.dataset.shuffle(seed=seed, buffer_size=10_000)
            except Exception as exc:  # network errors come in many types
                raise DataSourceError(
                    f"--data c4: could not reach the Hugging Face hub ({type(exc).__name__}: {exc}); "
                    "use the embedded corpus (--data stdlib) or --data PATH instead"
                ) from exc
        else:
            root = Path(source)
            if not root.is_dir():
                raise ValueError(f"Invalid data path: {source!r} is not a directory (tokenized data reads a folder "
                                 "of text files, or 'c4')")
            try:
                self.tokenizer = AutoTokenizer.from_pretrained(tokenizer)
            except Exception as exc:  # a hub name without a network, a folder without a tokenizer
                raise DataSourceError(f"--tokenizer {tokenizer!r}: could not load it ({type(exc).__name__}: "
                                      f"{_first_line(exc)})") from exc
            files = list_text_files(root)
            train, val = split_files(files, val_percent)
            if not train or not val:  # tiny folders, as load_folder
                train, val = files[:-1], files[-1:]
            if not train:
                raise ValueError(f"Invalid data path: {source!r} needs at least two files (train and validation)")
            chosen = train if split == "train" else val
            if split == "train":
                chosen = [chosen[i] for i in np.random.default_rng(seed).permutation(len(chosen))]
            self.dataset = [{"text": (root / f).read_text(encoding="utf-8", errors="replace")} for f in chosen]
        self.vocab_size = len(self.tokenizer)
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.position = 0
        self._start(0, [])

    #: documents tokenized per call (a fast tokenizer encodes a list in parallel)
    DOCS_PER_CALL = 64

    def _start(self, docs: int, buffer: list[int]) -> None:
        """Continue the stream after ``docs`` documents, with ``buffer`` the tokens read but not yet batched."""
        skip = getattr(self.dataset, "skip", None)  # a streamed dataset skips without tokenizing
        self._docs_iter = iter(skip(docs)) if skip is not None and docs else itertools.islice(self.dataset, docs, None)
        self._docs, self._buf = docs, list(buffer)

    def _window(self) -> list[int]:
        """The next ``seq_len + 1`` tokens of the documents joined end to end."""
        w = self.seq_len + 1
        while len(self._buf) < w:
            texts = [row["text"] for row in itertools.islice(self._docs_iter, self.DOCS_PER_CALL)]
            if not texts:
                raise DataSourceError(f"tokenized data from {self.source!r} ({self.split}) ran out after "
                                      f"{self.position} batches of {self.batch_size} x {w} tokens")
            self._docs += len(texts)
            for ids in self.tokenizer(texts)["input_ids"]:
                self._buf.extend(ids)
        row = self._buf[:w]
        del self._buf[:w]
        return row

    def next(self) -> torch.Tensor:
        rows = [self._window() for _ in range(self.batch_size)]
        self.position += 1
        return torch.tensor(rows, dtype=torch.int64)

    def state_dict(self) -> dict[str, Any]:
        """Position, and where the stream stands: documents consumed and the tokens read but not yet batched
        (so a resume skips the documents instead of tokenizing the whole stream again)."""
        return {"position": self.position, "seed": self.seed, "docs": self._docs, "buffer": list(self._buf)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])
        if "docs" in state:
            self._start(int(state["docs"]), [int(t) for t in state["buffer"]])
            return
        target, self.position = self.position, 0  # a state without the stream's place: read up to it again
        self._start(0, [])
        while self.position < target:
            self.next()
