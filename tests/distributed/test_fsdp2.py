"""FSDP2: lrgrad optimizers on ``Shard(0)`` DTensor parameters, and DCP checkpoints.

TinyLM with an FFN width of 35 is sharded over 2 gloo processes (uneven
shards: 18 + 17 rows for gate/up, and the left-projected 32 x 35 down_proj).
Weights after N steps with refreshes must equal the unsharded run; a DCP
checkpoint must resume exactly, also in a single process.
"""

from __future__ import annotations

import pytest
import torch
from harness import STEPS, available, full_state, make_model, make_optimizer, run_distributed, train_steps

import lrgrad
from lrgrad.distributed import load_checkpoint, save_checkpoint, setup_parallel
from lrgrad.projectors.svd import canonical_signs

NAMES = available()
SAVE_AT = 3


def fsdp_model():
    return setup_parallel(make_model(), "fsdp2")


def fsdp2_worker(rank: int, world: int, names: list[str], ckpt: str) -> dict:
    results = {}
    for name in names:
        model = fsdp_model()
        opt = make_optimizer(name, model, moment_policy="project")
        train_steps(model, opt, 0, STEPS, rank, world)
        names_by_id = {id(p): n for n, p in model.named_parameters()}
        bases = {names_by_id[id(p)]: s["proj_basis"] for p, s in opt.state.items() if "proj_basis" in s}
        results[name] = {"weights": full_state(model), "bases": bases}
    # DCT must refresh from the all-reduced column scores (right) and the sketch (left), never
    # from an all-gathered G (the one-process refresh is what the fallback would call)
    from lrgrad.projectors.dct import DCTProjector

    gathered_refresh = DCTProjector.refresh

    def must_not_gather(self, state, grad, step, group):
        raise AssertionError(f"{self.side}-side DCT refresh all-gathered G")

    DCTProjector.refresh = must_not_gather
    try:
        model = fsdp_model()
        opt = make_optimizer("DCTAdamW", model, moment_policy="project")
        train_steps(model, opt, 0, STEPS, rank, world)
        results["dct_scores_all_reduced"] = full_state(model)
    finally:
        DCTProjector.refresh = gathered_refresh
    model = fsdp_model()
    opt = make_optimizer("GaLoreAdamW", model)  # moment_policy="keep", the default sketch refresh
    train_steps(model, opt, 0, STEPS, rank, world)
    results["keep"] = full_state(model)
    model = fsdp_model()
    opt = make_optimizer("GaLoreAdamW", model, svd="gram", svd_sharded="gram")  # exact: n x n Gram all-reduce
    train_steps(model, opt, 0, STEPS, rank, world)
    results["keep_gram"] = full_state(model)
    # DCP: save after SAVE_AT steps, resume in a fresh model + optimizer. svd="randomized" (what
    # FSDP2 runs anyway) is saved in the param groups, so a single process resuming it sketches too
    model = fsdp_model()
    opt = make_optimizer("GaLoreAdamW", model, moment_policy="project", svd="randomized")
    train_steps(model, opt, 0, SAVE_AT, rank, world)
    save_checkpoint(ckpt, model, opt)
    model = fsdp_model()
    opt = make_optimizer("GaLoreAdamW", model, moment_policy="project", svd="randomized")
    load_checkpoint(ckpt, model, opt)
    train_steps(model, opt, SAVE_AT, STEPS, rank, world)
    results["resumed"] = full_state(model)
    return results


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory):
    ckpt = str(tmp_path_factory.mktemp("dcp") / "step3")
    return run_distributed(fsdp2_worker, NAMES, ckpt), ckpt


def sketch_options(name: str) -> dict:
    """The single-process options that run FSDP2's default refresh: the projector's
    ``sharded_refresh_options`` (the seeded sketches: ``svd="randomized"``,
    ``pca_init="randomized"``, ``dct_scores="sketch"``)."""
    from lrgrad.projectors import PROJECTORS

    projector = make_optimizer(name, make_model()).param_groups[0]["projector"]
    return dict(PROJECTORS[projector].sharded_refresh_options)


def single_process(name: str, exact: bool = False, **options) -> dict:
    model = make_model()
    opt = make_optimizer(name, model, **({} if exact else sketch_options(name)), **options)
    train_steps(model, opt, 0, STEPS)
    return full_state(model)


def assert_same_weights(got: dict, want: dict, atol: float = 1e-10) -> None:
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=atol, rtol=0, msg=lambda m, k=key: f"{k}: {m}")


def test_fsdp2_params_are_unevenly_sharded_dtensors():
    shapes = run_distributed(_shape_worker)
    assert shapes == [("DTensor", (18, 32)), ("DTensor", (17, 32))]


def _shape_worker(rank, world):
    model = fsdp_model()
    w = model.layers[0].gate_proj.weight
    return type(w).__name__, tuple(w.to_local().shape)


@pytest.mark.parametrize("name", NAMES)
def test_fsdp2_weights_match_unsharded(fsdp_results, name):
    results, _ = fsdp_results
    want = single_process(name, moment_policy="project")
    for rank_result in results:
        assert_same_weights(rank_result[name]["weights"], want)


