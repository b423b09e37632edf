"""What every benchmark script shares: the median timing, the `FIGURE` line it ends with, and
``--figures-only`` (the figures recomputed from a committed JSON, nothing measured).

The scripts are run as ``python benchmarks/<name>.py``, so this folder is on ``sys.path`` and
they import this module as ``report``.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

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


FIGURES_ONLY_HELP = ("measure nothing: read the results JSON this script wrote, recompute its FIGURE lines from "
                     "the recorded measurements, store them there under \"figures\" and print them")


def recompute_figures(path: Path, figures: Callable[[dict], list[str]], indent: int = 2) -> list[str]:
    """``--figures-only``: ``figures(result)`` of the JSON at ``path``, stored back into it.

    The lines go under ``"figures"`` (in its place if the file has one, else at the end), followed
    by ``"figures_recomputed"``, which says when and how; every other key keeps its value and its
    place. Returns the lines, for the script to print last.
    """
    result = json.loads(path.read_text(encoding="utf-8"))
    lines = figures(result)
    note = f"{date.today()} by --figures-only from this file's measurements"
    result.pop("figures_recomputed", None)
    if "figures" not in result:
        result["figures"] = None
    updated = {}
    for key, value in result.items():
        if key == "figures":
            updated |= {"figures": lines, "figures_recomputed": note}
        else:
            updated[key] = value
    path.write_text(json.dumps(updated, indent=indent) + "\n", encoding="utf-8")
    return lines
