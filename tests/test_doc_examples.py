"""Every ```python block of README.md and docs/*.md runs (issue 29, item 6).

The blocks of one file run in order in one namespace (a later block may use an earlier one's names),
which starts with ``torch``, ``lrgrad`` and ``model``: a tiny Hugging Face LLaMA built from a config
(no download), so a block that says ``model`` gets a real one. Each file runs in a temporary directory.
Two HTML comments in the markdown steer a block (they do not render):

* ``<!-- doc-test: setup ... -->`` on the lines before a block: hidden code run first, for inputs a
  reader brings (a data loader, a tensor); keep it short.
* ``<!-- doc-test: skip <reason> -->`` on the line before a block: not run; the reason is required
  and must say what the block needs that a CPU test cannot have (torchrun, a GPU, the hub).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch

import lrgrad

ROOT = Path(__file__).resolve().parent.parent
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
SETUP = re.compile(r"<!--\s*doc-test:\s*setup\s*\n(.*)-->", re.S)
SKIP = re.compile(r"<!--\s*doc-test:\s*skip\s+(.*?)\s*-->")


def blocks(path: Path) -> list[tuple[int, str, str | None, str | None]]:
    """``(line, code, setup, skip_reason)`` of each python block of ``path``."""
    text = path.read_text()
    found = []
    for match in BLOCK.finditer(text):
        before = text[: match.start()].rstrip("\n")
        last_comment = before[before.rfind("<!--"):] if "<!--" in before else ""  # the comment right above
        setup = SETUP.fullmatch(last_comment)
        skip = SKIP.fullmatch(last_comment)
        found.append((text.count("\n", 0, match.start()) + 1, match.group(1),
                      setup.group(1) if setup else None, skip.group(1) if skip else None))
    return found


def tiny_model() -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=32, tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def test_the_files_have_blocks_and_the_markers_are_well_formed():
    every = {path.name: blocks(path) for path in FILES}
    assert every["README.md"], "README.md has no python block"
    for name, found in every.items():
        for line, _, _, reason in found:
            assert reason is None or len(reason) > 10, f"{name}:{line}: a skip needs its reason"
    skipped = [(name, line) for name, found in every.items() for line, _, _, reason in found if reason]
    assert len(skipped) <= 3, f"keep skipped blocks few: {skipped}"


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_every_python_block_runs(path, tmp_path, monkeypatch):
    found = blocks(path)
    if not found:
        return
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_DISABLED", "true")
    namespace = {"__name__": f"doc_{path.stem}", "torch": torch, "lrgrad": lrgrad, "model": tiny_model()}
    for line, code, setup, reason in found:
        if reason:
            continue
        source = (setup or "") + code
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "no param can be projected" on the tiny model
            try:
                exec(compile(source, f"{path.name}:{line}", "exec"), namespace)  # noqa: S102
            except Exception as error:  # noqa: BLE001 - name the block that failed
                raise AssertionError(f"{path.relative_to(ROOT)}, the python block at line {line}: "
                                     f"{type(error).__name__}: {error}") from error
