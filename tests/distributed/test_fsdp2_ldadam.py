"""FSDP2: LDAdam is a documented exception (docs/ldadam.md) - its error buffer is full size and advanced by
the projector, which the FSDP2 wrapper's left-side ``down`` never reaches - so a sharded step refuses
with a ValueError that says so, on every rank, instead of training wrongly."""

from __future__ import annotations

from harness import make_model, make_optimizer, run_distributed, train_steps

from lrgrad.distributed import setup_parallel


def ldadam_worker(rank: int, world: int) -> str:
    model = setup_parallel(make_model(), "fsdp2")
    opt = make_optimizer("LDAdamW", model)
    try:
        train_steps(model, opt, 0, 1, rank, world)
    except ValueError as error:
        return str(error)
    return "stepped"


def test_fsdp2_ldadam_refuses_clearly():
    for message in run_distributed(ldadam_worker):
        assert "LDAdam" in message and "FSDP2" in message, message
