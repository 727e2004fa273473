"""The preset table (lrgrad/optim/presets.py): each class's signature states what it builds, rows refine
their parents, and a preset refuses what it fixes by name."""

from __future__ import annotations

import inspect

import pytest
import torch

import lrgrad
from lrgrad.optim.presets import PRESETS, resolve


def matrix() -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.randn(12, 10))


@pytest.mark.parametrize("name", [row.name for row in PRESETS])
def test_the_signature_states_the_defaults_the_optimizer_uses(name):
    """Every keyword with a default in ``inspect.signature`` (what ``help()`` and IDEs show) is the value the
    built optimizer's defaults hold, for every preset (so the table, the signature and the behaviour agree)."""
    cls = lrgrad.OPTIMIZERS[name]
    params = inspect.signature(cls).parameters
    assert list(params)[:2] == ["params", "lr"] and inspect.Parameter.VAR_KEYWORD in {p.kind for p in params.values()}
    defaults = cls([matrix()]).defaults
    shown = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    # None states "derived" (scale: the projector's RMS-matched default; conda_beta: betas[0]); the rest is literal
    literal = {k for k, v in shown.items() if v is not None and k in defaults}
    assert {k: shown[k] for k in literal} == {k: defaults[k] for k in literal}
    assert set(shown) - set(defaults) <= {"projector", "adamw_for_embeddings"}
    assert defaults["rule"] == resolve(cls.preset.row).rule


def test_rows_refine_their_parents_and_positional_arguments_keep_torchs_order():
    assert issubclass(lrgrad.APOLLOMiniAdamW, lrgrad.APOLLOAdamW)
    assert issubclass(lrgrad.GaLoreAdamW, lrgrad.LowRankAdamW)
    mini = lrgrad.APOLLOMiniAdamW([matrix()]).defaults
    assert (mini["rank"], mini["scale"], mini["scale_type"], mini["full_rank"]) == (1, 128**0.5, "tensor", "apollo")
    opt = lrgrad.GaLoreAdamW([matrix()], 1e-2, (0.8, 0.9), 1e-6, 0.0)  # torch.optim.AdamW's positional order
    assert (opt.defaults["lr"], opt.defaults["betas"], opt.defaults["eps"], opt.defaults["weight_decay"]) == (
        1e-2, (0.8, 0.9), 1e-6, 0.0)
    with pytest.raises(TypeError):
        lrgrad.GaLoreAdamW([matrix()], 1e-2, (0.8, 0.9), 1e-6, 0.0, 8)  # rank is keyword-only, as before


def test_a_preset_refuses_the_projector_or_rule_it_fixes_by_name():
    with pytest.raises(TypeError, match="Invalid projector: GaLoreAdamW fixes projector='svd'.*LowRankAdamW"):
        lrgrad.GaLoreAdamW([matrix()], projector="dct")
    with pytest.raises(TypeError, match="Invalid rule: FloraAdamW fixes rule='adamw'.*LowRankOptimizer"):
        lrgrad.FloraAdamW([matrix()], rule="lion")
    assert lrgrad.FiraAdamW([matrix()], projector="dct").defaults["projector"] == "dct"  # a row that lets you choose
