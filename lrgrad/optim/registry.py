"""The one registry of optimizer names: class name -> class, plus short aliases.

``lrgrad.OPTIMIZERS`` is this dict; the generic contract tests run over every
entry, the memory estimator and the experiments look names up here. A preset
registers itself with ``@register_optimizer("alias", ...)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

#: class name -> class, for every optimizer lrgrad exports
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {}
#: short name (``"galore"``, ``"qgalore"``, ...) -> class name
ALIASES: dict[str, str] = {}
#: names of torch's own optimizers that lrgrad compares against (the estimator, the experiments): not
#: lrgrad optimizers - ``"adamw"`` here is ``torch.optim.AdamW``, while ``RULES["adamw"]`` is lrgrad's
#: AdamW *rule*, which every AdamW preset runs inside its projector
BASELINES: dict[str, type[torch.optim.Optimizer]] = {"adamw": torch.optim.AdamW}


def register_optimizer(*aliases: str) -> Callable[[type], type]:
    """Class decorator: add the class to ``OPTIMIZERS`` under its name and each alias."""

    def register(cls: type) -> type:
        OPTIMIZERS[cls.__name__] = cls
        for alias in aliases:
            ALIASES[alias] = cls.__name__
        return cls

    return register


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The class for a class name or alias, or a torch baseline (``BASELINES``: ``"adamw"``)."""
    if isinstance(name, str) and name in BASELINES:
        return BASELINES[name]
    if not isinstance(name, str) or (name not in OPTIMIZERS and name not in ALIASES):
        raise ValueError(f"Invalid optimizer: {name!r}; expected a torch baseline {sorted(BASELINES)}, one of "
                         f"{sorted(ALIASES)} or a class name in lrgrad.OPTIMIZERS")
    return OPTIMIZERS[ALIASES.get(name, name)]


__all__ = ["ALIASES", "BASELINES", "OPTIMIZERS", "optimizer_class", "register_optimizer"]
