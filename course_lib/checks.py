"""Argument checks shared by the techniques: one message for one mistake, everywhere.

Each check raises ``ValueError`` naming the argument, what it should be, and the value it got,
so that a learner's typo fails at the call that made it, before anything is changed.
``bool`` is refused where an integer is asked for (``True`` is an ``int`` in Python, and
``r=True`` is never what someone meant).
"""

from __future__ import annotations

import math


def _hint(hint: str) -> str:
    return f" ({hint})" if hint else ""


def positive_int(name: str, value, hint: str = "") -> int:
    """``value`` if it is an integer >= 1, else a ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer{_hint(hint)}, got {value!r}")
    return value


def optional_positive_int(name: str, value, hint: str = "") -> int | None:
    """``None`` (meaning "not set") or a positive integer."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer or None{_hint(hint)}, got {value!r}")
    return value


def positive_number(name: str, value, hint: str = "") -> float:
    """``value`` if it is a finite real number > 0 (int or float, not bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number{_hint(hint)}, got {value!r}")
    return value


def fraction(name: str, value, hint: str = "") -> float:
    """``value`` if it is a real number in [0, 1) (a dropout probability, a headroom share)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a number in [0, 1){_hint(hint)}, got {value!r}")
    return value


def one_of(name: str, value, choices, hint: str = ""):
    """``value`` if it is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}{_hint(hint)}, got {value!r}")
    return value
