"""Accelerate: ``Accelerator().prepare(model, opt, loader, sched)`` with an lrgrad optimizer.

Gradient accumulation must equal a hand-written loop that averages the micro-batch
gradients (the independent oracle), and ``save_state``/``load_state`` must resume
bit-identically, across subspace refreshes.
"""

from __future__ import annotations

import torch
from hf_tiny import GAP, RANK, TokenDataset, reset_accelerate, tiny_llama, weights

import lrgrad

ACCUMULATION = 2
MICRO_BATCH = 4
OPT_STEPS = 5
SAVE_AT = 3  # optimizer steps; refreshes on steps 1, 3, 5


def make_training():
    model = tiny_llama()
    opt = lrgrad.GaLoreAdamW(lrgrad.param_groups(model, rank=RANK, update_proj_gap=GAP), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    loader = torch.utils.data.DataLoader(TokenDataset(rows=MICRO_BATCH * ACCUMULATION * OPT_STEPS),
                                         batch_size=MICRO_BATCH, shuffle=False)
    return model, opt, loader, sched


def accelerate_run(stop_at: int = OPT_STEPS, state_dir=None, resume_dir=None):
    from accelerate import Accelerator

    reset_accelerate()
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=ACCUMULATION)
    model, opt, loader, sched = accelerator.prepare(*make_training())
    skip = 0
    if resume_dir is not None:
        accelerator.load_state(resume_dir)
        skip = SAVE_AT * ACCUMULATION
        loader = accelerator.skip_first_batches(loader, skip)
    steps = skip // ACCUMULATION
    for batch in loader:
        with accelerator.accumulate(model):
            accelerator.backward(model(**batch).loss)
            opt.step()
            sched.step()
            opt.zero_grad()
        if accelerator.sync_gradients:
            steps += 1
            if steps == SAVE_AT and state_dir is not None:
                accelerator.save_state(state_dir)
            if steps == stop_at:
                break
    return weights(accelerator.unwrap_model(model)), opt.optimizer


def hand_loop():
    """The oracle: mean of ACCUMULATION micro-batch gradients, one step, one scheduler step."""
    model, opt, loader, sched = make_training()
    batches = list(loader)
    for i in range(OPT_STEPS):
        for batch in batches[i * ACCUMULATION:(i + 1) * ACCUMULATION]:
            (model(**batch).loss / ACCUMULATION).backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return weights(model)


def test_accumulation_equals_the_averaged_hand_loop_and_save_load_state_resumes_exactly(tmp_path):
    want = hand_loop()
    got, opt = accelerate_run(state_dir=tmp_path / "state")
    assert type(opt) is lrgrad.GaLoreAdamW
    assert all(s["step"] == OPT_STEPS for s in opt.state.values())
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-12, rtol=0, msg=lambda m, k=key: f"{k}: {m}")
    resumed, _ = accelerate_run(resume_dir=tmp_path / "state")
    for key in got:
        assert torch.equal(resumed[key], got[key]), key
