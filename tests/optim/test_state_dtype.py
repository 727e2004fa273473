"""``state_dtype``: full-rank params' moments in fp32 (the default) or in the param's dtype, as
``torch.optim.AdamW`` keeps them."""

from __future__ import annotations

import pytest
import torch
from state_utils import assert_rerun_and_resume_bit_identical
from tiny_model import TinyLM, lm_loss, make_batch

import lrgrad


def test_param_state_dtype_is_torch_adamw_fused_bit_for_bit():
    torch.manual_seed(0)
    weights = [torch.randn(64, 32, dtype=torch.bfloat16), torch.randn(32, dtype=torch.bfloat16)]
    ours = [w.clone().requires_grad_() for w in weights]
    theirs = [w.clone().requires_grad_() for w in weights]
    opt = lrgrad.LowRankAdamW(ours, lr=1e-2, weight_decay=0.1, state_dtype="param")
    ref = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1, fused=True)
    for _ in range(5):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        opt.step()
        ref.step()
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
        assert opt.state[a]["exp_avg"].dtype == torch.bfloat16
        assert torch.equal(opt.state[a]["exp_avg_sq"], ref.state[b]["exp_avg_sq"])


def test_projected_state_stays_fp32_and_the_estimate_follows():
    model = TinyLM().to(torch.bfloat16)
    opt = lrgrad.GaLoreAdamW(model.named_parameters(), rank=8, lr=1e-3, state_dtype="param")
    lm_loss(model, make_batch()).backward()
    opt.step()
    for group in opt.param_groups:
        for p in group["params"]:
            want = torch.float32 if opt.is_projected(p, group) else torch.bfloat16
            assert opt.state[p]["exp_avg"].dtype == want
    default = lrgrad.GaLoreAdamW(model.named_parameters(), rank=8, lr=1e-3)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    default.step()
    full = sum(p.numel() for g in opt.param_groups for p in g["params"] if not opt.is_projected(p, g))
    assert lrgrad.optimizer_state_bytes(default) - lrgrad.optimizer_state_bytes(opt) == full * 2 * (4 - 2)


def test_param_state_dtype_resumes_bit_identically():
    torch.manual_seed(0)
    grads = [torch.randn(24, dtype=torch.bfloat16) for _ in range(6)]
    opt = assert_rerun_and_resume_bit_identical(
        lambda params: lrgrad.LowRankAdamW(params, lr=1e-2, state_dtype="param"), grads)
    assert next(iter(opt.state.values()))["exp_avg"].dtype == torch.bfloat16


def test_bad_state_dtype_names_the_option():
    with pytest.raises(ValueError, match="state_dtype"):
        lrgrad.GaLoreAdamW(TinyLM().named_parameters(), rank=8, state_dtype="bf16")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_param_state_dtype_adafactor_computes_in_fp32_like_transformers(dtype):
    """Adafactor's ε (1e-30) and small squared gradients underflow to 0 in fp16, and g / sqrt(0) put
    inf/NaN in the weights after one step. transformers.Adafactor (and torch's) compute in fp32: the
    first step equals the fp32-state run bit for bit; later ones read the state as stored (in the param's
    dtype, so tiny second moments are coarse) and stay finite, each moving a param by at most what the
    RMS clip allows (‖u‖ ≤ clip_threshold · √n)."""
    torch.manual_seed(0)
    weights = [torch.randn(48, 16).to(dtype), torch.randn(16).to(dtype)]
    runs = {}
    for state_dtype in ("param", "fp32"):
        params = [w.clone().requires_grad_() for w in weights]
        opt = lrgrad.LowRankAdafactor(params, lr=1e-2, weight_decay=0.0, state_dtype=state_dtype)
        gen = torch.Generator().manual_seed(1)
        history = []
        for _ in range(4):
            for p in params:
                p.grad = (1e-4 * torch.randn(p.shape, generator=gen)).to(dtype)  # g² < fp16's smallest subnormal
            opt.step()
            history.append([p.detach().clone() for p in params])
        runs[state_dtype] = (history, opt, params)
    (ours, opt, params), (ref, _, _) = runs["param"], runs["fp32"]
    assert all(torch.equal(a, b) for a, b in zip(ours[0], ref[0]))
    for before, after in zip([weights, *ours[:-1]], ours):
        for w, a in zip(before, after):
            assert torch.isfinite(a).all()
            bound = 1e-2 * a.numel() ** 0.5 + torch.finfo(dtype).eps * float(w.float().norm())  # + rounding
            assert float((a.float() - w.float()).norm()) <= bound
    assert all(v.dtype == dtype for p in params for v in opt.state[p].values() if isinstance(v, torch.Tensor))
