"""The site's generated parts: chapter times from the executed notebooks, the benchmarks page
from the committed results.

Nothing here is typed by hand, so nothing here goes stale:

* `notebook_seconds` reads the timestamps that ``jupyter nbconvert --execute`` records in every
  code cell's ``metadata.execution`` (``iopub.execute_input`` when the kernel received the
  cell, ``shell.execute_reply`` when it answered); a chapter's time is its last reply minus its
  first input, the run as ``make notebooks`` did it (kernel start-up not included);
* `chapter_times_table` turns those into the home page's table;
* `solutions_page` gathers the exercises' solution cells for the Solutions page (a chapter's page
  leaves those cells out, see ``remove_tag_config`` in mkdocs.yml);
* `benchmarks_page` renders every ``benchmarks/results/*.json``: the command and date of the
  run, the ``FIGURE`` lines it stores (read by `course_lib.tooling.figures`), and its numbers.

``docs/hooks.py`` calls the last three when mkdocs builds the site.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path

from course_lib.tooling.figures import Figure, parse_figure_line

# ---------------------------------------------------------------------------------------------
# Chapter times
# ---------------------------------------------------------------------------------------------
CHAPTERS = "[0-9][0-9]_*.ipynb"  # the chapters, as the Makefile finds them


def _timestamp(execution: dict, key: str, path: Path, index: int) -> datetime:
    """One of nbconvert's ISO timestamps (``2026-11-25T03:54:37.387107Z``) as an aware datetime."""
    try:
        return datetime.fromisoformat(execution[key].replace("Z", "+00:00"))
    except (KeyError, ValueError) as err:
        raise ValueError(f"{path}: cell {index} has no valid {key} timestamp in metadata.execution") from err


def notebook_seconds(path: str | Path) -> float:
    """Wall time of a notebook's recorded execution: its last cell's reply minus its first cell's input.

    Only code cells count, and empty ones are skipped (nbconvert does not run them).

    Raises:
        ValueError: if a code cell carries no ``metadata.execution``: the notebook was not
            executed, or cells were added after it was.
    """
    path = Path(path)
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    runs = []
    for index, cell in enumerate(cells):
        if cell["cell_type"] != "code" or not "".join(cell["source"]).strip():
            continue
        execution = cell.get("metadata", {}).get("execution")
        if not execution:
            raise ValueError(f"{path} carries no execution metadata (cell {index}): execute it with "
                             "`jupyter nbconvert --to notebook --execute --inplace` (or `make notebooks`)")
        runs.append((index, execution))
    if not runs:
        raise ValueError(f"{path} has no code cell, so no recorded execution to time")
    (first_index, first), (last_index, last) = runs[0], runs[-1]
    start = _timestamp(first, "iopub.execute_input", path, first_index)
    end = _timestamp(last, "shell.execute_reply", path, last_index)
    return (end - start).total_seconds()


def format_duration(seconds: float) -> str:
    """``92.4`` → ``"1 min 32 s"``; under a minute ``"45 s"``; from an hour ``"1 h 2 min 5 s"``."""
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes} min {secs} s"
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


def notebook_title(path: str | Path) -> str:
    """The text of the notebook's first markdown heading (``# 01 · LoRA`` → ``01 · LoRA``)."""
    path = Path(path)
    for cell in json.loads(path.read_text(encoding="utf-8"))["cells"]:
        if cell["cell_type"] == "markdown":
            for line in "".join(cell["source"]).splitlines():
                if line.startswith("#"):
                    return line.lstrip("#").strip().rstrip("#").strip()
    raise ValueError(f"{path} has no markdown heading to take its title from")


