"""Where the experiments read and write: the repository checkout when there is one.

The scripts are imported as the installed package ``lrgrad_experiments`` (never through a
``sys.path`` entry for the repository root, where the top-level ``kernels/`` folder would shadow
Hugging Face's ``kernels`` package). Results and the repository's docs live beside the package in a
checkout (the editable install ``make`` does); an installed copy writes under the working directory.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
#: the repository checkout (its ``pyproject.toml`` sits one level above this package), else the cwd
REPO = _PACKAGE.parent if (_PACKAGE.parent / "pyproject.toml").is_file() else Path.cwd()
RESULTS = REPO / "results"
#: the pretraining CLI as a script path (torchrun and subprocess launches need a file)
PRETRAIN_SCRIPT = _PACKAGE / "pretrain_llama.py"
