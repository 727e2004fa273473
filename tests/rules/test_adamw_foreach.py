"""AdamW's foreach path (``fused=False``, and every bf16/fp16 param) against ``torch.optim.AdamW``.

On CPU and CUDA, fp32 full-rank params take torch's fused kernel by default; the foreach path
is what ``fused=False`` and low-precision params run. Its numbers are compared here with
torch's own multi-tensor AdamW, which is the definition lrgrad's AdamW promises to follow.
"""

from __future__ import annotations

import pytest
import torch

import lrgrad

SHAPES = [(7,), (5, 3), (4, 3, 2)]
HYPER = {"lr": 1e-2, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.1}


def schedule(step: int) -> float:
    """Warmup then decay: the lr changes every step."""
    return min(1.0, (step + 1) / 3) * 0.8**step


def forbid_fused(monkeypatch) -> list[int]:
    """Fail if torch's fused kernel runs; count the foreach addcdiv calls (the foreach path ran)."""
    def fused(*args, **kwargs):
        raise AssertionError("the fused kernel must not run on this path")

    calls = []
    addcdiv = torch._foreach_addcdiv_

    def counting(*args, **kwargs):
        calls.append(1)
        return addcdiv(*args, **kwargs)

    monkeypatch.setattr(torch, "_fused_adamw_", fused)
    monkeypatch.setattr(torch, "_foreach_addcdiv_", counting)
    return calls


@pytest.mark.parametrize("maximize", [False, True])
def test_fp32_foreach_equals_torch_adamw_foreach(maximize, monkeypatch):
    ours = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = lrgrad.GaLoreAdamW(ours, fused=False, maximize=maximize, **HYPER)  # no rank: full-rank
    ref = torch.optim.AdamW(theirs, foreach=True, maximize=maximize, **HYPER)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref, schedule)
    calls = forbid_fused(monkeypatch)
    for step in range(6):
        for p, q in zip(ours, theirs):
            g = torch.randn(p.shape)
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        sched.step()
        ref_sched.step()
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-6, msg=f"step {step}")
    assert len(calls) >= 6  # lrgrad's foreach path (torch's ran too)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], ref.state[q]["exp_avg_sq"], rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_step_is_the_fp32_step_rounded_once(dtype, monkeypatch):
    """Each step of a bf16/fp16 param equals torch's fp32 AdamW step from the same (upcast) value,
    rounded once to the param dtype; the moments stay fp32 and equal torch's."""
    ours = [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in SHAPES]
    shadow = [torch.nn.Parameter(p.detach().float()) for p in ours]
    opt = lrgrad.GaLoreAdamW(ours, **HYPER)  # fused=None: low-precision params always take foreach
    ref = torch.optim.AdamW(shadow, foreach=True, **HYPER)
    calls = forbid_fused(monkeypatch)
    changed = 0
    for step in range(6):
        for p, q in zip(ours, shadow):
            q.data.copy_(p.detach().float())  # the fp32 step starts from the current low-precision value
            g = torch.randn(p.shape).to(dtype)
            p.grad, q.grad = g, g.float()
            changed_before = p.detach().clone()
        opt.step()
        ref.step()
        for p, q in zip(ours, shadow):
            assert p.dtype == dtype
            assert torch.equal(p.detach(), q.detach().to(dtype)), f"step {step}"
        changed += int(not torch.equal(changed_before, ours[-1].detach()))
    assert changed == 6 and calls
    for p, q in zip(ours, shadow):
        for key in ("exp_avg", "exp_avg_sq"):
            assert opt.state[p][key].dtype == torch.float32
            assert torch.equal(opt.state[p][key], ref.state[q][key]), key
