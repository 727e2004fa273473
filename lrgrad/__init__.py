"""lrgrad: memory-efficient low-rank optimizers for PyTorch.

Every optimizer is an update rule (AdamW, Adafactor, Lion, ...) running inside
a projector (SVD, ...); see ``LowRankOptimizer`` and the presets below.
"""

from lrgrad.accumulation import CompressedAccumulator
from lrgrad.estimate import MemoryEstimate, estimate_memory
from lrgrad.groups import param_groups, select_low_rank_modules
from lrgrad.layerwise import LayerwiseOptimizer
from lrgrad.memory import optimizer_state_bytes
from lrgrad.optim import (
    ALIASES,
    OPTIMIZERS,
    APOLLOAdamW,
    APOLLOMiniAdamW,
    AuON,
    DCTAdafactor,
    DCTAdamW,
    DCTAuON,
    FiraAdamW,
    FloraAdafactor,
    FloraAdamW,
    FRUGALAdamW,
    GaLoreAdafactor,
    GaLoreAdamW,
    GaLoreAdamW8bit,
    GaLoreAuON,
    GaLoreMuon,
    GoLoreAdamW,
    GrassAdamW,
    HybridAuON,
    LowRankAdafactor,
    LowRankAdamW,
    LowRankLion,
    LowRankOptimizer,
    Muon,
    OnlineSubspaceAdamW,
    OnlineSubspaceLion,
    QGaLoreAdamW,
    register_optimizer,
)
from lrgrad.projectors import PROJECTORS, Projector, register_projector
from lrgrad.qweights import QuantizedLinear, dequantize_weights, quantize_weights
from lrgrad.rules import RULES, UpdateRule, register_rule

__version__ = "0.1.0"

__all__ = [
    "APOLLOAdamW",
    "APOLLOMiniAdamW",
    "FiraAdamW",
    "FRUGALAdamW",
    "DCTAdafactor",
    "DCTAdamW",
    "OnlineSubspaceAdamW",
    "OnlineSubspaceLion",
    "AuON",
    "DCTAuON",
    "GaLoreAuON",
    "GaLoreMuon",
    "GoLoreAdamW",
    "GrassAdamW",
    "HybridAuON",
    "Muon",
    "ALIASES",
    "OPTIMIZERS",
    "register_optimizer",
    "PROJECTORS",
    "RULES",
    "CompressedAccumulator",
    "FloraAdafactor",
    "FloraAdamW",
    "GaLoreAdafactor",
    "GaLoreAdamW",
    "GaLoreAdamW8bit",
    "LayerwiseOptimizer",
    "LowRankAdafactor",
    "LowRankAdamW",
    "LowRankLion",
    "LowRankOptimizer",
    "Projector",
    "QGaLoreAdamW",
    "UpdateRule",
    "QuantizedLinear",
    "dequantize_weights",
    "MemoryEstimate",
    "estimate_memory",
    "optimizer_state_bytes",
    "quantize_weights",
    "param_groups",
    "register_projector",
    "register_rule",
    "select_low_rank_modules",
]
