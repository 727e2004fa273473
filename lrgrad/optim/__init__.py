"""Optimizers: the generic ``LowRankOptimizer``, the table of its presets, and the name registry."""

from lrgrad.optim.lowrank import LowRankOptimizer
from lrgrad.optim.presets import (
    PRESETS,
    APOLLOAdamW,
    APOLLOMiniAdamW,
    AuON,
    CondaAdamW,
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
    LDAdamW,
    LowRankAdafactor,
    LowRankAdamW,
    LowRankLion,
    Muon,
    OnlineSubspaceAdamW,
    OnlineSubspaceLion,
    Preset,
    QGaLoreAdamW,
)
from lrgrad.optim.registry import ALIASES, OPTIMIZERS, optimizer_class, register_optimizer

__all__ = ["ALIASES", "OPTIMIZERS", "PRESETS", "Preset", "APOLLOAdamW", "APOLLOMiniAdamW", "FiraAdamW", "FRUGALAdamW",
           "CondaAdamW", "GoLoreAdamW", "LDAdamW",
           "DCTAdafactor", "DCTAdamW", "OnlineSubspaceAdamW", "OnlineSubspaceLion",
           "FloraAdafactor", "FloraAdamW",
           "GaLoreAdafactor", "GaLoreAdamW", "GaLoreAdamW8bit", "LowRankAdafactor", "LowRankAdamW", "LowRankLion",
           "GrassAdamW", "QGaLoreAdamW",
           "AuON", "DCTAuON", "GaLoreAuON", "GaLoreMuon", "HybridAuON", "Muon",
           "LowRankOptimizer", "optimizer_class", "register_optimizer"]
