"""Optimizers: the generic ``LowRankOptimizer``, its presets grouped by family, and the name registry."""

from lrgrad.optim.apollo import APOLLOAdamW, APOLLOMiniAdamW, FiraAdamW
from lrgrad.optim.dct import DCTAdafactor, DCTAdamW
from lrgrad.optim.flora import FloraAdafactor, FloraAdamW
from lrgrad.optim.galore import GaLoreAdafactor, GaLoreAdamW
from lrgrad.optim.generic import LowRankAdafactor, LowRankAdamW, LowRankLion
from lrgrad.optim.grass import GrassAdamW
from lrgrad.optim.lowrank import LowRankOptimizer
from lrgrad.optim.normalized import AuON, DCTAuON, GaLoreAuON, GaLoreMuon, HybridAuON, Muon
from lrgrad.optim.online_subspace import OnlineSubspaceAdamW, OnlineSubspaceLion
from lrgrad.optim.qgalore import GaLoreAdamW8bit, QGaLoreAdamW
from lrgrad.optim.registry import ALIASES, OPTIMIZERS, optimizer_class, register_optimizer

__all__ = ["ALIASES", "OPTIMIZERS", "APOLLOAdamW", "APOLLOMiniAdamW", "FiraAdamW",
           "DCTAdafactor", "DCTAdamW", "OnlineSubspaceAdamW", "OnlineSubspaceLion",
           "FloraAdafactor", "FloraAdamW",
           "GaLoreAdafactor", "GaLoreAdamW", "GaLoreAdamW8bit", "LowRankAdafactor", "LowRankAdamW", "LowRankLion",
           "GrassAdamW", "QGaLoreAdamW",
           "AuON", "DCTAuON", "GaLoreAuON", "GaLoreMuon", "HybridAuON", "Muon",
           "LowRankOptimizer", "optimizer_class", "register_optimizer"]
