"""FSDP2 (2 gloo processes, uneven row shards 18 + 17 / 16 + 16) for the two projectors with full-size
state: Conda's momentum and LDAdam's error buffer are ``Shard(0)`` DTensors advanced from each rank's
rows of G (``Projector.advance``), the refreshes run on row shards with small all-reduces, G is never
all-gathered, the runs (per-layer updates too) equal one process (under ``sharded_refresh_options``: the
seeded sketch SVD), and ``state_dict`` / DCP checkpoints round-trip.

Both presets on TinyLM (rank 8, gap 2): ``gate_proj``/``up_proj`` (35 x 32) project on the right,
``down_proj`` (32 x 35) on the left, so both sides of every hook run sharded. Conda refreshes on steps
1, 2, 4, 6; LDAdam on 1, 3, 5.
"""

from __future__ import annotations

import copy

import pytest
import torch
from harness import GAP, full_state, make_model, run_distributed, train_steps

import lrgrad
from lrgrad.distributed import load_checkpoint, save_checkpoint, setup_parallel
from lrgrad.projectors import PROJECTORS

PRESETS = {"CondaAdamW": ("conda", "proj_momentum"), "LDAdamW": ("ldadam", "proj_error")}
STEPS = 7
SAVE_AT = 4
#: the TinyLM matrices whose row state is checked: one per side
RIGHT, LEFT = "layers.0.gate_proj.weight", "layers.0.down_proj.weight"


def make_optimizer(preset: str, model, sharded: bool, **extra):
    """The preset with its defaults under FSDP2; in one process the projector's ``sharded_refresh_options``."""
    options = {} if sharded else dict(PROJECTORS[PRESETS[preset][0]].sharded_refresh_options)
    options.update(extra)
    return lrgrad.OPTIMIZERS[preset](lrgrad.param_groups(model, rank=8, update_proj_gap=GAP, **options), lr=1e-2)


def fsdp_model():
    return setup_parallel(make_model(), "fsdp2")


def names_of(model) -> dict[int, str]:
    return {id(p): n.removeprefix("module.") for n, p in model.named_parameters()}


def gathered_states(opt, model) -> dict[str, dict]:
    """Every param's optimizer state, DTensors all-gathered, by param name."""
    names = names_of(model)
    return {names[id(p)]: {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in st.items()}
            for p, st in opt.state.items()}


def no_gather_guard():
    """``DTensor.full_tensor`` of a matrix and the one-process refreshes of both projectors raise."""
    from torch.distributed.tensor import DTensor

    from lrgrad.projectors.conda import CondaProjector
    from lrgrad.projectors.ldadam import LDAdamProjector

    original = DTensor.full_tensor

    def guarded(self, *args, **kwargs):
        if self.dim() >= 2:
            raise AssertionError(f"all-gather of a {tuple(self.shape)} DTensor")
        return original(self, *args, **kwargs)

    def one_process_refresh(self, *args, **kwargs):
        raise AssertionError(f"{type(self).__name__}.refresh ran on FSDP2 (an all-gathered G)")

    saved = (DTensor.full_tensor, CondaProjector.refresh, LDAdamProjector.refresh)
    DTensor.full_tensor, CondaProjector.refresh, LDAdamProjector.refresh = (
        guarded, one_process_refresh, one_process_refresh)
    return saved


def restore_guard(saved) -> None:
    from torch.distributed.tensor import DTensor

    from lrgrad.projectors.conda import CondaProjector
    from lrgrad.projectors.ldadam import LDAdamProjector

    DTensor.full_tensor, CondaProjector.refresh, LDAdamProjector.refresh = saved


