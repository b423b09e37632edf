"""The FIGURE line every benchmark script ends with (benchmarks/report.py): the exact grep-able form."""

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import report

LINE = re.compile(r"^FIGURE [a-z0-9_]+: \S+ \(target (<=|>=|<|>) \S+\) (met|missed)$")


@pytest.mark.parametrize("value, op, target, verdict", [
    (1.22, "<=", 1.5, "met"), (1.5, "<=", 1.5, "met"), (1.51, "<=", 1.5, "missed"),
    (4.0, ">=", 4, "met"), (-0.07, ">", 0, "missed"), (0.0, "<", 0, "missed"),
])
def test_figure_line(value, op, target, verdict):
    line = report.figure("some_ratio", value, op, target)
    assert LINE.match(line), line
    assert line.endswith(verdict)


def test_unknown_comparison_is_refused():
    with pytest.raises(ValueError, match="unknown comparison '=='"):
        report.figure("x", 1.0, "==", 1.0)


def test_timed_is_the_median_after_a_warm_up():
    calls = []
    assert report.timed(lambda: calls.append(1), repeats=3) >= 0
    assert len(calls) == 4
