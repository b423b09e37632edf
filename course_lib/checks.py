"""Argument checks shared by the techniques: one message for one mistake, everywhere.

Each check raises ``ValueError`` naming the argument, what it should be, and the value it got,
so that a learner's typo fails at the call that made it, before anything is changed.
``bool`` is refused where an integer is asked for (``True`` is an ``int`` in Python, and
``r=True`` is never what someone meant).
"""

from __future__ import annotations

import math
import numbers
import re


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


def boolean(name: str, value) -> bool:
    """``value`` if it is ``True`` or ``False`` (a string such as ``"no"`` would count as true)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def finite_numbers(name: str, values, hint: str = "") -> list:
    """``values`` as a list if each is a finite real number (not a bool): mixing weights, say."""
    if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        raise ValueError(f"{name} must be finite numbers{_hint(hint)}, got {list(values)!r}")
    return list(values)


def known_names(argument: str, names, known: list[str], kind: str = "adapter", owner: str = "this model") -> list[str]:
    """``names`` if it is a list of strings, each one of ``known``, none repeated (a repeat would,
    say, merge an adapter's update twice)."""
    if isinstance(names, str) or not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"{argument} must be a list of {kind} names such as {known!r}, got {names!r}")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown {kind} {unknown[0]!r}; {owner} has {known}")
    repeated = [n for n in names if names.count(n) > 1]
    if repeated:
        raise ValueError(f"{argument} lists {repeated[0]!r} twice; list each {kind} once")
    return list(names)


def regex(name: str, pattern: str, what_to_do: str = "") -> re.Pattern:
    """``pattern`` compiled, or a one-line ``ValueError`` saying it is not a regular expression
    (instead of ``re.error``), followed by ``what_to_do``."""
    try:
        return re.compile(pattern)
    except re.error as error:
        raise ValueError(f"{name} {pattern!r} is not a valid regular expression ({error})"
                         + (f"; {what_to_do}" if what_to_do else "")) from None
