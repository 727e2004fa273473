"""torch.compile: compiling the step is refused with one clear error; compiling the model works
(README, "torch.compile"; the eager backend keeps CI fast and captures the same graphs)."""

from __future__ import annotations

import pytest
import torch
from tiny_model import TinyLM, lm_loss, make_batch

import lrgrad
from lrgrad.optim.compile_guard import MESSAGE

PROJECTED = ["GaLoreAdamW", "DCTAdamW", "FloraAdamW", "OnlineSubspaceAdamW", "QGaLoreAdamW", "GaLoreAdamW8bit"]


def params_with_grads():
    torch.manual_seed(0)
    w, b = torch.nn.Parameter(torch.randn(48, 32)), torch.nn.Parameter(torch.randn(32))
    w.grad, b.grad = torch.randn(48, 32), torch.randn(32)
    return w, b


@pytest.mark.parametrize("name", PROJECTED)
def test_compiled_step_is_refused_with_the_reason_and_changes_nothing(name):
    w, b = params_with_grads()
    before = w.detach().clone()
    opt = lrgrad.OPTIMIZERS[name]([w, b], rank=8, lr=1e-2)
    step = torch.compile(opt.step, backend="eager")
    for _ in range(2):  # every call, not only the first (Dynamo must not cache its way around it)
        with pytest.raises(RuntimeError, match=r"torch.compile\(opt.step\) is not supported .* compile the model"):
            step()
    assert torch.equal(w.detach(), before) and not opt.state
    opt.step()  # the eager step still works afterwards
    assert not torch.equal(w.detach(), before)


def test_fullgraph_compile_reports_the_same_reason():
    w, b = params_with_grads()
    opt = lrgrad.GaLoreAdamW([w, b], rank=8)
    with pytest.raises(Exception, match=r"cannot be compiled: torch.compile\(opt.step\) is not supported"):
        torch.compile(opt.step, backend="eager", fullgraph=True)()
    assert "{name}" in MESSAGE


@pytest.mark.parametrize("name", ["GaLoreAdamW", "QGaLoreAdamW"])
def test_compiled_model_trains_exactly_like_the_eager_model(name):
    torch.manual_seed(0)
    base = TinyLM()
    results = []
    for compiled in (False, True):
        model = TinyLM()
        model.load_state_dict(base.state_dict())
        net = torch.compile(model, backend="eager") if compiled else model
        opt = lrgrad.OPTIMIZERS[name](net.named_parameters(), rank=8, lr=3e-3)
        for step in range(4):
            loss = lm_loss(net, make_batch(seed=step))
            opt.zero_grad()
            loss.backward()
            opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
