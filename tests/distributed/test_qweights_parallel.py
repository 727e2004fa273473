"""INT8 weights (``lrgrad.quantize_weights``) are single-process: every data-parallel route says so.

The silent route this guards: ``DDP(model)`` first, then ``quantize_weights(model)`` - DDP keeps
all-reducing the replaced float weights, so each rank updated its INT8 weights from its own local
gradient and the ranks drifted apart without a word. The loud routes (``DDP`` or ``fully_shard`` of a
quantized model) failed inside torch with a stride error; ``setup_parallel`` names the reason.
"""

from __future__ import annotations

import warnings

import pytest
from harness import run_distributed
from torch import nn

import lrgrad
from lrgrad.qweights import quantized_modules


def model() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))


def refusals_worker(rank: int, world: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    from lrgrad.distributed import setup_parallel

    out = {}

    def caught(fn) -> str:
        try:
            fn()
        except Exception as exc:  # the test below asserts the type and the text
            return f"{type(exc).__name__}: {exc}"
        return "no error"

    quantized = lrgrad.quantize_weights(model(), group_size=8)
    out["setup_ddp"] = caught(lambda: setup_parallel(quantized, "ddp"))
    out["setup_fsdp2"] = caught(lambda: setup_parallel(lrgrad.quantize_weights(model(), group_size=8), "fsdp2"))
    out["after_ddp"] = caught(lambda: lrgrad.quantize_weights(DistributedDataParallel(model()), group_size=8))
    out["after_fsdp2"] = caught(lambda: lrgrad.quantize_weights(setup_parallel(model(), "fsdp2"), group_size=8))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        lrgrad.quantize_weights(model(), group_size=8)  # the inner module of a wrapper cannot be told apart
    out["warnings"] = [str(w.message) for w in seen if issubclass(w.category, UserWarning)]
    return out


@pytest.fixture(scope="module")
def refusals():
    return run_distributed(refusals_worker)


@pytest.mark.parametrize("route", ["setup_ddp", "setup_fsdp2", "after_ddp", "after_fsdp2"])
def test_data_parallel_int8_weights_are_refused_with_the_reason(refusals, route):
    for result in refusals:
        assert result[route].startswith("ValueError: Invalid "), result[route]
        assert "INT8 weights (lrgrad.quantize_weights) are single-process" in result[route]
    if route.startswith("setup"):
        assert "'0'" not in refusals[0][route] and "0, 2" in refusals[0][route]  # names the quantized layers
    else:
        wrapper = "DistributedDataParallel" if route == "after_ddp" else "FSDPSequential"
        assert wrapper in refusals[0][route]


def test_quantizing_under_several_processes_warns(refusals):
    for result in refusals:
        assert any("with 2 processes" in w and "single-process" in w for w in result["warnings"]), result["warnings"]


def test_one_process_quantizes_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(quantized_modules(lrgrad.quantize_weights(model(), group_size=8))) == 2
