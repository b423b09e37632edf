"""The site's generated parts: chapter times from the executed notebooks, the benchmarks page
from the committed results.

Nothing here is typed by hand, so nothing here goes stale:

* `notebook_seconds` reads the timestamps that ``jupyter nbconvert --execute`` records in every
  code cell's ``metadata.execution`` (``iopub.execute_input`` when the kernel received the
  cell, ``shell.execute_reply`` when it answered); a chapter's time is its last reply minus its
  first input, the run as ``make notebooks`` did it (kernel start-up not included);
* `chapter_times_table` turns those into the home page's table;
* `benchmarks_page` renders every ``benchmarks/results/*.json``: the command and date of the
  run, its ``FIGURE`` lines where the JSON records them, and its numbers.

``docs/hooks.py`` calls the last two when mkdocs builds the site.
"""

from __future__ import annotations

import ast
import json
import re
from datetime import datetime
from pathlib import Path

# ---------------------------------------------------------------------------------------------
# Chapter times
# ---------------------------------------------------------------------------------------------
CHAPTERS = "[0-9][0-9]_*.ipynb"  # the chapters, as the Makefile finds them (drafts/ is not one)


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
FIGURE_LINE = re.compile(r"^FIGURE (?P<name>\S+): (?P<value>\S+) \(target (?P<op><=|>=|<|>) (?P<target>\S+)\) "
                         r"(?P<verdict>met|missed)$")
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


def script_targets(script: str | Path) -> list[tuple[str, str]]:
    """(figure name, target) of every ``FIGURE`` line a benchmark script's source states.

    Read, not run: the arguments of each ``figure(name, value, op, target)`` call (an f-string
    name keeps its ``{placeholders}``, a computed target is shown as its expression), and
    ``print(f"FIGURE name: ... (target op value) ...")`` lines written out by hand.
    """
    found = []
    for node in ast.walk(ast.parse(Path(script).read_text(encoding="utf-8"))):
        if (isinstance(node, ast.Call) and len(node.args) == 4
                and (getattr(node.func, "id", None) == "figure" or getattr(node.func, "attr", None) == "figure")):
            name, _, op, target = node.args
            if isinstance(op, ast.Constant):
                found.append((node.lineno, _source_text(name), f"{op.value} {ast.unparse(target)}"))
        elif isinstance(node, ast.JoinedStr):
            match = re.match(r"FIGURE ([a-z0-9_]+): .*\(target (<=|>=|<|>) ([^)]+)\)", _source_text(node))
            if match:
                found.append((node.lineno, match[1], f"{match[2]} {match[3]}"))
    return [(name, target) for _, name, target in sorted(found)]


def _source_text(node: ast.expr) -> str:
    """A string literal's text; an f-string's with ``{expression}`` in place of each value."""
    if isinstance(node, ast.Constant):
        return str(node.value)
    if isinstance(node, ast.JoinedStr):
        return "".join(_source_text(v) if isinstance(v, ast.Constant) else "{" + ast.unparse(v.value) + "}"
                       for v in node.values)
    return ast.unparse(node)


def _figures_section(data: dict, path: Path, script: Path) -> list[str]:
    """The figures of one run: from the JSON where it records them, else the script's targets."""
    if "figures" in data:
        rows = []
        for line in data["figures"]:
            match = FIGURE_LINE.match(line)
            if not match:
                raise ValueError(f"{path}: not a FIGURE line: {line!r}")
            rows.append([f"`{match['name']}`", match["value"], f"`{match['op']} {match['target']}`",
                         match["verdict"]])
        source = ("Figures, as the run printed them:" if "figures_recomputed" not in data else
                  f"Figures, recomputed from this run's recorded measurements ({data['figures_recomputed']}):")
        return [source, "", *_table(["figure", "value", "target", "met?"], rows)]
    note = (f"This JSON does not record the `FIGURE` lines: `{script.name}` prints them after writing it, "
            "so their values come only from running it again (the command above, piped to `grep FIGURE`).")
    targets = script_targets(script) if script.exists() else []
    if not targets:
        return [note]
    return [note + " The targets, as the script's source states them now:", "",
            *_table(["figure", "target"], [[f"`{n}`", f"`{t}`"] for n, t in targets])]


def benchmark_section(path: str | Path) -> str:
    """Markdown for one ``benchmarks/results/<name>.json``: the run, its figures, its numbers."""
    path = Path(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    script = path.parent.parent / f"{path.stem}.py"
    lines = [f"## `{script.name}`", "", "```bash", data.get("command", f"python benchmarks/{script.name}"), "```", ""]
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
    lines += [*_figures_section(data, path, script), "",
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


def benchmarks_page(results_dir: str | Path) -> str:
    """Markdown with a section per ``*.json`` in ``results_dir`` (the scripts sit in its parent)."""
    paths = sorted(Path(results_dir).glob("*.json"))
    if not paths:
        raise ValueError(f"no benchmark results (*.json) in {results_dir}")
    return "\n".join([figures_summary(paths), *(benchmark_section(p) for p in paths)])


def figures_summary(paths: list[Path]) -> str:
    """One table of every recorded ``FIGURE`` line of the results at ``paths``, misses counted."""
    rows, met = [], 0
    for path in paths:
        for line in json.loads(Path(path).read_text(encoding="utf-8")).get("figures", []):
            match = FIGURE_LINE.match(line)
            if not match:
                raise ValueError(f"{path}: not a FIGURE line: {line!r}")
            met += match["verdict"] == "met"
            rows.append([f"`{Path(path).stem}.py`", f"`{match['name']}`", match["value"],
                         f"`{match['op']} {match['target']}`", match["verdict"]])
    if not rows:
        return ""
    head = (f"## All figures\n\n{len(rows)} figures from {len(paths)} scripts: {met} met their target, "
            f"{len(rows) - met} missed. A miss is reported, not hidden: some targets are the seed tutorials' "
            "claims (LoRA \"15-20x faster\" than full fine-tuning), which the measurement refutes.\n")
    return head + "\n" + "\n".join(_table(["script", "figure", "value", "target", "met?"], rows)) + "\n"
