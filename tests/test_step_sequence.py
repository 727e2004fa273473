"""The step sequence exists once: per-layer updates and compressed accumulation choose *when* the
pipeline (``lrgrad/optim/pipeline.py``) runs and never call its stages themselves."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: the pipeline's entry points: the whole sequence, and the sequence split where a caller must wait
PIPELINE = {"step_params", "stage", "apply_staged", "unstage", "can_compress", "compress", "stage_compressed"}
#: the stages and the plug-ins' own methods: only the pipeline sequences them
STAGES = {"prepare_grad", "project_grad", "advance_subspace", "apply_low_rank", "apply_full_rank",
          "init_param_state", "snapshot_state", "restore_state", "count_skip", "nonfinite_flags",
          "projector_for", "rule_for", "rule_for_param", "down", "up", "refresh", "update_many", "update",
          "update_param_", "draw_for_step", "finish_deferred", "corrected_grad", "advance"}


def called_attributes(path: Path) -> set[str]:
    """Names of every ``x.name(...)`` call in ``path``."""
    tree = ast.parse(path.read_text())
    return {node.func.attr for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)}


def test_layerwise_and_accumulation_call_the_pipeline_not_its_stages():
    for name in ("layerwise.py", "accumulation.py"):
        calls = called_attributes(ROOT / "lrgrad" / name)
        assert calls & PIPELINE, f"{name} does not run the pipeline"
        assert not calls & STAGES, f"{name} re-sequences the step: it calls {sorted(calls & STAGES)}"


def test_the_check_can_fail(tmp_path):
    path = tmp_path / "fake.py"
    path.write_text("def f(opt, p, g, grad):\n    low = opt.project_grad(p, g, grad)\n    opt.apply_staged([])\n")
    assert called_attributes(path) & STAGES == {"project_grad"}
