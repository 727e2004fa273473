"""FSDP2 with a different ``torch.manual_seed`` on each rank (users seed data order and dropout per rank).

Every random draw of a sharded refresh must come from the param's seed, never from the global RNG:
otherwise each rank would build its rows of the basis from other numbers. The cross-rank checks in
test_fsdp2.py seed every rank alike, so they cannot see such a draw; this test does.
"""

from __future__ import annotations

import torch
from harness import STEPS, full_state, make_optimizer, run_distributed, train_steps
from test_fsdp2 import assert_same_weights, fsdp_model, single_process

#: sharded refreshes that draw random numbers: sketches (SVD, DCT's left side, PCA init, LDAdam), Flora,
#: GoLore, Grass's sampled selection
RANDOMIZED = ("GaLoreAdamW", "DCTAdamW", "OnlineSubspaceAdamW", "LDAdamW", "FloraAdamW", "GoLoreAdamW",
              "GrassAdamW")


def per_rank_seed_worker(rank: int, world: int) -> dict:
    """Users seed each rank differently; a draw from the global RNG would give each rank other rows."""
    out = {}
    for name in RANDOMIZED:
        model = fsdp_model()
        torch.manual_seed(1000 + rank)
        opt = make_optimizer(name, model, moment_policy="project")
        train_steps(model, opt, 0, STEPS, rank, world)
        out[name] = full_state(model)
    return out


def test_fsdp2_randomized_refreshes_ignore_per_rank_global_seeds():
    results = run_distributed(per_rank_seed_worker)
    for name in RANDOMIZED:
        torch.manual_seed(7)
        want = single_process(name, moment_policy="project")
        for rank_result in results:
            assert_same_weights(rank_result[name], want)
