"""FSDP2: Conda and LDAdam are the documented exceptions (docs/conda.md, docs/ldadam.md) - Conda's
momentum and LDAdam's error buffer are full size and advanced by the projector, which the FSDP2
wrapper's left-side ``down`` never reaches - so a sharded step of their presets refuses with a
ValueError that names the method, on every rank, instead of training wrongly."""

from __future__ import annotations

import pytest
from harness import make_model, make_optimizer, run_distributed, train_steps

from lrgrad.distributed import setup_parallel


def preset_worker(rank: int, world: int, preset: str) -> str:
    model = setup_parallel(make_model(), "fsdp2")
    opt = make_optimizer(preset, model)
    try:
        train_steps(model, opt, 0, 1, rank, world)
    except ValueError as error:
        return str(error)
    return "stepped"


@pytest.mark.parametrize(("preset", "method"), [("CondaAdamW", "Conda"), ("LDAdamW", "LDAdam")])
def test_fsdp2_preset_refuses_clearly(preset, method):
    for message in run_distributed(preset_worker, preset):
        assert method in message and "FSDP2" in message, message
