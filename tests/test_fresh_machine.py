"""The repository never shadows an installed package, and its scripts run from any directory.

The top-level folders (``kernels/``, ``experiments/``, ``tests/``, ...) are fixed by the layout, but
only ``lrgrad`` is meant to be imported under its folder's name: ``kernels/`` is installed as
``lrgrad.kernels`` and ``experiments/`` as ``lrgrad_experiments``. If the repository root lands on
``sys.path`` (``python -m pytest`` from the root, a ``sys.path.insert`` in a script), ``import kernels``
finds the repo's folder instead of Hugging Face's ``kernels`` package, and transformers (>= 5.25
imports it when it builds a model) fails with ``ImportError: cannot import name ... from 'kernels'``.
These tests fail on a tree that lets that happen: in this process (the way ``make test`` runs), in the
scripts as a user starts them (from the root and from elsewhere), and statically in the sources. A user's
own ``python`` started in the root is covered too: the folder, imported as a top-level ``kernels``, hands
the import to the installed package.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: the one top-level folder whose import name is its folder's name (the editable lrgrad install)
OWN_NAME = {"lrgrad"}
TINY_RUN = ["--config", "llama_test", "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1",
            "--max-bytes", "60000", "--no-progress", "--quiet", "--threads", "1", "--max-steps", "2",
            "--optimizer", "galore_adamw"]


def top_level_folders() -> list[str]:
    """Folders at the repository root that hold Python code (each could shadow a package of that name)."""
    return sorted(p.name for p in REPO.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and any(p.rglob("*.py")) and p.name not in OWN_NAME)


def resolves_into_repo(name: str) -> Path | None:
    """Where ``import name`` would come from, if that is the repository's own top-level folder."""
    spec = importlib.util.find_spec(name)
    if spec is None:
        return None
    places = [spec.origin] if spec.origin else []
    places += list(spec.submodule_search_locations or [])
    for place in places:
        if place and Path(place).resolve().is_relative_to(REPO / name):
            return Path(place)
    return None


def test_repository_root_is_not_on_sys_path():
    entries = [Path(p or ".").resolve() for p in sys.path]
    assert REPO not in entries, f"{REPO} is on sys.path: its kernels/ folder shadows Hugging Face's `kernels`"


@pytest.mark.parametrize("name", top_level_folders())
def test_top_level_folder_is_not_importable_by_its_name(name):
    assert resolves_into_repo(name) is None, f"`import {name}` resolves to the repository's {name}/ folder"


def test_kernels_resolves_to_the_installed_distribution():
    """transformers >= 5.25 requires Hugging Face's `kernels`; the name must be the distribution's."""
    dist = importlib.metadata.distribution("kernels")  # raises if transformers did not bring it
    spec = importlib.util.find_spec("kernels")
    assert spec is not None and spec.origin is not None
    files = {str(dist.locate_file(f).resolve()) for f in dist.files or () if f.name == "__init__.py"}
    assert str(Path(spec.origin).resolve()) in files, f"`kernels` comes from {spec.origin}, not {dist.name}"


def test_no_source_puts_the_repository_root_on_sys_path():
    pattern = re.compile(r"sys\.path\.(insert|append)\(.*(parent\.parent|parents\[[12]\]|ROOT|REPO)")
    offenders = [f"{path.relative_to(REPO)}:{n}" for folder in ("experiments", "tests", "lrgrad", "kernels")
                 for path in (REPO / folder).rglob("*.py")
                 for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []


def scripts() -> list[Path]:
    """Every experiments script a user starts by path (its own command line under ``__main__``)."""
    found = []
    for path in sorted((REPO / "experiments").rglob("*.py")):
        text = path.read_text()
        if 'if __name__ == "__main__"' in text and "argparse" in text:
            found.append(path)
    return found


def run_script(script: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, str(script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("script", scripts(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_script_starts_from_another_directory(script, tmp_path):
    proc = run_script(script, "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "usage:" in proc.stdout


@pytest.mark.parametrize("where", ["repo_root", "elsewhere"])
def test_pretraining_runs_two_steps_from_any_directory(where, tmp_path):
    """Builds a transformers LLaMA (which imports `kernels`) and trains it: the shadowing failure mode."""
    cwd = REPO if where == "repo_root" else tmp_path
    proc = run_script(REPO / "experiments" / "pretrain_llama.py", *TINY_RUN, "--out-dir", str(tmp_path / "run"),
                      cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run").is_dir()


def test_console_entry_point_runs(tmp_path):
    exe = Path(sys.executable).with_name("lrgrad-pretrain")
    assert exe.exists(), "the lrgrad-experiments distribution's console script is not installed"
    proc = subprocess.run([str(exe), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-3000:]


def python_at_root(code: str, *flags: str) -> subprocess.CompletedProcess:
    """``python -c`` started in the repository root as a user would: the root is sys.path[0]."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    return subprocess.run([sys.executable, *flags, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def test_a_python_started_in_the_root_still_gets_hugging_faces_kernels():
    """With the root first on sys.path, ``import kernels`` (transformers does it) lands on the installed
    package, not on our folder, and a transformers LLaMA builds; ``lrgrad.kernels`` is still ours."""
    proc = python_at_root(
        "import sys, kernels, lrgrad.kernels\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,"
        " num_attention_heads=2, num_key_value_heads=2, vocab_size=64))\n"
        "print(repr(sys.path[0]), kernels.__file__, lrgrad.kernels.__file__, sep='\\n')\n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, hf, ours = proc.stdout.strip().splitlines()[-3:]
    assert first == "''"  # the working directory (the root) was on sys.path: the shadowing set-up
    dist = importlib.metadata.distribution("kernels")
    assert Path(hf).resolve() == Path(dist.locate_file("kernels/__init__.py")).resolve()
    assert Path(ours).resolve() == REPO / "kernels" / "__init__.py"


def test_without_another_kernels_package_the_shadowing_import_says_so():
    # -S: no site-packages, so Hugging Face's `kernels` is not there to hand the import to
    proc = python_at_root("import kernels", "-S")
    assert proc.returncode != 0
    assert "imported as `lrgrad.kernels`" in proc.stderr and "no other package named `kernels`" in proc.stderr
