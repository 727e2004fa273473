"""lrgrad: memory-efficient low-rank optimizers for PyTorch.

Every optimizer is an update rule (AdamW, Adafactor, Lion, ...) running inside
a projector (SVD, ...); see ``LowRankOptimizer`` and its presets (``lrgrad.optim.presets``).
"""

from lrgrad import optim
from lrgrad.accumulation import CompressedAccumulator
from lrgrad.estimate import MemoryEstimate, estimate_memory
from lrgrad.groups import param_groups, select_low_rank_modules
from lrgrad.layerwise import LayerwiseOptimizer
from lrgrad.memory import optimizer_state_bytes
from lrgrad.optim import *  # noqa: F403 - LowRankOptimizer, every preset of the table, the registry
from lrgrad.projectors import PROJECTORS, Projector, register_projector
from lrgrad.qweights import QuantizedLinear, dequantize_weights, quantize_weights
from lrgrad.rules import RULES, UpdateRule, register_rule

__version__ = "0.1.0"

__all__ = [
    "CompressedAccumulator",
    "LayerwiseOptimizer",
    "MemoryEstimate",
    "PROJECTORS",
    "Projector",
    "QuantizedLinear",
    "RULES",
    "UpdateRule",
    "dequantize_weights",
    "estimate_memory",
    "optimizer_state_bytes",
    "param_groups",
    "quantize_weights",
    "register_projector",
    "register_rule",
    "select_low_rank_modules",
]
__all__ += optim.__all__  # the optimizers: one list, lrgrad.optim's
