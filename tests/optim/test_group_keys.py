"""Param-group keys written for other libraries: honoured, refused by name, or warned about (issue 29.9)."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from state_utils import roundtrip
from tiny_model import TinyLM, train

import lrgrad


def matrix(seed: int = 0, shape: tuple[int, int] = (24, 40)) -> torch.nn.Parameter:
    torch.manual_seed(seed)
    return torch.nn.Parameter(torch.randn(*shape, dtype=torch.float64))


def run(opt: torch.optim.Optimizer, params: list[torch.Tensor], steps: int = 3) -> None:
    for step in range(steps):
        for i, p in enumerate(params):
            torch.manual_seed(100 * step + i)
            p.grad = torch.randn_like(p)
        opt.step()


def test_pytorch_optimizers_projection_type_is_proj_type():
    """pytorch-optimizer's GaLore writes ``projection_type``; the group runs that side, exactly as
    lrgrad's own ``proj_type`` does (and not the default ``std``, which projects the other side of 24 x 40)."""
    theirs, ours, default = matrix(), matrix(), matrix()
    opt = lrgrad.GaLoreAdamW([{"params": [theirs], "rank": 4, "projection_type": "right"}], lr=1e-2)
    assert opt.param_groups[0]["proj_type"] == "right" and "projection_type" not in opt.param_groups[0]
    run(opt, [theirs])
    run(lrgrad.GaLoreAdamW([{"params": [ours], "rank": 4, "proj_type": "right"}], lr=1e-2), [ours])
    run(lrgrad.GaLoreAdamW([{"params": [default], "rank": 4}], lr=1e-2), [default])
    assert torch.equal(theirs, ours)
    assert not torch.allclose(theirs, default)


def test_apollo_torchs_proj_is_projector():
    opt = lrgrad.APOLLOAdamW([{"params": [matrix()], "rank": 4, "proj": "svd"}], lr=1e-2)
    assert opt.param_groups[0]["projector"] == "svd"
    with pytest.raises(ValueError, match="proj.*'svd'.*projector='random'"):
        lrgrad.APOLLOAdamW([{"params": [matrix()], "rank": 4, "proj": "svd", "projector": "random"}])


@pytest.mark.parametrize(("key", "instead"), [("alpha", "scale"), ("quant_n_bit", "proj_bits"),
                                              ("cos_threshold", "adaptive_threshold")])
def test_keys_lrgrad_spells_otherwise_are_refused_by_name(key, instead):
    with pytest.raises(ValueError, match=f"Invalid {key}:.*{instead}"):
        lrgrad.FiraAdamW([{"params": [matrix()], "rank": 4, key: 1}], lr=1e-2)


def test_an_unknown_key_in_a_projected_group_warns_once():
    groups = [{"params": [matrix(0)], "rank": 4, "amsgrad": True}, {"params": [matrix(1)], "rank": 4, "amsgrad": True}]
    with pytest.warns(UserWarning, match="'amsgrad' is not an option") as record:
        opt = lrgrad.GaLoreAdamW(groups, lr=1e-2)
        opt.add_param_group({"params": [matrix(2)], "rank": 4, "amsgrad": True})
    assert sum("amsgrad" in str(w.message) for w in record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # known keys (the rule's, the projector's, torch's) never warn
        lrgrad.GaLoreAdamW([{"params": [matrix()], "rank": 4, "betas": (0.9, 0.95), "svd": "gram",
                             "param_names": ["w"]}], lr=1e-2)


@pytest.mark.parametrize("name", sorted(lrgrad.OPTIMIZERS))
def test_numpy_scalars_train_as_python_numbers_and_checkpoint_with_weights_only(name):
    """Hyperparameters from numpy (a sweep's ``np.logspace``, a config array): ``np.float32`` is no
    ``float`` and ``np.float64`` is one, but torch's ``weights_only`` loader refuses either inside a
    checkpoint's param groups, so the resume would fail long after the run started. They are taken as
    the Python numbers they hold: the same trajectory, bit for bit, and a checkpoint that loads."""
    torch.manual_seed(0)
    ref_model = TinyLM()
    model = copy.deepcopy(ref_model)
    cls = lrgrad.OPTIMIZERS[name]
    lr = float(np.float32(1e-2))  # the float32 value the numpy lr holds (not 0.01)
    ref = cls(lrgrad.param_groups(ref_model, rank=8, update_proj_gap=2), lr=lr, weight_decay=0.05)
    groups = lrgrad.param_groups(model, rank=np.int64(8), update_proj_gap=np.int64(2))
    groups[0]["weight_decay"] = np.float64(0.05)  # a group's own value, written by numpy
    opt = cls(groups, lr=np.float32(1e-2), weight_decay=np.float64(0.05))
    train(ref_model, ref, steps=3)
    train(model, opt, steps=3)
    assert all(torch.equal(a, b) for a, b in zip(ref_model.parameters(), model.parameters()))
    saved = roundtrip(opt.state_dict())  # torch.load(..., weights_only=True)
    for group in saved["param_groups"]:
        for key, value in group.items():
            values = value if isinstance(value, (tuple, list)) else [value]
            assert all(type(v).__module__ != "numpy" for v in values), (key, value)
    fresh = cls(lrgrad.param_groups(copy.deepcopy(model), rank=8, update_proj_gap=2), lr=1e-2, weight_decay=0.05)
    fresh.load_state_dict(saved)
