"""The generic presets: one update rule inside any projector (``projector="svd" | "dct" | ...``).

Their rows are in ``lrgrad.optim.presets``; the argument names follow ``torch.optim.AdamW``
(``lr, betas, eps, weight_decay, maximize, foreach``) and galore-torch's group keys (``rank,
update_proj_gap, scale, proj_type``), so migrating is a change of import.
"""

from __future__ import annotations

from lrgrad.optim.presets import LowRankAdafactor, LowRankAdamW, LowRankLion, ParamsT

__all__ = ["LowRankAdafactor", "LowRankAdamW", "LowRankLion", "ParamsT"]
