"""Projectors and their registry (name -> class)."""

from __future__ import annotations

from lrgrad.projectors.base import Projector
from lrgrad.projectors.conda import CondaProjector
from lrgrad.projectors.dct import DCTProjector
from lrgrad.projectors.golore import GoLoreProjector
from lrgrad.projectors.grass import GrassProjector
from lrgrad.projectors.ldadam import LDAdamProjector
from lrgrad.projectors.online_pca import OnlinePCAProjector
from lrgrad.projectors.qgalore import QGaLoreProjector
from lrgrad.projectors.random import RandomProjector
from lrgrad.projectors.svd import SVDProjector
from lrgrad.subspace import MOMENT_POLICIES, PROJ_TYPES, projection_side

PROJECTORS: dict[str, type[Projector]] = {}


def register_projector(cls: type[Projector]) -> type[Projector]:
    """Make ``cls`` available as ``projector=cls.name`` in every lrgrad optimizer."""
    PROJECTORS[cls.name] = cls
    return cls


register_projector(SVDProjector)
register_projector(QGaLoreProjector)
register_projector(RandomProjector)
register_projector(DCTProjector)
register_projector(OnlinePCAProjector)
register_projector(GrassProjector)
register_projector(GoLoreProjector)
register_projector(CondaProjector)
register_projector(LDAdamProjector)

__all__ = ["CondaProjector", "DCTProjector", "GoLoreProjector", "GrassProjector", "LDAdamProjector",
           "OnlinePCAProjector",
           "MOMENT_POLICIES", "PROJECTORS", "PROJ_TYPES", "Projector", "QGaLoreProjector", "RandomProjector",
           "SVDProjector", "projection_side", "register_projector"]
