"""The committed benchmark results, found the same way from every chapter.

A chapter may run with the repository root as its working folder (``pytest --nbval notebooks/``,
``make``) or with ``notebooks/`` (JupyterLab), or from a student copy in a folder beside
``notebooks/``; :func:`repository_root` looks in the working folder and its parents for the
course's top level (``benchmarks/results`` beside ``course_lib``), so a relative ``../`` that is
right in one of those places and wrong in another never appears in a chapter.
"""

from __future__ import annotations

import json
from pathlib import Path


def repository_root(start: str | Path | None = None) -> Path:
    """The course repository holding ``start`` (default: the working folder), or a clear error."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "benchmarks" / "results").is_dir() and (folder / "course_lib").is_dir():
            return folder
    raise FileNotFoundError("no course repository (a folder with benchmarks/results/ and course_lib/) at or above "
                            "the working folder: open the chapter from the course's folder or its notebooks/ folder")


def benchmark_result(name: str, start: str | Path | None = None) -> dict:
    """``benchmarks/results/<name>.json`` of the repository, as a dict (``name`` without ``.json``)."""
    if not name or "/" in name or name.endswith(".json"):
        raise ValueError(f"name a benchmark result by its stem, as in benchmark_result('gradcache'), got {name!r}")
    path = repository_root(start) / "benchmarks" / "results" / f"{name}.json"
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.json"))
        raise FileNotFoundError(f"no committed result {name!r}; the results are {known}")
    return json.loads(path.read_text(encoding="utf-8"))
