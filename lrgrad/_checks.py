"""Argument validation: the one place the checks of lrgrad and its kernels live (layer 0: imports torch only).

Every check raises ``TypeError`` for a value of the wrong type and ``ValueError``
for a value out of range, with a message that starts ``"Invalid <name>: "`` so
the user sees which argument is wrong (``torch.optim``'s convention).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


def check_int(name: str, value: Any, minimum: int, allow_none: bool = False) -> None:
    """An int (not a bool) >= ``minimum``; ``None`` too when ``allow_none``."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Invalid {name}: expected an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"Invalid {name}: {value} (must be >= {minimum})")


def check_float(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    allow_none: bool = False,
    finite: bool = True,
) -> None:
    """A real number (not a bool) in ``[minimum, maximum]``; NaN is always rejected."""
    if value is None and allow_none:
        return
    if not _is_number(value):
        raise TypeError(f"Invalid {name}: expected a float, got {type(value).__name__} ({value!r})")
    if value != value or (finite and not math.isfinite(value)):
        raise ValueError(f"Invalid {name}: {value} (must be a finite number)")
    if minimum is not None and value < minimum:
        raise ValueError(f"Invalid {name}: {value} (must be >= {minimum})")
    if maximum is not None and value > maximum:
        raise ValueError(f"Invalid {name}: {value} (must be <= {maximum})")


def check_nonnegative(name: str, value: Any) -> None:
    """A number >= 0 (``torch.optim``'s message: ``Invalid <name> value: ...``)."""
    if not _is_number(value):
        raise TypeError(f"Invalid {name}: expected a float, got {type(value).__name__}")
    if not value >= 0.0:  # also rejects NaN
        raise ValueError(f"Invalid {name} value: {value}")


def check_lr(value: Any) -> None:
    """A number >= 0, or a one-element tensor (``torch.optim`` takes a tensor lr)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"Invalid lr: Tensor lr must be 1-element, got shape {tuple(value.shape)}")
        return
    if isinstance(value, numbers.Real) and not isinstance(value, bool):  # numpy scalars are kept as the float
        value = float(value)
    check_nonnegative("learning rate", value)


def check_positive(name: str, value: Any, allow_none: bool = False) -> None:
    """A finite number > 0."""
    if value is None and allow_none:
        return
    if not _is_number(value):
        raise TypeError(f"Invalid {name}: expected a float, got {type(value).__name__}")
    if not (value > 0.0 and math.isfinite(value)):
        raise ValueError(f"Invalid {name}: {value} (must be a positive finite number)")


def check_beta(name: str, value: Any, allow_none: bool = False) -> None:
    """A decay rate in ``[0, 1)``."""
    if value is None and allow_none:
        return
    if not _is_number(value):
        raise TypeError(f"Invalid {name}: expected a float, got {type(value).__name__}")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"Invalid {name}: {value} (must be in [0, 1))")


def check_betas(value: Any, count: int = 2, name: str = "betas") -> None:
    """A tuple of ``count`` decay rates; messages name ``name`` and the index."""
    if not isinstance(value, (tuple, list)) or len(value) != count:
        raise TypeError(f"Invalid {name}: expected a tuple of {count} floats, got {value!r}")
    prefix = "" if name == "betas" else f"{name}: "
    for i, beta in enumerate(value):
        check_beta(f"{prefix}beta parameter at index {i}", beta)


def check_bool(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, bool):
        expected = "None or a bool" if allow_none else "a bool"
        raise TypeError(f"Invalid {name}: expected {expected}, got {value!r}")


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    """``value`` is one of ``choices`` (a bool never passes for an int choice)."""
    if isinstance(value, bool) and not any(isinstance(c, bool) for c in choices):
        raise ValueError(f"Invalid {name}: {value!r}; expected one of {tuple(choices)}")
    try:
        ok = value in choices
    except TypeError:  # unhashable or incomparable
        ok = False
    if not ok:
        raise ValueError(f"Invalid {name}: {value!r}; expected one of {tuple(choices)}")


def check_coefficients(coefficients: Any, name: str = "ns_coefficients") -> None:
    """Newton–Schulz (a, b, c): a tuple of three numbers."""
    if (not isinstance(coefficients, (tuple, list)) or len(coefficients) != 3
            or not all(_is_number(c) for c in coefficients)):
        raise TypeError(f"Invalid {name}: expected a tuple of 3 floats (a, b, c), got {coefficients!r}")


def check_tensor(name: str, value: Any, *, ndim: int | None = None, min_ndim: int | None = None,
                 floating: bool = False) -> None:
    """A ``torch.Tensor``; ``ndim``: exactly that many dimensions (2: a matrix), ``min_ndim``: at least
    (2: a matrix or a batch of them); ``floating``: a floating-point dtype."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"Invalid {name}: expected a tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        what = "a matrix" if ndim == 2 else f"a {ndim}-D tensor"
        raise ValueError(f"Invalid {name}: expected {what}, got shape {tuple(value.shape)}")
    if min_ndim is not None and value.dim() < min_ndim:
        raise ValueError(f"Invalid {name}: expected at least {min_ndim} dimensions (a matrix or a batch of "
                         f"matrices), got shape {tuple(value.shape)}")
    if floating and not value.is_floating_point():
        raise TypeError(f"Invalid {name}: expected a floating-point tensor, got {value.dtype}")


def check_numel(name: str, shape: Any, numel: int) -> torch.Size:
    """``shape`` as a ``torch.Size`` holding exactly ``numel`` elements (e.g. the shape codes decode to)."""
    shape = torch.Size(shape)
    if shape.numel() != numel:
        raise ValueError(f"Invalid {name}: {tuple(shape)} has {shape.numel()} elements, the codes hold {numel}")
    return shape


def check_group_stats(scale: torch.Tensor, zero: torch.Tensor, numel: int, group_size: int) -> None:
    """One scale and one zero point per group of ``group_size`` of ``numel`` quantized elements."""
    groups = -(-numel // group_size)
    if scale.numel() != groups or zero.numel() != groups:
        raise ValueError(
            f"Invalid scale/zero: expected {groups} groups of {group_size} for {numel} elements, "
            f"got {scale.numel()} scales and {zero.numel()} zeros"
        )


def check_seed(name: str, value: Any) -> None:
    """An int (any sign: it is reduced to the generator's range) or ``None`` (a fresh draw)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise TypeError(f"Invalid {name}: expected an int or None, got {type(value).__name__}")


__all__ = ["check_beta", "check_betas", "check_bool", "check_choice", "check_coefficients", "check_float",
           "check_group_stats", "check_int", "check_nonnegative", "check_numel", "check_positive", "check_seed",
           "check_tensor"]
