"""Bad values are refused by name, and a refused step changes nothing (issue 29, item 5)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from state_utils import assert_states_equal

import lrgrad


@pytest.mark.parametrize("scale", [-1.0, -0.25, 0.0, math.inf, math.nan])
def test_a_scale_that_is_not_positive_and_finite_is_refused(scale):
    w = torch.nn.Parameter(torch.randn(16, 12))
    with pytest.raises(ValueError, match="scale"):
        lrgrad.GaLoreAdamW([w], rank=4, scale=scale)
    with pytest.raises(ValueError, match="scale"):  # a galore-torch style group carrying it
        lrgrad.GaLoreAdamW([{"params": [w], "rank": 4, "update_proj_gap": 200, "scale": scale, "proj_type": "std"}])
    with pytest.raises(ValueError, match="scale"):
        lrgrad.APOLLOAdamW([w], rank=4, scale=scale)


def test_a_preset_names_the_generic_class_when_given_a_projector():
    w = torch.nn.Parameter(torch.randn(16, 12))
    with pytest.raises(TypeError, match=r"GaLoreAdamW fixes projector.*LowRankAdamW"):
        lrgrad.GaLoreAdamW([w], rank=4, projector="dct")


def params_and_optimizer():
    torch.manual_seed(0)
    dense = [torch.nn.Parameter(torch.randn(16, 12)), torch.nn.Parameter(torch.randn(12))]
    table = torch.nn.Parameter(torch.randn(20, 8))
    opt = lrgrad.GaLoreAdamW([{"params": dense}, {"params": [table], "rank": None}], rank=4, update_proj_gap=2)
    return dense, table, opt


def test_a_sparse_gradient_in_a_later_group_leaves_every_param_and_state_untouched():
    dense, table, opt = params_and_optimizer()
    for p in (*dense, table):
        p.grad = torch.randn_like(p)
    opt.step()  # a first step so there is state to compare
    before_params = [p.detach().clone() for p in (*dense, table)]
    before_state = copy.deepcopy(opt.state_dict())
    for p in dense:
        p.grad = torch.randn_like(p)
    table.grad = torch.randn(20, 8).to_sparse()  # what nn.Embedding(sparse=True) produces
    with pytest.raises(ValueError, match="sparse"):
        opt.step()
    for p, ref in zip((*dense, table), before_params):
        assert torch.equal(p, ref)
    assert_states_equal(opt.state_dict(), before_state)


def test_a_sparse_gradient_in_the_same_group_leaves_earlier_params_untouched():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(16, 12)), torch.nn.Parameter(torch.randn(20, 8))]
    opt = lrgrad.GaLoreAdamW(params, rank=4)
    params[0].grad = torch.randn(16, 12)
    params[1].grad = torch.randn(20, 8).to_sparse()
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match="sparse"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert all(not opt.state[p] for p in params)
