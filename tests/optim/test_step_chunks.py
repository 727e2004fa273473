"""The step streams params through a bounded workspace (``lrgrad/optim/pipeline.py``): cutting it into
chunks of any size, and full-rank params into flat slices, changes no bit of the result."""

from __future__ import annotations

import pytest
import torch
from tiny_model import TinyLM, lm_loss, make_batch

import lrgrad
from lrgrad.optim.pipeline import full_rank_pieces
from lrgrad.rules.adamw import AdamWRule
from lrgrad.rules.base import UpdateRule

CASES = [("GaLoreAdamW", {}), ("FloraAdamW", {}), ("APOLLOAdamW", {}), ("FiraAdamW", {}),
         ("GaLoreAdamW8bit", {}),
         ("GaLoreAdamW8bit", {"moment_min_size": 0, "moment_block_size": 32}),
         ("OnlineSubspaceAdamW", {}), ("GaLoreAdamW", {"maximize": True}),
         ("GaLoreAdafactor", {}), ("Muon", {})]


def train(name, options, dtype, workspace, steps=4):
    torch.manual_seed(0)
    model = TinyLM().to(dtype)
    cls = getattr(lrgrad, name)
    params = model.parameters() if name == "Muon" else lrgrad.param_groups(model, rank=8, update_proj_gap=2)
    opt = cls(params, lr=0.01, **options)
    if workspace is not None:
        opt.step_workspace_bytes = workspace
    for step in range(steps):
        lm_loss(model, make_batch(seed=step)).backward()
        opt.step()
        opt.zero_grad()
    return model, opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("name", "options"), CASES, ids=[f"{n}-{'-'.join(o) or 'default'}" for n, o in CASES])
def test_chunked_step_is_bit_identical(name, options, dtype):
    whole, opt_whole = train(name, options, dtype, workspace=2**40)  # one chunk, no slices
    cut, opt_cut = train(name, options, dtype, workspace=256)  # one projected param a chunk, 64-element slices
    if options.get("moment_min_size") == 0:  # the embedding's 8-bit moments were stepped in slices
        assert any(opt_cut.rule_for(g).slice_state(opt_cut.state[p], p, 0, 64) is not None
                   for g in opt_cut.param_groups for p in g["params"] if not opt_cut.is_projected(p, g))
    for (key, a), b in zip(whole.named_parameters(), cut.parameters()):
        assert torch.equal(a, b), key
    for p_a, p_b in zip(whole.parameters(), cut.parameters()):
        for key, value in opt_whole.state[p_a].items():
            other = opt_cut.state[p_b][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, key


def test_full_rank_pieces_cover_every_element_once_within_the_budget():
    params = [torch.zeros(10, 7), torch.zeros(3), torch.zeros(50), torch.zeros(4, 4).T]  # the last: not contiguous
    grads = [torch.ones_like(p) for p in params]
    states = [{"exp_avg": torch.zeros_like(p), "step": 1} for p in params]
    for ps, gs, ss in full_rank_pieces(params, grads, states, 16, AdamWRule({})):
        assert all(g.shape == p.shape for p, g in zip(ps, gs))
        assert sum(p.numel() for p in ps) <= 16 or len(ps) == 1
        for p, s in zip(ps, ss):
            p.add_(1)  # views: lands in the real tensors
            s["exp_avg"].add_(2)
            assert s["step"] == 1
    for p, s in zip(params, states):
        assert torch.equal(p, torch.ones_like(p)) and torch.equal(s["exp_avg"], torch.full_like(p, 2.0))
    # a rule that is not elementwise gets whole tensors
    batches = list(full_rank_pieces(params, grads, states, 16, UpdateRule({})))
    assert [p for ps, _, _ in batches for p in ps] == params


def test_workspace_is_bounded_at_a_step(monkeypatch):
    """At most one chunk of low-rank gradients is alive at once: with a budget of one param, the rule
    never sees more than one projected param per call."""
    model, _ = train("GaLoreAdamW", {}, torch.float32, None, steps=0)
    opt = lrgrad.GaLoreAdamW(lrgrad.param_groups(model, rank=8), lr=0.01)
    opt.step_workspace_bytes = 1
    sizes = []
    rule_cls = lrgrad.rules.RULES["adamw"]
    original = rule_cls.update_many

    def spy(self, states, grads, steps, reuse_grads=False):
        sizes.append(len(grads))
        return original(self, states, grads, steps, reuse_grads)

    monkeypatch.setattr(rule_cls, "update_many", spy)
    lm_loss(model, make_batch()).backward()
    opt.step()
    projected = sum(opt.is_projected(p, g) for g in opt.param_groups for p in g["params"])
    assert sizes == [1] * projected
    sizes.clear()
    opt.step_workspace_bytes = 2**40
    lm_loss(model, make_batch(seed=1)).backward()
    opt.step()
    assert sizes == [projected]