def chapter_times_table(notebook_dir: str | Path) -> str:
    """A markdown table of every chapter (linked to its page) and its measured time, with a total.

    Links are ``notebooks/<file>.ipynb``, relative to a page at the top of ``docs/`` (the home page).
    """
    notebooks = sorted(Path(notebook_dir).glob(CHAPTERS))
    if not notebooks:
        raise ValueError(f"no chapter notebooks ({CHAPTERS}) in {notebook_dir}")
    lines = ["| chapter | measured time on 2 CPU cores |", "|---|---|"]
    total = 0.0
    for path in notebooks:
        seconds = notebook_seconds(path)
        total += seconds
        lines.append(f"| [{_cell(notebook_title(path))}](notebooks/{path.name}) | {format_duration(seconds)} |")
    lines.append(f"| **total** | **{format_duration(total)}** |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# The benchmarks page
# ---------------------------------------------------------------------------------------------
RUN_KEYS = ("command", "date", "device", "threads", "seconds", "wall_seconds", "machine", "figures",
            "figures_recomputed")
"""Keys that describe the run rather than its results: they go in a section's header."""
MAX_LIST = 8  # a list of numbers up to this long is shown joined; longer ones (loss curves) are left out
TRANSPOSE_OVER = 12  # a table of records with more fields than this shows one column per record


def _cell(value) -> str:
    """A value as the text of a markdown table cell: numbers rounded, ``|`` escaped."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(_cell(v) for v in value)
    return str(value).replace("|", r"\|").replace("\n", " ")


def _table(header: list[str], rows: list[list]) -> list[str]:
    """Markdown lines of a table."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(_cell(v) for v in row) + " |" for row in rows)]


def _flatten(value, prefix: str = "") -> dict:
    """Scalars of a nested dict under dotted keys; short lists of scalars kept, other lists left out."""
    if isinstance(value, dict):
        flat = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    if isinstance(value, list):
        short = len(value) <= MAX_LIST and not any(isinstance(v, (dict, list)) for v in value)
        return {prefix: value} if short and value else {}
    return {prefix: value}


def _records(value) -> list[tuple[str | None, dict]] | None:
    """``value`` as (label, flat fields) records if it is a table: a list of dicts, or a dict of
    two or more dicts with the same keys; else None."""
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return [(None, _flatten(v)) for v in value]
    if (isinstance(value, dict) and len(value) >= 2 and all(isinstance(v, dict) for v in value.values())
            and len({tuple(v) for v in value.values()}) == 1):
        return [(str(k), _flatten(v)) for k, v in value.items()]
    return None


def _records_table(name: str, records: list[tuple[str | None, dict]]) -> list[str]:
    """One table for a list or dict of records: a row per record, or a column per record when
    the records have more fields than `TRANSPOSE_OVER`."""
    fields = list(dict.fromkeys(k for _, flat in records for k in flat))
    if len(fields) > TRANSPOSE_OVER:
        labels = [label if label is not None else _cell(flat.get(fields[0], i + 1))
                  for i, (label, flat) in enumerate(records)]
        if all(label is None for label, _ in records):
            fields = fields[1:]  # the first field became the column headers
        return _table(["", *labels], [[f"`{f}`", *(flat.get(f) for _, flat in records)] for f in fields])
    keyed = records[0][0] is not None
    header = ([name] if keyed else []) + fields
    return _table(header, [([label] if keyed else []) + [flat.get(f) for f in fields] for label, flat in records])


def _figures(data: dict, path: Path) -> list[Figure]:
    """The figures a results JSON stores under ``"figures"``, parsed.

    Raises:
        ValueError: if it stores none (a benchmark writes them; ``--figures-only`` adds them to an
            older JSON) or one is not a ``FIGURE`` line, naming the file.
    """
    if "figures" not in data:
        script, device = _script_and_device(path)
        raise ValueError(f"{path} stores no \"figures\": add them with `python -m benchmarks.{script}"
                         + (f" --device {device}" if device else "") + " --figures-only --save`")
    try:
        return [parse_figure_line(line) for line in data["figures"]]
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def _figure_cells(figure: Figure) -> list[str]:
    """A figure's name, value, target and verdict as table cells (numbers as read from the line)."""
    return [f"`{figure.name}`", str(figure.value), f"`{figure.op} {figure.target}`", figure.verdict]


def _figures_section(data: dict, path: Path) -> list[str]:
    """The figures of one run, as the JSON stores them."""
    figures = _figures(data, path)
    if not figures:
        return ["This run states no figures."]
    source = ("Figures, as the run printed them:" if "figures_recomputed" not in data else
              f"Figures, recomputed from this run's recorded measurements ({data['figures_recomputed']}):")
    return [source, "", *_table(["figure", "value", "target", "met?"], [_figure_cells(f) for f in figures])]


def benchmark_section(path: str | Path) -> str:
    """Markdown for one ``benchmarks/results/<name>.json``: the run, its figures, its numbers."""
    path = Path(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    script, device = _script_and_device(path)
    default_command = f"python -m benchmarks.{script}" + (f" --device {device}" if device else "")
    lines = [f"## {_run_name(path)}", "", "```bash", data.get("command", default_command), "```", ""]
    run = [f"run on {data['date']}" if "date" in data else "date not recorded"]
    if "device" in data:
        run.append(f"device {data['device']}")
    if "threads" in data:
        run.append(f"{data['threads']} threads")
    for key in ("seconds", "wall_seconds"):
        if isinstance(data.get(key), (int, float)):
            run.append(f"took {format_duration(data[key])}")
    run_line = " · ".join(run)
    lines += [run_line[0].upper() + run_line[1:] + ".", ""]
    if isinstance(data.get("machine"), dict):
        lines += ["Machine: " + " · ".join(f"{k} {_cell(v)}" for k, v in _flatten(data["machine"]).items()) + ".", ""]
    lines += [*_figures_section(data, path), "",
              f"Results: every value in the JSON except lists longer than {MAX_LIST} (loss curves, raw timings)."]
    scalars = {}
    tables = []
    for key, value in data.items():
        if key in RUN_KEYS:
            continue
        records = _records(value)
        if records:
            tables += ["", f"`{key}`:", "", *_records_table(key, records)]
        else:
            scalars.update(_flatten(value, key))
    if scalars:
        lines += ["", *_table(["result", "value"], [[f"`{k}`", v] for k, v in scalars.items()])]
    return "\n".join(lines + tables) + "\n"


def _script_and_device(path: Path) -> tuple[str, str]:
    """``<name>.json`` is a run of ``benchmarks/<name>.py``: (name, ""); ``<name>.<device>.json``
    (``quant_vs_bnb.cuda.json``) its run on that device, made with ``--device <device>``."""
    script, _, device = Path(path).stem.partition(".")
    return script, device


def _run_name(path: Path) -> str:
    script, device = _script_and_device(path)
    return f"`{script}.py`" + (f" on {device}" if device else "")


def benchmarks_page(results_dir: str | Path) -> str:
    """Markdown with a section per ``*.json`` in ``results_dir``, after a summary of all their figures."""
    paths = sorted(Path(results_dir).glob("*.json"))
    if not paths:
        raise ValueError(f"no benchmark results (*.json) in {results_dir}")
    return "\n".join([figures_summary(paths), *(benchmark_section(p) for p in paths)])


def figures_summary(paths: list[Path]) -> str:
    """One table of every recorded ``FIGURE`` line of the results at ``paths``, misses counted."""
    rows, met = [], 0
    for path in map(Path, paths):
        for figure in _figures(json.loads(path.read_text(encoding="utf-8")), path):
            met += figure.met
            rows.append([_run_name(path), *_figure_cells(figure)])
    if not rows:
        return ""
    scripts = {_script_and_device(p)[0] for p in paths}
    head = (f"## All figures\n\n{len(rows)} figures from {len(paths)} runs of {len(scripts)} scripts: {met} met their target, "
            f"{len(rows) - met} missed. A miss is reported, not hidden: some targets are the seed tutorials' "
            "claims (LoRA \"15-20x faster\" than full fine-tuning), which the measurement refutes.\n")
    return head + "\n" + "\n".join(_table(["script", "figure", "value", "target", "met?"], rows)) + "\n"


# ---------------------------------------------------------------------------------------------
# Solutions
# ---------------------------------------------------------------------------------------------
SOLUTION_TAG = "solution"   # the tag of an exercise's solution cell; a chapter's page on the site leaves it out
_EXERCISE_TITLE = re.compile(r"\*\*(Exercise [^*]+?)\.?\*\*")


def solution_cells(path: str | Path) -> list[tuple[str, str]]:
    """``(exercise title, code)`` for each solution cell of a chapter, in order.

    A solution cell is a code cell tagged ``solution`` or holding a ``# BEGIN SOLUTION`` marker; its
    title is the bold ``**Exercise N: ...**`` opening the nearest Markdown cell above it.
    """
    nb = json.loads(Path(path).read_text(encoding="utf-8"))
    title, found = "", []
    for cell in nb["cells"]:
        source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        if cell["cell_type"] == "markdown":
            match = _EXERCISE_TITLE.search(source)
            title = match.group(1) if match else title
        elif SOLUTION_TAG in cell.get("metadata", {}).get("tags", []) or "# BEGIN SOLUTION" in source:
            found.append((title or "Exercise", source))
    return found


def solutions_page(notebook_dir: str | Path) -> str:
    """Markdown of every chapter's exercise solutions, chapter by chapter."""
    lines: list[str] = []
    for path in sorted(Path(notebook_dir).glob(CHAPTERS)):
        cells = solution_cells(path)
        if not cells:
            continue
        lines += [f"## {notebook_title(path)}", ""]
        for title, code in cells:
            lines += [f"### {title}", "", "```python", code.rstrip(), "```", ""]
    return "\n".join(lines)
