"""The newer methods (Grass, FRUGAL, ...) on the paths every lrgrad optimizer has: per-layer updates
with accumulation and exact global-norm clipping equal the ordinary loop, and 8-bit moments train."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_model import TinyLM, run_windows, train

import lrgrad

METHODS = ["GrassAdamW", "FRUGALAdamW", "GoLoreAdamW", "CondaAdamW", "LDAdamW"]
#: each method with its default options and with the options that change its path (a sampled Grass
#: selection; FRUGAL inside Grass; GoLore's SVD warm-up before the random frames)
CASES = [("GrassAdamW", {}), ("GrassAdamW", {"grass_select": "norm"}), ("FRUGALAdamW", {}),
         ("FRUGALAdamW", {"projector": "grass", "grass_select": "norm"}), ("GoLoreAdamW", {}),
         ("GoLoreAdamW", {"golore_switch": 2}), ("CondaAdamW", {}), ("LDAdamW", {}),
         ("LDAdamW", {"ldadam_error_feedback": False})]
#: projectors that advance state with the gradient they project (Conda's momentum, LDAdam's error buffer):
#: per-layer clipping projects the unclipped gradient and scales R afterwards, so they run it unclipped
UNCLIPPED = ("CondaAdamW", "LDAdamW")


@pytest.mark.parametrize(("name", "options"), CASES)
def test_layerwise_equals_ordinary_with_accumulation_and_clipping(name, options):
    max_norm = None if name in UNCLIPPED else 0.05  # docs/conda.md, "Contract notes"
    torch.manual_seed(0)
    base = TinyLM().double()
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    run_windows(a, name, layerwise=False, windows=3, accumulation=2, max_norm=max_norm, **options)
    _, lw = run_windows(b, name, layerwise=True, windows=3, accumulation=2, max_norm=max_norm, **options)
    for (key, x), y in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-10, msg=key)
    if max_norm is not None:
        assert lw.last_grad_norm > max_norm  # the clip was active
    assert all(p.grad is None for p in b.parameters())


@pytest.mark.parametrize("name", METHODS)
def test_eight_bit_moments_train(name):
    """The preset with blockwise 8-bit moments (``rule="adamw8bit"`` through the generic class)."""
    torch.manual_seed(0)
    model = TinyLM()
    row = lrgrad.optim.presets.preset(name)
    opt = lrgrad.LowRankOptimizer(lrgrad.param_groups(model, rank=8, update_proj_gap=5), lr=1e-2, rule="adamw8bit",
                                  projector=row.projector, moment_min_size=16,
                                  **{k: v for k, v in row.overrides.items() if k != "lr"})
    losses = train(model, opt, steps=15)
    assert sum(losses[-3:]) / 3 < 0.85 * losses[0], losses
    codes = [s["exp_avg_codes"] for s in opt.state.values() if "exp_avg_codes" in s]
    assert codes and all(c.dtype == torch.int8 for c in codes)
