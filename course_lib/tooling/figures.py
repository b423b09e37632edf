"""The ``FIGURE`` line every benchmark ends with, written and read in this one place.

A figure is one measured number and the target it is held to, on one line a reader can grep::

    FIGURE lora_fwd_bwd_ours_over_peft: 0.991 (target <= 1.05) met

``benchmarks/report.py`` writes these lines (`format_figure`); the results JSON stores them under
``"figures"``; `course_lib.tooling.sitegen` reads them back (`parse_figure_line`) for the site's
benchmarks page; `parse_figures` picks them out of a run's whole output.
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass

OPS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt}
"""The comparisons a target may use, by the symbol the line shows."""

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_LINE = re.compile(rf"FIGURE (?P<name>[A-Za-z0-9_.@-]+): (?P<value>{_NUMBER}) "
                   rf"\(target (?P<op><=|>=|<|>) (?P<target>{_NUMBER})\) (?P<verdict>met|missed)")
_NAME = re.compile(r"[A-Za-z0-9_.@-]+")
FORM = "FIGURE <name>: <value> (target <op> <value>) met|missed"


class FigureLineError(ValueError):
    """A line that starts like a ``FIGURE`` line but is not one."""


@dataclass(frozen=True)
class Figure:
    """One figure: ``value`` held to ``op target``; ``met`` is the verdict the line states."""

    name: str
    value: float
    op: str
    target: float
    met: bool

    @property
    def verdict(self) -> str:
        return "met" if self.met else "missed"

    def line(self, fmt: str = ".3g") -> str:
        """The figure as its ``FIGURE`` line, the value written with ``fmt``."""
        return (f"FIGURE {self.name}: {self.value:{fmt}} (target {self.op} {self.target}) {self.verdict}")


def format_figure(name: str, value: float, op: str, target: float, fmt: str = ".3g") -> str:
    """``FIGURE <name>: <value> (target <op> <target>) met|missed``, the verdict computed here.

    ``value`` is written with the format spec ``fmt`` (3 significant digits by default, ``".3f"``
    for ratios near 1); ``target`` as Python writes it (``1.05``, ``15``, ``0.01``), so that
    `parse_figure_line` gives it back exactly.

    Raises:
        ValueError: for an unknown comparison, a name with spaces or punctuation that the line
            cannot carry, or a value or target that is not a finite number.
    """
    if op not in OPS:
        raise ValueError(f"unknown comparison {op!r}: use one of {', '.join(OPS)}")
    if not _NAME.fullmatch(name):
        raise ValueError(f"figure name {name!r}: use letters, digits and _ . @ - only")
    for what, number in (("value", value), ("target", target)):
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
            raise ValueError(f"figure {name}: the {what} must be a finite number, not {number!r}")
    line = Figure(name, value, op, target, OPS[op](value, target)).line(fmt)
    parse_figure_line(line)  # what cannot be read back is not written (a fmt that drops the number)
    return line


def _number(text: str) -> float:
    """``"15"`` → ``15`` (an int, so that it is written back as ``15``); else a float."""
    return int(text) if re.fullmatch(r"[-+]?\d+", text) else float(text)


def parse_figure_line(line: str) -> Figure:
    """The `Figure` of one ``FIGURE`` line (surrounding white space ignored).

    The verdict is taken as the line states it: the value on the line is rounded, so it is not
    recomputed here.

    Raises:
        FigureLineError: (a ValueError) if the line is not of the form
            ``FIGURE <name>: <value> (target <op> <value>) met|missed``, saying so and quoting it.
    """
    match = _LINE.fullmatch(line.strip())
    if not match:
        raise FigureLineError(f"not a FIGURE line: {line!r} (expected {FORM!r})")
    return Figure(match["name"], _number(match["value"]), match["op"], _number(match["target"]),
                  match["verdict"] == "met")


def parse_figures(text: str) -> list[Figure]:
    """Every figure in a run's output, in order: each line that starts with ``FIGURE``.

    Other lines are skipped; a line that starts with ``FIGURE`` but is malformed raises
    `FigureLineError`, with its line number.
    """
    figures = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.lstrip().startswith("FIGURE"):
            try:
                figures.append(parse_figure_line(line))
            except FigureLineError as err:
                raise FigureLineError(f"line {number}: {err}") from None
    return figures
