"""Argument validation: the one place lrgrad's checks live (layer 0, imports only the stdlib).

Every check raises ``TypeError`` for a value of the wrong type and ``ValueError``
for a value out of range, with a message that starts ``"Invalid <name>: "`` so
the user sees which argument is wrong (``torch.optim``'s convention).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


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


__all__ = ["check_beta", "check_betas", "check_bool", "check_choice", "check_coefficients", "check_float",
           "check_int", "check_nonnegative", "check_positive"]
