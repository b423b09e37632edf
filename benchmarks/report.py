"""What every benchmark script shares: the median timing and the `FIGURE` line it ends with.

The scripts are run as ``python benchmarks/<name>.py``, so this folder is on ``sys.path`` and
they import this module as ``report``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

OPS = {"<=": lambda v, t: v <= t, ">=": lambda v, t: v >= t, ">": lambda v, t: v > t, "<": lambda v, t: v < t}


def figure(name: str, value: float, op: str, target: float) -> str:
    """``FIGURE <name>: <value> (target <op> <target>) met|missed``: one line a reader can grep."""
    if op not in OPS:
        raise ValueError(f"unknown comparison {op!r}: use one of {', '.join(OPS)}")
    return f"FIGURE {name}: {value:.3g} (target {op} {target}) {'met' if OPS[op](value, target) else 'missed'}"


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs, after one warm-up run."""
    fn()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)
