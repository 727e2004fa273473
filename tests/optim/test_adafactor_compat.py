"""GaLoreAdafactor takes transformers.Adafactor's / galore-torch's keyword arguments with their meaning."""

from __future__ import annotations

import pytest
import torch

import lrgrad

ADAFACTOR_PRESETS = ["GaLoreAdafactor", "DCTAdafactor", "FloraAdafactor", "LowRankAdafactor"]


def run(opt_cls, params, grads, **kwargs):
    opt = opt_cls(params, **kwargs)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("beta1", [None, 0.9])
def test_full_rank_matches_transformers_adafactor_with_its_kwargs(beta1):
    """transformers.Adafactor is the oracle: same kwargs, same trajectory (lrgrad full-rank: no rank)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    shapes = [(12, 8), (8,)]
    start = [torch.randn(s, dtype=torch.float64) for s in shapes]
    grads = [[torch.randn(s, dtype=torch.float64) for s in shapes] for _ in range(6)]
    kwargs = dict(lr=1e-2, eps=(1e-30, 1e-3), clip_threshold=1.0, decay_rate=-0.6, beta1=beta1, weight_decay=0.1,
                  scale_parameter=False, relative_step=False, warmup_init=False)
    theirs = run(transformers.Adafactor, [torch.nn.Parameter(t.clone()) for t in start], grads, **kwargs)
    ours = run(lrgrad.GaLoreAdafactor, [torch.nn.Parameter(t.clone()) for t in start], grads, **kwargs)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ADAFACTOR_PRESETS)
def test_decay_rate_and_eps_pair_mean_beta2_decay_and_eps(name):
    torch.manual_seed(1)
    start = torch.randn(24, 16)
    grads = [[torch.randn(24, 16)] for _ in range(3)]
    cls = lrgrad.OPTIMIZERS[name]
    a = run(cls, [torch.nn.Parameter(start.clone())], grads, rank=4, decay_rate=-0.5, eps=(1e-30, 1e-3),
            relative_step=False, scale_parameter=False, warmup_init=False)
    b = run(cls, [torch.nn.Parameter(start.clone())], grads, rank=4, beta2_decay=-0.5, eps=1e-30)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)


def test_unsupported_transformers_settings_say_what_to_use_instead():
    p = [torch.nn.Parameter(torch.randn(8, 8))]
    with pytest.raises(ValueError, match=r"relative_step.*relative_step=False with a float lr"):
        lrgrad.GaLoreAdafactor(p, relative_step=True)
    with pytest.raises(ValueError, match=r"scale_parameter.*scale_parameter=False"):
        lrgrad.GaLoreAdafactor(p, scale_parameter=True, relative_step=False)
    with pytest.raises(ValueError, match=r"warmup_init.*warmup_init=False"):
        lrgrad.GaLoreAdafactor(p, warmup_init=True, relative_step=False, scale_parameter=False)
    with pytest.raises(ValueError, match=r"lr.*pass a float lr"):
        lrgrad.GaLoreAdafactor(p, lr=None, relative_step=False, scale_parameter=False)
    with pytest.raises(ValueError, match="decay_rate.*beta2_decay"):
        lrgrad.GaLoreAdafactor(p, decay_rate=-0.5, beta2_decay=-0.7)
    with pytest.raises(TypeError, match="relative_step"):
        lrgrad.GaLoreAdafactor(p, relative_step="no")
    with pytest.raises(ValueError, match="eps"):
        lrgrad.GaLoreAdafactor(p, eps=(1e-30, 1e-3, 1.0))
