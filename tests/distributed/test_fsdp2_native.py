"""FSDP2 without exceptions: every built-in projector x {adamw, adamw8bit} refreshes from its
row shards (no all-gather of a gradient), 8-bit moments stay 8-bit per shard, DCP round-trips.

One 2-process spawn runs every check; the single-process oracles run here. Each projector
declares the one-process options that compute what its default sharded refresh computes
(``Projector.sharded_refresh_options``): the SVD family refreshes under FSDP2 with the seeded
sketch (``svd="randomized"`` in one process; online PCA: ``pca_init="randomized"``), DCT scores
its left side from a seeded sketch (``dct_scores="sketch"``), Conda sketches its momentum
(``svd="randomized"``) and LDAdam its SVDs (``ldadam_svd="randomized"``), so the runs are comparable to
float rounding.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from harness import GAP, STEPS, full_state, make_model, run_distributed, train_steps

import lrgrad
from lrgrad.distributed import load_checkpoint, save_checkpoint, setup_parallel
from lrgrad.projectors import PROJECTORS
from lrgrad.rules import RULES

RULE_NAMES = ("adamw", "adamw8bit")
#: 8-bit blocks of 2 elements: every shard boundary (18 of 35 rows, 16 of 32, ...) is a block
#: boundary, so per-shard blocks are the single-process blocks and the runs compare exactly
EXACT_BLOCKS = {"moment_min_size": 0, "moment_block_size": 2}
#: blocks of 64 do not align with the shards: the DCP round trip has padded block maxima
DCP_BLOCKS = {"moment_min_size": 0, "moment_block_size": 64}
SAVE_AT = 3


def options(projector: str, rule: str, sharded: bool, blocks: dict | None = None, **extra) -> dict:
    """Optimizer options: under FSDP2 the defaults; in one process the projector's
    ``sharded_refresh_options`` (the seeded sketches the sharded defaults run)."""
    chosen = {"moment_policy": "project"}
    defaults = PROJECTORS[projector].option_defaults
    if not sharded:
        chosen.update(PROJECTORS[projector].sharded_refresh_options)
    if rule == "adamw8bit":
        chosen.update(blocks or EXACT_BLOCKS)
    chosen.update(extra)
    assert set(chosen) - {"moment_policy"} <= set(defaults) | set(RULES[rule].option_defaults)
    return chosen


def make_optimizer(model, projector: str, rule: str, sharded: bool, blocks: dict | None = None, **extra):
    return lrgrad.LowRankOptimizer(lrgrad.param_groups(model, rank=8, update_proj_gap=GAP), lr=1e-2,
                                   rule=rule, projector=projector,
                                   **options(projector, rule, sharded, blocks, **extra))


@contextlib.contextmanager
def gathers_raise(allowed: list | None = None):
    """``DTensor.full_tensor`` of a matrix raises (or, with ``allowed``, is recorded)."""
    from torch.distributed.tensor import DTensor

    original = DTensor.full_tensor

    def guarded(self, *args, **kwargs):
        if self.dim() >= 2:
            if allowed is None:
                raise AssertionError(f"all-gather of a {tuple(self.shape)} DTensor")
            allowed.append(tuple(self.shape))
        return original(self, *args, **kwargs)

    DTensor.full_tensor = guarded
    try:
        yield
    finally:
        DTensor.full_tensor = original


#: lrgrad's own projectors: the spawned workers do not import the test modules that register others
#: (tests/toy_projector.py), so the parametrization must not depend on what was collected before
BUILTIN = {name: cls for name, cls in PROJECTORS.items() if cls.__module__.startswith("lrgrad.")}
#: every one of them runs on row shards (Conda and LDAdam included: their full-size state is row-sharded);
#: a projector that declares ``supports_sharding = False`` is refused (tests/distributed/test_fsdp2_refusals.py)
BUILTIN_PROJECTORS = sorted(BUILTIN)


def fsdp_model():
    return setup_parallel(make_model(), "fsdp2")


def native_worker(rank: int, world: int, ckpt: str) -> dict:
    from lrgrad.dtensor import count_collectives, is_dtensor

    results: dict = {"weights": {}, "largest_collective": {}, "gathered": {}}
    for projector in BUILTIN_PROJECTORS:
        for rule in RULE_NAMES:
            model = fsdp_model()
            opt = make_optimizer(model, projector, rule, sharded=True)
            with gathers_raise(), count_collectives() as log:
                train_steps(model, opt, 0, STEPS, rank, world)
            results["weights"][projector, rule] = full_state(model)
            results["largest_collective"][projector, rule] = max(e["numel"] for e in log)
            if rule == "adamw8bit":
                gate = opt.state[model.layers[0].gate_proj.weight]
                results["8bit_gate"] = {k: (type(v).__name__, v.dtype, tuple(v.to_local().shape))
                                        for k, v in gate.items() if is_dtensor(v)}
    # DCT's exact opt-in: the left side (down_proj, 32 x 35) all-gathers G at each refresh
    model = fsdp_model()
    gathered: list = []
    opt = make_optimizer(model, "dct", "adamw", sharded=True, dct_sharded="gather")
    with gathers_raise(gathered):
        train_steps(model, opt, 0, STEPS, rank, world)
    results["dct_gather"] = (full_state(model), gathered)
    # DCT's default left-side refresh: the sketch's collectives
    model = fsdp_model()
    opt = make_optimizer(model, "dct", "adamw", sharded=True)
    with count_collectives() as log:
        train_steps(model, opt, 0, 1, rank, world)
    results["dct_refresh_log"] = [(e["op"], e["numel"]) for e in log]
    # refresh traffic of the default GaLore projector on the 35 x 32 gate_proj (right side)
    # and the 32 x 35 down_proj (left side), one refresh each
    model = fsdp_model()
    opt = make_optimizer(model, "svd", "adamw", sharded=True)
    with count_collectives() as log:
        train_steps(model, opt, 0, 1, rank, world)
    results["refresh_log"] = [(e["op"], e["numel"]) for e in log]
    # DCP with 8-bit moments whose blocks do not align with the shards: save at SAVE_AT, resume
    model = fsdp_model()
    opt = make_optimizer(model, "svd", "adamw8bit", sharded=True, blocks=DCP_BLOCKS)
    train_steps(model, opt, 0, STEPS, rank, world)
    results["8bit_uninterrupted"] = full_state(model)
    model = fsdp_model()
    opt = make_optimizer(model, "svd", "adamw8bit", sharded=True, blocks=DCP_BLOCKS)
    train_steps(model, opt, 0, SAVE_AT, rank, world)
    save_checkpoint(ckpt, model, opt)
    model = fsdp_model()
    opt = make_optimizer(model, "svd", "adamw8bit", sharded=True, blocks=DCP_BLOCKS)
    load_checkpoint(ckpt, model, opt)
    train_steps(model, opt, SAVE_AT, STEPS, rank, world)
    results["8bit_resumed"] = full_state(model)
    # layerwise: FSDP2 runs post-accumulate-grad hooks on the sharded params after the
    # reduce-scatter, so per-layer updates see the reduced row shards
    model = fsdp_model()
    layerwise = lrgrad.LayerwiseOptimizer(make_optimizer(model, "svd", "adamw8bit", sharded=True))
    with gathers_raise():
        train_steps(model, layerwise, 0, STEPS, rank, world)
    results["layerwise"] = full_state(model)
    return results


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    ckpt = str(tmp_path_factory.mktemp("dcp8") / "step3")
    return run_distributed(native_worker, ckpt), ckpt


def single_process(projector: str, rule: str, **extra) -> dict:
    model = make_model()
    opt = make_optimizer(model, projector, rule, sharded=False, **extra)
    train_steps(model, opt, 0, STEPS)
    return full_state(model)


@pytest.mark.parametrize("rule", RULE_NAMES)
@pytest.mark.parametrize("projector", BUILTIN_PROJECTORS)
def test_fsdp2_equals_single_process(native, projector, rule):
    results, _ = native
    want = single_process(projector, rule)
    for rank_results in results:
        got = rank_results["weights"][projector, rule]
        assert got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize("rule", RULE_NAMES)
@pytest.mark.parametrize("projector", BUILTIN_PROJECTORS)
def test_fsdp2_refresh_never_gathers_a_gradient(native, projector, rule):
    """Default options: no ``DTensor.full_tensor`` of a matrix (it raised in the worker, or the
    run would not have finished) and every collective smaller than the smallest projected
    gradient (32 x 32)."""
    results, _ = native
    for rank_results in results:
        assert (projector, rule) in rank_results["weights"]
        assert rank_results["largest_collective"][projector, rule] < 32 * 32


def test_fsdp2_dct_gather_opt_in_is_exact(native):
    """``dct_sharded="gather"``: the left side (down_proj) is all-gathered at each refresh
    (steps 1, 3, 5 on 2 blocks) and the run equals the exact one-process DCT."""
    results, _ = native
    want = single_process("dct", "adamw", dct_scores="auto")
    for rank_results in results:
        weights, gathered = rank_results["dct_gather"]
        assert gathered == [(32, 35)] * 6
        for key in want:
            torch.testing.assert_close(weights[key], want[key], rtol=0, atol=1e-6, msg=key)


def test_fsdp2_dct_left_sketch_traffic(native):
    """DCT's first step (2 blocks): per matrix a 1-element finiteness vote; right side one
    n-vector of scores (n = 32); left side (down_proj 32 x 35) one n x k all-reduce
    (k = rank 8 + dct_oversample 8) and the rows of G V gathered (padded to 2 x 16 x 16),
    plus its per-step r x n all-reduce of R."""
    from collections import Counter

    results, _ = native
    expected = Counter({("all_reduce", 1): 14, ("all_reduce", 32): 12, ("all_reduce", 35 * 16): 2,
                        ("all_gather", 2 * 16 * 16): 2, ("all_reduce", 8 * 35): 2})
    for rank_results in results:
        assert Counter(rank_results["dct_refresh_log"]) == expected


def test_fsdp2_sketch_refresh_traffic(native):
    """The first step of default GaLore (2 blocks): per matrix a 1-element finiteness vote and
    one n x k all-reduce (k = rank 8 + oversample 8); the left-side down_proj (32 x 35) adds
    its 32 x 8 basis rows gathered (padded to 2 x 16 rows) and its per-step r x n all-reduce of R."""
    from collections import Counter

    results, _ = native
    expected = Counter({("all_reduce", 1): 14, ("all_reduce", 32 * 16): 12, ("all_reduce", 35 * 16): 2,
                        ("all_gather", 2 * 16 * 8): 2, ("all_reduce", 8 * 35): 2})
    for rank_results in results:
        assert Counter(rank_results["refresh_log"]) == expected


def test_fsdp2_8bit_moments_are_sharded_codes(native):
    results, _ = native
    for rank, rank_results in enumerate(results):
        gate = rank_results["8bit_gate"]  # 35 x 8 moments: rows 18 + 17, blocks of 2
        rows = 18 if rank == 0 else 17
        assert gate["exp_avg_codes"] == ("DTensor", torch.int8, (rows, 8))
        assert gate["exp_avg_sq_codes"] == ("DTensor", torch.uint8, (rows, 8))
        assert gate["exp_avg_absmax"] == ("DTensor", torch.float32, (1, 18 * 8 // 2))


def test_fsdp2_8bit_dcp_resume_equals_uninterrupted(native):
    results, _ = native
    for rank_results in results:
        want = rank_results["8bit_uninterrupted"]
        for key, value in rank_results["8bit_resumed"].items():
            torch.testing.assert_close(value, want[key], rtol=0, atol=1e-12, msg=key)


def test_fsdp2_8bit_checkpoint_into_one_process_is_refused(native):
    _, ckpt = native
    model = make_model()
    opt = make_optimizer(model, "svd", "adamw8bit", sharded=False, blocks=DCP_BLOCKS)
    with pytest.raises(ValueError, match="exp_avg_absmax.*world size that saved them"):
        load_checkpoint(ckpt, model, opt)


def test_layerwise_under_fsdp2_equals_single_process(native):
    results, _ = native
    want = single_process("svd", "adamw8bit")
    for rank_results in results:
        for key, value in rank_results["layerwise"].items():
            torch.testing.assert_close(value, want[key], rtol=0, atol=1e-6, msg=key)