def worker(rank: int, world: int, ckpt_root: str) -> dict:
    from lrgrad.dtensor import count_collectives, is_dtensor

    results: dict = {}
    for preset, (_, row_key) in PRESETS.items():
        out: dict = {}
        model = fsdp_model()
        opt = make_optimizer(preset, model, sharded=True)
        names = names_of(model)
        logs = []
        saved = no_gather_guard()
        try:
            for step in range(STEPS):
                with count_collectives() as log:
                    train_steps(model, opt, step, step + 1, rank, world)
                logs.append([(e["op"], e["numel"]) for e in log])
        finally:
            restore_guard(saved)
        out["weights"] = full_state(model)
        out["collectives"] = logs
        out["states"] = gathered_states(opt, model)
        out["row_state"] = {names[id(p)]: (type(st[row_key]).__name__, tuple(st[row_key].placements),
                                           tuple(st[row_key].to_local().shape))
                            for p, st in opt.state.items() if row_key in st}
        out["state_bytes"] = lrgrad.optimizer_state_bytes(opt)
        # per-layer updates: FSDP2's post-accumulate-grad hooks stage each reduced row shard alone
        model = fsdp_model()
        layerwise = lrgrad.LayerwiseOptimizer(make_optimizer(preset, model, sharded=True))
        saved = no_gather_guard()
        try:
            train_steps(model, layerwise, 0, STEPS, rank, world)
        finally:
            restore_guard(saved)
        out["layerwise"] = full_state(model)
        # torch's state_dict / load_state_dict round trip into a fresh FSDP2 optimizer mid-run
        model = fsdp_model()
        opt = make_optimizer(preset, model, sharded=True)
        train_steps(model, opt, 0, SAVE_AT, rank, world)
        sd = copy.deepcopy(opt.state_dict())
        out["sd_row_state_is_dtensor"] = all(is_dtensor(s[row_key]) for s in sd["state"].values() if row_key in s)
        fresh = make_optimizer(preset, model, sharded=True)
        fresh.load_state_dict(sd)
        train_steps(model, fresh, SAVE_AT, STEPS, rank, world)
        out["sd_resumed"] = full_state(model)
        # DCP: save at SAVE_AT, resume in a fresh model + optimizer. The one-process options of the
        # sharded refresh (what FSDP2 runs anyway) are saved in the param groups, so a single process
        # resuming the checkpoint sketches too
        ckpt = f"{ckpt_root}/{preset}"
        model = fsdp_model()
        opt = make_optimizer(preset, model, sharded=False)
        train_steps(model, opt, 0, SAVE_AT, rank, world)
        save_checkpoint(ckpt, model, opt)
        model = fsdp_model()
        opt = make_optimizer(preset, model, sharded=False)
        load_checkpoint(ckpt, model, opt)
        train_steps(model, opt, SAVE_AT, STEPS, rank, world)
        out["dcp_resumed"] = full_state(model)
        results[preset] = out
    return results


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("dcp_conda_ldadam"))
    return run_distributed(worker, root), root


def one_process(preset: str, steps: int = STEPS):
    model = make_model()
    opt = make_optimizer(preset, model, sharded=False)
    train_steps(model, opt, 0, steps)
    return model, opt


@pytest.mark.parametrize("preset", PRESETS)
def test_fsdp2_equals_one_process(sharded, preset):
    """Weights and the full-size row state after STEPS steps (several refreshes on both sides)."""
    results, _ = sharded
    model, opt = one_process(preset)
    want, want_states = full_state(model), gathered_states(opt, model)
    row_key = PRESETS[preset][1]
    for rank_results in results:
        got = rank_results[preset]
        for key, value in want.items():
            torch.testing.assert_close(got["weights"][key], value, rtol=0, atol=1e-9, msg=key)
        for name in (RIGHT, LEFT):
            torch.testing.assert_close(got["states"][name][row_key], want_states[name][row_key], rtol=0, atol=1e-9)
            assert got["states"][name]["proj_refreshes"] == want_states[name]["proj_refreshes"] >= 3
            torch.testing.assert_close(got["states"][name]["proj_basis"], want_states[name]["proj_basis"],
                                       rtol=0, atol=1e-8)
    assert float((want[RIGHT] - make_model().state_dict()[RIGHT]).abs().max()) > 1e-3  # it trained


@pytest.mark.parametrize("preset", PRESETS)
def test_fsdp2_layerwise_equals_one_process(sharded, preset):
    results, _ = sharded
    model, _ = one_process(preset)
    for rank_results in results:
        for key, value in full_state(model).items():
            torch.testing.assert_close(rank_results[preset]["layerwise"][key], value, rtol=0, atol=1e-9, msg=key)


