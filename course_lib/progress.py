"""Progress on long work: a tqdm bar in a terminal, a plain line of text in a notebook.

In a notebook, ``tqdm.auto`` draws a widget, and a saved notebook keeps only the widget's text
fallback, frozen at "0%"; a text bar would be saved as every redraw, and its rates change from
run to run. So in a Jupyter kernel :func:`progress` prints one line instead, growing as the work
goes, ``SmolLM2 LoRA: 2/6 3/6 5/6 6/6``: steps at each quarter, the same text every run. In a
terminal (benchmarks, the command line) it is a normal tqdm bar on stderr.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Iterator

from tqdm.std import tqdm


def in_notebook() -> bool:
    """True inside a Jupyter kernel (IPython's shell there is a ``ZMQInteractiveShell``, as tqdm checks)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return type(shell).__name__ == "ZMQInteractiveShell"


class TextProgress:
    """Iterate ``iterable`` and print ``desc: k/n`` on one line at each quarter of ``n`` items."""

    def __init__(self, iterable: Iterable, desc: str, total: int | None = None):
        self.iterable = iterable
        self.desc = desc
        self.total = total if total is not None else len(iterable)   # type: ignore[arg-type]
        self.marks = {math.ceil(self.total * q / 4) for q in (1, 2, 3, 4)} - {0}

    def set_postfix(self, *args, **kwargs) -> None:
        """Ignored: numbers that vary from run to run stay out of the saved text."""

    def __iter__(self) -> Iterator:
        print(f"{self.desc}:", end="", flush=True)
        for done, item in enumerate(self.iterable, start=1):
            yield item
            if done in self.marks:
                print(f" {done}/{self.total}", end="", flush=True)
        print(flush=True)


def progress(iterable: Iterable, desc: str, disable: bool = False, total: int | None = None):
    """A progress display over ``iterable``: text in a notebook, a tqdm bar elsewhere, nothing if ``disable``."""
    if disable:
        return tqdm(iterable, desc=desc, total=total, disable=True)
    if in_notebook():
        return TextProgress(iterable, desc, total)
    return tqdm(iterable, desc=desc, total=total)
