"""``torch.compile(opt.step)`` is refused with one clear error (README, "torch.compile").

An lrgrad step is host-driven by design: per parameter it branches on data (the non-finite
skip, a subspace refresh that keeps the old basis when an SVD fails), keeps refresh
counters and seeds as Python ints in the state (exact checkpoints), and quantizes state
and weights with its own kernels. Under Dynamo every one of these is a graph break or an
internal error (functionalization of the fused AdamW call, views of no-grad parameters in
the fused low-rank update), so a compiled step would be at best the eager step split into
many small graphs. The step's hot work already runs in fused kernels (``lrgrad.kernels``);
compile the model instead, which works.
"""

from __future__ import annotations

import torch

MESSAGE = (
    "{name}.step cannot be compiled: torch.compile(opt.step) is not supported by lrgrad optimizers (the step "
    "branches on data per parameter - non-finite skips, subspace refreshes - and keeps counters as Python "
    "ints for exact checkpoints, which Dynamo cannot capture). Call opt.step() eagerly and compile the model "
    "(torch.compile(model)); the step's hot loops already run in fused kernels (lrgrad.kernels)."
)


def _refuse(name: str) -> None:
    raise RuntimeError(MESSAGE.format(name=name))


#: ``disable`` makes Dynamo run this call eagerly, so the error reaches the caller instead of Dynamo
#: silently falling back to eager for the whole frame; under ``fullgraph=True`` Dynamo's own error
#: carries the same explanation as its ``reason``.
refuse_compiled_step = torch.compiler.disable(_refuse, reason=MESSAGE.format(name="an lrgrad optimizer"))