@pytest.mark.parametrize("name", NAMES)
def test_fsdp2_projector_state_identical_across_ranks(fsdp_results, name):
    results, _ = fsdp_results
    a, b = results[0][name]["bases"], results[1][name]["bases"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_fsdp2_keep_policy_matches_single_process_sketch(fsdp_results):
    """With ``moment_policy="keep"`` the sign of each basis vector matters: the sketch fixes
    it canonically, in one process and on row shards alike."""
    results, _ = fsdp_results
    want = single_process("GaLoreAdamW")
    for rank_result in results:
        assert_same_weights(rank_result["keep"], want)


def test_fsdp2_gram_refresh_matches_svd_with_canonical_signs(fsdp_results, monkeypatch):
    """``svd_sharded="gram"``: the exact right-side basis from the all-reduced n x n Gram,
    with canonical signs. The unsharded exact SVD with the same sign convention must then
    agree exactly under ``moment_policy="keep"``."""
    from lrgrad.projectors import svd

    original = svd.top_singular_basis

    def canonical(grad, rank, side):
        # right side: the sharded run uses the Gram path (canonical signs); the left
        # side all-gathers G and calls this same SVD, so it keeps LAPACK's signs
        basis = original(grad, rank, side)
        return canonical_signs(basis).contiguous() if side == "right" else basis

    monkeypatch.setattr(svd, "top_singular_basis", canonical)
    want = single_process("GaLoreAdamW", exact=True, svd="gram")  # every refresh exact, as the sharded Gram
    results, _ = fsdp_results
    for rank_result in results:
        assert_same_weights(rank_result["keep_gram"], want)


def test_fsdp2_dcp_resume_equals_uninterrupted(fsdp_results):
    results, _ = fsdp_results
    want = single_process("GaLoreAdamW", moment_policy="project")
    for rank_result in results:
        assert_same_weights(rank_result["resumed"], want)


def test_fsdp2_checkpoint_loads_into_single_process(fsdp_results):
    _, ckpt = fsdp_results
    model = make_model()
    opt = make_optimizer("GaLoreAdamW", model, moment_policy="project", svd="randomized")
    load_checkpoint(ckpt, model, opt)
    # the sharded moments came back whole, with the saved step count
    gate = opt.state[model.layers[0].gate_proj.weight]
    assert gate["exp_avg"].shape == (35, 8) and gate["step"] == SAVE_AT
    assert not hasattr(gate["exp_avg"], "placements")
    train_steps(model, opt, SAVE_AT, STEPS)
    assert_same_weights(full_state(model), single_process("GaLoreAdamW", moment_policy="project"))


def test_shard_context_row_ranges_cover_uneven_rows():
    from lrgrad.dtensor import row_range

    for rows in (1, 2, 7, 35):
        ranges = [row_range(rows, 2, r) for r in range(2)]
        assert ranges[0][0] == 0 and ranges[-1][1] == rows and ranges[0][1] == ranges[1][0]
        assert [b - a for a, b in ranges] == [len(c) for c in torch.arange(rows).chunk(2)] + [0] * (
            2 - len(torch.arange(rows).chunk(2)))


def test_gram_basis_equals_svd_subspace():
    """Single-rank Gram path == exact SVD right vectors up to sign (canonical on both sides)."""
    from lrgrad.projectors.svd import gram_right_basis

    class Ctx:
        def all_reduce(self, t, op="sum"):
            return t

    g = torch.randn(40, 24, dtype=torch.float64)
    got = gram_right_basis(g, 6, Ctx())
    want = canonical_signs(torch.linalg.svd(g, full_matrices=False)[2][:6])
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


def test_setup_parallel_validates():
    with pytest.raises(ValueError, match="mode"):
        setup_parallel(make_model(), "zero3")
    with pytest.raises(TypeError, match="model"):
        setup_parallel(object(), "none")
    with pytest.raises(ValueError, match="init_process_group"):
        setup_parallel(make_model(), "ddp")
    assert isinstance(lrgrad.distributed.setup_parallel(make_model(), "none"), torch.nn.Module)


def test_fsdp2_dct_refresh_uses_all_reduced_scores(fsdp_results):
    """DCT selection from Σ_i column scores (right, an n-vector all-reduce) and the seeded sketch
    (left) equals the one-process run with ``dct_scores="sketch"``."""
    results, _ = fsdp_results
    expected = single_process("DCTAdamW", moment_policy="project")  # + sketch_options: dct_scores="sketch"
    for rank_results in results:
        got = rank_results["dct_scores_all_reduced"]
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value, rtol=0, atol=1e-10, msg=key)


