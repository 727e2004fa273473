"""Param-group keys written for other libraries: honoured, refused by name, or warned about.

A param group written for another low-rank implementation must run what it says there or fail:
never run lrgrad's defaults in silence.

* **Honoured** (``ALIASED_KEYS``): a key another library uses for a setting lrgrad has under
  another name is renamed - pytorch-optimizer's GaLore ``projection_type="left"`` is
  ``proj_type="left"``, apollo-torch's (and transformers' APOLLO path's) ``proj="random"`` is
  ``projector="random"``. Both names with different values is a ``ValueError``.
* **Reference options** (``Projector.compat_options``): a group that carries another library's
  full key set also gets the options that reproduce it (galore-torch's four keys: its exact SVD),
  unless the group or the constructor sets them.
* **Refused** (``REFUSED_KEYS``): keys of other implementations whose meaning lrgrad spells
  differently: a ``ValueError`` naming the key and what to write instead.
* **Plain numbers** (:func:`plain_numbers`): numpy scalars (``np.float32(1e-3)`` from a sweep,
  ``np.int64`` ranks from a config array) become Python numbers, as they are when written by hand:
  torch's ``weights_only`` loader refuses a checkpoint whose param groups hold numpy scalars, so
  ``np.float64`` (a ``float`` subclass) would pass every check and break the resume.
* **Warned**: any other key lrgrad does not know in a group with a rank (a typo, ``amsgrad``
  from torch's AdamW, ...) gives one ``UserWarning`` per key and optimizer; it is kept in the
  group (torch keeps unknown keys) but changes nothing.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Collection, Mapping
from typing import Any

from lrgrad.groups import caller_stacklevel
from lrgrad.projectors import PROJECTORS
from lrgrad.rules import RULES
from lrgrad.rules.matrix import PAIRED_LR_KEY

#: other libraries' key -> (lrgrad's key of the same meaning, whose key it is)
ALIASED_KEYS: dict[str, tuple[str, str]] = {
    "projection_type": ("proj_type", "pytorch-optimizer's GaLore"),
    "proj": ("projector", "apollo-torch / transformers' APOLLO"),
}
#: other libraries' keys lrgrad does not take as they are -> what to write instead
REFUSED_KEYS: dict[str, str] = {
    "alpha": "Fira's alpha is lrgrad's scale: write scale=... (FiraAdamW)",
    "quant": "Q-GaLore's INT4 projection is QGaLoreAdamW (projector='qgalore')",
    "quant_n_bit": "Q-GaLore's quant_n_bit is proj_bits (projector='qgalore')",
    "quant_group_size": "Q-GaLore's quant_group_size is proj_quant_group_size (projector='qgalore')",
    "cos_threshold": "Q-GaLore's cos_threshold is adaptive_threshold (projector='qgalore')",
    "queue_size": "Q-GaLore's queue_size is adaptive_window (projector='qgalore')",
    "gamma_proj": "Q-GaLore's gamma_proj (gap multiplier) is fixed at 2 in lrgrad; set max_proj_gap",
}
#: keys torch.optim itself keeps in a group (not hyperparameters of lrgrad's)
TORCH_KEYS = frozenset({"params", "param_names", "initial_lr", "lr"})


def _plain(value: Any) -> Any:
    if type(value) in (bool, int, float) or isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):  # np.float32 is no float subclass, np.float64 is one
        return float(value)
    return value


def plain_numbers(group: dict[str, Any]) -> None:
    """Replace ``group``'s numpy scalars (top level, and inside tuples and lists such as ``betas``) by
    Python ints and floats in place; tensors (a tensor ``lr``) and everything else stay as they are."""
    for key, value in group.items():
        if key in ("params", "param_names"):
            continue
        if isinstance(value, (tuple, list)) and type(value) in (tuple, list):
            group[key] = type(value)(_plain(v) for v in value)
        else:
            group[key] = _plain(value)


def normalize_group(group: dict[str, Any], defaults: Mapping[str, Any], explicit: Collection[str],
                    warned: set[str]) -> None:
    """Rename, refuse or warn about ``group``'s foreign keys in place (see the module doc).

    ``defaults``: the optimizer's defaults (its rule's and projector's options included); ``explicit``:
    the options its constructor was given; ``warned``: the keys already warned about (updated)."""
    for key, (ours, whose) in ALIASED_KEYS.items():
        if key in group:
            value = group.pop(key)
            if ours in group and group[ours] != value:
                raise ValueError(f"Invalid {key}: {value!r} ({whose} name for {ours}) conflicts with "
                                 f"{ours}={group[ours]!r}; pass one")
            group[ours] = value
    for key, instead in REFUSED_KEYS.items():
        if key in group:
            raise ValueError(f"Invalid {key}: lrgrad does not read this key as it is written; {instead}")
    projector = PROJECTORS.get(group.get("projector", defaults.get("projector")))
    if projector is not None:
        for key, value in projector.compat_options(group).items():
            if key not in group and key not in explicit:
                group[key] = value
        if group.get("projector", defaults.get("projector")) != defaults.get("projector"):
            for key, value in projector.option_defaults.items():  # a group's own projector: its own defaults
                group.setdefault(key, value)
    rank = group.get("rank", defaults.get("rank"))
    if rank is None:
        return
    rule = RULES.get(group.get("rule", defaults.get("rule")))
    known = TORCH_KEYS | {PAIRED_LR_KEY} | defaults.keys() | (rule.option_defaults.keys() if rule else set()) | (
        projector.option_defaults.keys() if projector else set())
    for key in sorted(group.keys() - known - warned):
        warned.add(key)
        warnings.warn(f"lrgrad: param group key {key!r} is not an option of this optimizer (rule "
                      f"{rule.name if rule else None!r}, projector {projector.name if projector else None!r}) and "
                      f"changes nothing; check its spelling", UserWarning, stacklevel=caller_stacklevel())


__all__ = ["ALIASED_KEYS", "REFUSED_KEYS", "TORCH_KEYS", "normalize_group", "plain_numbers"]
