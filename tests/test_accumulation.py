"""Flora's compressed gradient accumulation (arXiv:2402.03293): exact in the compressed space, r x n held."""

import copy

import pytest
import torch
from tiny_model import TinyLM, lm_loss, make_batch

import lrgrad
from lrgrad.subspace import low_rank_shape, matrix_shape

MICRO = 3


def setup(cls=lrgrad.FloraAdamW, dtype=torch.float64, **kw):
    torch.manual_seed(0)
    model = TinyLM().to(dtype)
    ref = copy.deepcopy(model)
    kw = {"lr": 1e-2, **kw}
    opt = cls(lrgrad.param_groups(model, rank=8, update_proj_gap=2), **kw)
    ref_opt = cls(lrgrad.param_groups(ref, rank=8, update_proj_gap=2), **kw)
    return model, opt, ref, ref_opt


def micro_backward(model, window, i):
    (lm_loss(model, make_batch(seed=100 * window + i)) / MICRO).backward()


def accumulate_side_by_side(model, acc, ref, ref_opt, windows, after_step=()):
    """``windows`` accumulation windows of MICRO micro-batches: compressed (``acc``) and ordinary
    (``ref_opt``) on the same batches; each of ``after_step`` (schedulers) steps after every window."""
    for window in range(windows):
        for i in range(MICRO):
            micro_backward(model, window, i)
            micro_backward(ref, window, i)
        acc.step()
        acc.zero_grad()
        ref_opt.step()
        ref_opt.zero_grad()
        for sched in after_step:
            sched.step()


@pytest.mark.parametrize("cls,kw", [(lrgrad.FloraAdamW, {}), (lrgrad.FloraAdamW, {"maximize": True, "lr": 1e-3}),
                                    (lrgrad.FloraAdafactor, {"beta1": 0.9})])
def test_compressed_accumulation_matches_ordinary_accumulation(cls, kw):
    model, opt, ref, ref_opt = setup(cls, **kw)
    acc = lrgrad.CompressedAccumulator(opt)
    accumulate_side_by_side(model, acc, ref, ref_opt, windows=5)  # update_proj_gap=2: resamples at steps 3 and 5
    for (name, a), b in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=name)
    assert max(s.get("proj_refreshes", 0) for s in opt.state.values()) == 3
    moved = sum((a - b).abs().max() for a, b in zip(model.parameters(), TinyLM().to(torch.float64).parameters()))
    assert moved > 0


def test_only_the_compressed_sum_is_held_between_micro_batches():
    model, opt, _, _ = setup(dtype=torch.float32)
    acc = lrgrad.CompressedAccumulator(opt)
    compressed = {id(p) for p in acc.compressed_params}
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    expected = {}
    for p in acc.compressed_params:
        side = opt.projector_for(p, group_of[id(p)]).side
        expected[id(p)] = low_rank_shape(matrix_shape(p), 8, side)
    assert len(compressed) == 14  # 7 matrices per block, 2 blocks
    sides = {opt.projector_for(p, group_of[id(p)]).side for p in acc.compressed_params}
    assert sides == {"left", "right"}
    for i in range(MICRO):
        micro_backward(model, 0, i)
        # full gradients of compressed params are freed; the rest accumulate in .grad as usual
        for p in model.parameters():
            assert (p.grad is None) == (id(p) in compressed)
        held = {id(p): low for p, low, _ in acc._buffers.values()}
        assert set(held) == compressed
        for key, low in held.items():
            assert tuple(low.shape) == expected[key]  # r x n (or m x r), not m x n
        lowrank_bytes = sum(s[0] * s[1] * 4 for s in expected.values())  # fp32 sums
        assert acc.buffer_bytes() == lowrank_bytes
        full_bytes = sum(p.numel() * 4 for p in acc.compressed_params)
        assert acc.buffer_bytes() * 4 == full_bytes  # rank 8 of min side 32
    acc.step()
    assert acc.buffer_bytes() == 0


def test_nonfinite_micro_batch_skips_the_step_for_that_param():
    model, opt, _, _ = setup(dtype=torch.float32, skip_nonfinite=True)
    acc = lrgrad.CompressedAccumulator(opt)
    target = acc.compressed_params[0]
    before = target.detach().clone()
    micro_backward(model, 0, 0)
    target.grad = torch.full_like(target, float("nan"))
    acc._hook(target)  # as autograd would after a NaN backward
    acc.step()
    assert torch.equal(target, before)
    assert opt.state[target]["nonfinite_skips"] == 1
    other = acc.compressed_params[1]
    assert opt.state[other]["step"] == 1


def test_validation():
    model = TinyLM()
    with pytest.raises(TypeError, match="optimizer"):
        lrgrad.CompressedAccumulator(torch.optim.AdamW(model.parameters()))
    galore = lrgrad.GaLoreAdamW(lrgrad.param_groups(model, rank=8))  # SVD needs the summed gradient
    with pytest.raises(ValueError, match="gradient-free"):
        lrgrad.CompressedAccumulator(galore)
    flora = lrgrad.FloraAdamW(lrgrad.param_groups(model, rank=8))
    with pytest.raises(TypeError, match="check_replicas"):
        lrgrad.CompressedAccumulator(flora, check_replicas="no")


def test_remove_restores_ordinary_gradients():
    model, opt, _, _ = setup(dtype=torch.float32)
    acc = lrgrad.CompressedAccumulator(opt)
    acc.remove()
    micro_backward(model, 0, 0)
    assert all(p.grad is not None for p in acc.compressed_params)


def test_a_resume_that_loads_the_optimizer_after_the_accumulator_follows_the_schedule():
    """A resume builds the optimizer and the accumulator, then loads the checkpoint: torch's
    load_state_dict replaces the param-group dicts, and the compressed params must step with the new
    ones (the ones the LR scheduler updates), exactly as ordinary accumulation does."""
    model, opt, ref, ref_opt = setup()
    acc = lrgrad.CompressedAccumulator(opt)
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    ref_opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda step: 0.5**step) for o in (opt, ref_opt)]
    accumulate_side_by_side(model, acc, ref, ref_opt, windows=3, after_step=scheds)
    for (key, a), b in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=key)