@pytest.mark.parametrize("preset", PRESETS)
def test_fsdp2_row_state_is_sharded_like_the_weight(sharded, preset):
    """``Shard(0)`` DTensors with this rank's rows (35 rows: 18 + 17; 32 rows: 16 + 16); the optimizer's
    state bytes count the local rows only."""
    from torch.distributed.tensor import Shard

    results, _ = sharded
    for rank, rank_results in enumerate(results):
        row_state = rank_results[preset]["row_state"]
        assert row_state[RIGHT] == ("DTensor", (Shard(0),), (18 if rank == 0 else 17, 32))
        assert row_state[LEFT] == ("DTensor", (Shard(0),), (16, 35))
    model, opt = one_process(preset, steps=1)
    full_bytes = lrgrad.optimizer_state_bytes(opt)
    for rank_results in results:
        assert rank_results[preset]["state_bytes"] < 0.7 * full_bytes


def test_fsdp2_collectives_are_small(sharded):
    """No collective reaches a projected gradient's size (32 x 35 = 1120; the smallest is 32 x 32) and
    the per-step traffic is what the docs say: Conda's plain steps (3, 5, 7) add nothing to the left
    side's r x n all-reduce of R (8 x 35); LDAdam's plain steps (2, 4, 6) neither. A refresh step
    adds per matrix a finiteness vote (1) and the sketch's / power step's n x k all-reduces."""
    from collections import Counter

    results, _ = sharded
    plain = Counter({("all_reduce", 8 * 35): 2})  # the two down_proj (left side) R all-reduces
    for rank_results in results:
        conda = rank_results["CondaAdamW"]["collectives"]
        ldadam = rank_results["LDAdamW"]["collectives"]
        for log in conda + ldadam:
            assert log and max(numel for _, numel in log) < 32 * 32, log
        for step in (2, 4, 6):  # 0-based: steps 3, 5, 7
            assert Counter(conda[step]) == plain, conda[step]
        for step in (1, 3, 5):  # steps 2, 4, 6
            assert Counter(ldadam[step]) == plain, ldadam[step]
        # a Conda refresh after the first (step 2): the sketch (n x 16) per matrix, a finiteness vote, the
        # left side's basis rows gathered (2 x 16 x 8) and down_new(M) all-reduced for the first moment (8 x 35)
        assert Counter(conda[1]) == Counter({("all_reduce", 1): 14, ("all_reduce", 32 * 16): 12,
                                             ("all_reduce", 35 * 16): 2, ("all_gather", 2 * 16 * 8): 2,
                                             ("all_reduce", 8 * 35): 4})
        # an LDAdam power step (step 3): right side one n x r product (32 x 8); left side Bᵀ P (35 x 8)
        # and the rows of B Bᵀ P gathered (2 x 16 x 8)
        assert Counter(ldadam[2]) == Counter({("all_reduce", 1): 14, ("all_reduce", 32 * 8): 12,
                                              ("all_reduce", 35 * 8): 4, ("all_gather", 2 * 16 * 8): 2})


@pytest.mark.parametrize("preset", PRESETS)
def test_fsdp2_state_dict_round_trip_resumes_exactly(sharded, preset):
    """``opt.state_dict()`` keeps the row state as DTensors; loading it into a fresh FSDP2 optimizer
    after SAVE_AT steps and training on gives the uninterrupted run's weights exactly."""
    results, _ = sharded
    for rank_results in results:
        got = rank_results[preset]
        assert got["sd_row_state_is_dtensor"]
        for key, value in got["weights"].items():
            torch.testing.assert_close(got["sd_resumed"][key], value, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("preset", PRESETS)
def test_fsdp2_dcp_resume_equals_uninterrupted(sharded, preset):
    results, _ = sharded
    for rank_results in results:
        got = rank_results[preset]
        for key, value in got["weights"].items():
            torch.testing.assert_close(got["dcp_resumed"][key], value, rtol=0, atol=1e-12, msg=key)


@pytest.mark.parametrize("preset", PRESETS)
def test_fsdp2_checkpoint_loads_into_one_process(sharded, preset):
    """DCP reshards the row state: the FSDP2 checkpoint of step SAVE_AT resumes in one process and
    ends where the one-process run does."""
    _, root = sharded
    model = make_model()
    opt = make_optimizer(preset, model, sharded=False)
    load_checkpoint(f"{root}/{preset}", model, opt)
    row_key = PRESETS[preset][1]
    assert all(type(s[row_key]) is torch.Tensor for s in opt.state.values() if row_key in s)
    train_steps(model, opt, SAVE_AT, STEPS)
    want, _ = one_process(preset)
    for key, value in full_state(want).items():
        torch.testing.assert_close(full_state(model)[key], value, rtol=0, atol=1e-9, msg=key)