def _sketch_refresh_worker(rank: int, world: int, preset: str, options: dict) -> list[dict]:
    """A refresh every step under FSDP2 (the default ``svd_sharded="sketch"``): per step and projected
    param, its side, the full gradient the refresh saw, the basis and the refresh counters."""
    from tiny_model import lm_loss, make_batch

    model = fsdp_model()
    opt = getattr(lrgrad, preset)(lrgrad.param_groups(model, rank=8, update_proj_gap=1, **options), lr=1e-2)
    steps = []
    for i in range(4):
        tokens = make_batch(seed=i)
        rows = tokens.shape[0] // world
        opt.zero_grad()
        lm_loss(model, tokens[rank * rows:(rank + 1) * rows]).backward()
        opt.step()
        record = {}
        for name, p in model.named_parameters():  # the same order on every rank: full_tensor is a collective
            state = opt.state[p]
            if "proj_refreshes" not in state:
                continue
            projector = opt.projector_for(p, opt.param_groups[0])
            record[name] = {"side": projector.side, "grad": p.grad.full_tensor().reshape(p.shape[0], -1).clone(),
                            "basis": projector.basis(state).clone(), "failures": state["proj_failures"],
                            "refreshes": state["proj_refreshes"]}
        steps.append(record)
    return steps


@pytest.mark.parametrize("preset, options", [("GaLoreAdamW", {}), ("QGaLoreAdamW", {"adaptive_gap": False})])
def test_fsdp2_sketch_refreshes_succeed_and_move_on_both_sides(preset, options):
    """The default sharded refresh (the seeded sketch from row shards; the left side, down_proj's
    32 x 35 wide matrix, cold-started and gathered by rows) at every step: no failure counted, a new
    basis each refresh, on every rank the same, and nearly the top-r energy of an independent oracle
    (fp64 ``torch.linalg.svd`` of the full gradient). A refresh that failed after the first would keep
    the old basis with ``proj_failures`` counted, while the one-process reference (the same sketch)
    failed alike and the weights still matched."""
    from spectra import captured_energy

    from lrgrad.projectors.svd import top_singular_basis

    results = run_distributed(_sketch_refresh_worker, preset, options)
    sides = set()
    for k, (step0, step1) in enumerate(zip(*results)):
        assert step0.keys() == step1.keys() and step0
        for name, got in step0.items():
            assert torch.equal(got["basis"], step1[name]["basis"]), name  # replicated state
            assert got["failures"] == 0 and got["refreshes"] == k + 1, (name, k)
            if k:
                assert not torch.equal(got["basis"], results[0][k - 1][name]["basis"]), (name, k)
            g, side = got["grad"], got["side"]
            exact = top_singular_basis(g.double(), got["basis"].shape[0 if side == "right" else 1], side)
            # one pass (svd_power_iters=0) on TinyLM's gradients keeps >= 98.6% (Q-GaLore's INT4 basis >= 97%)
            floor = 0.97 if preset == "GaLoreAdamW" else 0.95
            assert captured_energy(g, got["basis"], side) >= floor * captured_energy(g, exact, side), (name, k)
            sides.add(side)
    assert sides == {"left", "right"}


def _zero_refresh_worker(rank: int, world: int, preset: str) -> list[dict]:
    """A refresh every step under FSDP2; step 2's gradients are zero on every rank, step 3's on rank 0
    only. Per step and projected param: its basis and refresh / failure counters."""
    from tiny_model import lm_loss, make_batch

    model = fsdp_model()
    opt = getattr(lrgrad, preset)(lrgrad.param_groups(model, rank=8, update_proj_gap=1), lr=1e-2)
    steps = []
    for i in range(3):
        tokens = make_batch(seed=i)
        rows = tokens.shape[0] // world
        opt.zero_grad()
        lm_loss(model, tokens[rank * rows:(rank + 1) * rows]).backward()
        if i == 1 or (i == 2 and rank == 0):
            with torch.no_grad():
                for p in model.parameters():
                    p.grad.to_local().zero_()
        opt.step()
        record = {}
        for name, p in model.named_parameters():
            state = opt.state[p]
            if "proj_refreshes" in state:
                basis = opt.projector_for(p, opt.param_groups[0]).basis(state)
                record[name] = (basis.clone(), state["proj_refreshes"], state["proj_failures"])
        steps.append(record)
    return steps


@pytest.mark.parametrize("preset", ["GaLoreAdamW", "DCTAdamW", "GrassAdamW"])
def test_fsdp2_a_gradient_zero_on_every_rank_keeps_the_basis_and_one_rank_zero_does_not(preset):
    """The zero-gradient rule of the one-process refresh (keep the previous basis: a zero matrix has no
    subspace) decided from the same one-element vote as the finiteness check: zero on every rank keeps
    the basis on every rank; zero on one rank's rows only is an ordinary gradient, refreshed from."""
    results = run_distributed(_zero_refresh_worker, preset)
    for steps in results:
        first, zero_everywhere, zero_on_one = steps
        assert first
        for name, (basis, refreshes, failures) in first.items():
            assert refreshes == 1 and failures == 0
            assert torch.equal(zero_everywhere[name][0], basis) and zero_everywhere[name][1:] == (1, 0), name
            assert zero_on_one[name][1:] == (2, 0) and not torch.equal(zero_on_one[name][0], basis), name
    for name in results[0][2]:
        assert torch.equal(results[0][2][name][0], results[1][2][name][0]), name  # replicated
