"""Helpers shared by the tests: a weights_only round trip, exact state comparison, oracle data."""

from __future__ import annotations

import io
from typing import Any

import torch


def roundtrip(obj: Any) -> Any:
    """``torch.save`` then ``torch.load(..., weights_only=True)``, in memory."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def assert_states_equal(a: dict, b: dict) -> None:
    """Same keys, and every tensor equal in dtype, shape and value (nested dicts too)."""
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor), key
            assert x.dtype == y.dtype and x.shape == y.shape, key
            assert torch.equal(x, y), key
        elif isinstance(x, dict):
            assert_states_equal(x, y)
        else:
            assert x == y, key


def assert_rerun_and_resume_bit_identical(make_optimizer: Any, grads: list[torch.Tensor]) -> torch.optim.Optimizer:
    """Step one param (zeros shaped like the gradients) through ``grads`` with ``make_optimizer([w])``
    three ways - straight through, stopped halfway and resumed from ``state_dict()`` in a fresh
    optimizer, and again from scratch - and assert the final weights are bit-identical. Returns the
    straight-through optimizer."""

    def run(steps, opt_state=None, w0=None):
        w = torch.nn.Parameter(torch.zeros_like(grads[0]) if w0 is None else w0.clone())
        opt = make_optimizer([w])
        if opt_state is not None:
            opt.load_state_dict(opt_state)
        for g in steps:
            w.grad = g.clone()
            opt.step()
        return w.detach().clone(), opt

    full, opt_full = run(grads)
    half, opt = run(grads[: len(grads) // 2])
    resumed, _ = run(grads[len(grads) // 2:], opt.state_dict(), half)
    assert torch.equal(full, resumed)
    again, _ = run(grads)
    assert torch.equal(full, again)
    return opt_full


def regression_problem(m: int, n: int, steps: int, batch: int, seed: int = 0):
    """A float64 m x n start and ``steps`` batches ``(x, y)`` (n x batch, m x batch) of a linear
    least-squares task, drawn in that order from one seeded generator: the oracle tests' shared data."""
    gen = torch.Generator().manual_seed(seed)
    start = torch.randn(m, n, generator=gen, dtype=torch.float64)
    data = [(torch.randn(n, batch, generator=gen, dtype=torch.float64),
             torch.randn(m, batch, generator=gen, dtype=torch.float64)) for _ in range(steps)]
    return start, data


def least_squares_problem(shapes, steps: int, seed: int = 7, batch: int = 16):
    """float64 weights for ``shapes`` and ``steps`` batches of ``(x, y)`` per weight (``x``: n x batch,
    ``y``: m x batch) for the loss ``||W x - y||²`` (:func:`set_least_squares_grads`): the problem the
    equivalence tests against other libraries step both optimizers on, drawn in one fixed order."""
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.randn(m, n, generator=gen, dtype=torch.float64) for m, n in shapes]
    batches = [[(torch.randn(n, batch, generator=gen, dtype=torch.float64),
                 torch.randn(m, batch, generator=gen, dtype=torch.float64)) for m, n in shapes]
               for _ in range(steps)]
    return weights, batches


def set_least_squares_grads(params, batch) -> None:
    """Each param's ``.grad`` = the gradient of ``||p x - y||²`` for its ``(x, y)`` in ``batch``."""
    for p, (x, y) in zip(params, batch):
        p.grad = None
        with torch.enable_grad():
            ((p @ x - y) ** 2).sum().backward()


def step_side_by_side(ours, ours_params, theirs, theirs_params, batches, start):
    """Step two optimizers over the same least-squares ``batches`` (:func:`set_least_squares_grads`):
    ``(per-step max relative weight difference, how far ours moved from ``start``)``."""
    diffs = []
    for batch in batches:
        set_least_squares_grads(ours_params, batch)
        set_least_squares_grads(theirs_params, batch)
        ours.step()
        theirs.step()
        diffs.append(max(float((a - b).detach().abs().max() / b.detach().abs().max())
                         for a, b in zip(ours_params, theirs_params)))
    moved = max(float((p.detach() - w).abs().max()) for p, w in zip(ours_params, start))
    return diffs, moved

