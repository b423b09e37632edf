"""The notebooks are committed executed, paired with their jupytext sources, and nbval really compares
their outputs."""

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import jupytext
import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook, new_output

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
SANITIZE = ROOT / "notebooks" / "sanitize.cfg"
IGNORE_TAG = "nbval-ignore-output"


def test_there_are_chapters():
    assert NOTEBOOKS, "no notebooks/NN_*.ipynb found"


def _cells(nb) -> list[tuple[str, str, list[str]]]:
    """What the pairing must keep equal: each cell's type, source and tags (outputs live in the .ipynb only)."""
    return [(c.cell_type, c.source, list(c.metadata.get("tags", []))) for c in nb.cells]


def pair_differences(ipynb: Path, source: Path) -> list[str]:
    """Where the executed notebook and its percent-format source disagree (empty when in sync)."""
    if not source.exists():
        return [f"{source.name} is missing: run `jupytext --sync {ipynb.name}` in notebooks/"]
    a, b = _cells(nbformat.read(ipynb, as_version=4)), _cells(jupytext.read(source))
    problems = [f"{ipynb.name} has {len(a)} cells, {source.name} has {len(b)}"] if len(a) != len(b) else []
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            what = "type" if x[0] != y[0] else "source" if x[1] != y[1] else "tags"
            problems.append(f"cell {i} ({x[1][:40]!r}...): the {what} differs")
    return problems


def test_jupytext_configuration_pairs_every_chapter():
    for path in NOTEBOOKS:  # the configuration jupytext (and JupyterLab) finds for each chapter pairs it
        formats = jupytext.config.load_jupytext_config(str(path)).formats
        assert [set(f.split(",")) for f in formats] == [{"ipynb", "py:percent"}], formats
    sources = sorted(p.with_suffix(".ipynb") for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.py"))
    assert sources == NOTEBOOKS, "every chapter is a pair NN_topic.py + NN_topic.ipynb"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_chapter_matches_its_jupytext_source(path):
    problems = pair_differences(path, path.with_suffix(".py"))
    assert not problems, ("edit the .py or the .ipynb, then `jupytext --sync` it (or save it in JupyterLab):\n"
                          + "\n".join(problems))


def test_pair_check_sees_a_drifted_pair(tmp_path):
    """The check above can fail: an edited source line, a dropped tag, a removed cell are all reported."""
    ipynb = NOTEBOOKS[0]
    nb = jupytext.read(ipynb.with_suffix(".py"))
    code = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code")
    tagged = next(i for i, c in enumerate(nbformat.read(ipynb, as_version=4).cells) if c.metadata.get("tags"))
    for change, expected in (("source", "the source differs"), ("tags", "the tags differs"),
                             ("cell", "cells")):
        drifted = copy.deepcopy(nb)
        if change == "source":
            drifted.cells[code].source += "\nx = 1"
        elif change == "tags":
            drifted.cells[tagged].metadata["tags"] = []
        else:
            del drifted.cells[-1]
        source = tmp_path / f"{change}.py"
        jupytext.write(drifted, source, fmt="py:percent")
        assert pair_differences(ipynb, source) and expected in "\n".join(pair_differences(ipynb, source))
    assert pair_differences(ipynb, tmp_path / "absent.py")[0].startswith("absent.py is missing")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_chapter_is_committed_executed_with_claims(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code" and c.source.strip()]
    assert all(c.execution_count is not None for c in code), "commit the notebook executed"
    counts = [c.execution_count for c in code]
    assert counts == list(range(1, len(code) + 1)), "execute top to bottom in one fresh kernel"
    assert not [o for c in code for o in c.outputs if o.output_type == "error"], "an error output"
    assert sum("assert " in c.source for c in code) >= 2, "claims belong in assert cells"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# "), "title first"
    assert any("image/png" in o.get("data", {}) for c in code for o in c.outputs), "a chapter shows a plot"
    # Only cells that legitimately vary may opt out of the comparison.
    ignored = [c for c in code if IGNORE_TAG in c.metadata.get("tags", [])]
    assert not [c for c in ignored if "assert " in c.source], "an ignored cell hides its asserts' output"
    assert len(ignored) <= len(code) // 2


# What a published chapter must not show: a machine's own paths, warnings on stderr, progress-bar
# widgets (a saved notebook keeps only their text fallback, frozen at "0%"), widget state (the site
# would fetch the widget renderer from a CDN), and words of the course's own machinery.
ABSOLUTE_PATH = re.compile(r"(?<![\w.])(/(home|root|usr|tmp|work|opt|var|Users)/|[A-Za-z]:\\\\|site-packages)")
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
JARGON = re.compile(r"nbval|FIGURE lines?|`FIGURE`|\bthe issue\b|issue's", re.IGNORECASE)


def hygiene_problems(nb) -> list[str]:
    """Every output or prose problem of one notebook, as 'cell N: what'."""
    problems = ["metadata: widget state saved"] if "widgets" in nb.metadata else []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "markdown":
            problems += [f"cell {i}: project jargon in prose: {m.group(0)!r}" for m in JARGON.finditer(cell.source)]
            continue
        for output in cell.get("outputs", []):
            text = output.get("text", "") + "".join(str(v) for v in output.get("data", {}).values())
            text += "".join(output.get("traceback", []))
            if output.output_type == "stream" and output.name == "stderr":
                problems.append(f"cell {i}: stderr output: {output.text[:120]!r}")
            if WIDGET_VIEW in output.get("data", {}):
                problems.append(f"cell {i}: a widget (saved text: {output.data.get('text/plain', '')[:60]!r})")
            if re.search(r"\b0%\|", text):
                problems.append(f"cell {i}: a progress bar frozen at 0%")
            if match := ABSOLUTE_PATH.search(text):
                problems.append(f"cell {i}: an absolute path in an output: {text[max(0, match.start() - 20):match.end() + 40]!r}")
    return problems


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_chapter_outputs_are_clean(path):
    problems = hygiene_problems(nbformat.read(path, as_version=4))
    assert not problems, f"{path.name}:\n" + "\n".join(problems)


def test_hygiene_scan_sees_each_problem():
    nb = new_notebook(cells=[nbformat.v4.new_markdown_cell("# T\nThe issue's target is met (not compared by nbval).")])
    nb.metadata["widgets"] = {}
    cell = new_code_cell("x", outputs=[
        new_output("stream", name="stderr", text="/work/main/.venv/lib/python3.11/site-packages/x.py:1: UserWarning: w"),
        new_output("display_data", data={WIDGET_VIEW: {}, "text/plain": "Loading weights:   0%|          | 0/103"}),
        new_output("stream", name="stdout", text="saved to /home/ann/course/out.safetensors"),
    ])
    nb.cells.append(cell)
    problems = "\n".join(hygiene_problems(nb))
    for expected in ("widget state", "jargon", "stderr", "a widget", "0%", "absolute path"):
        assert expected in problems, (expected, problems)
    clean = new_notebook(cells=[new_code_cell("x", outputs=[new_output("stream", name="stdout",
                                                                       text="SmolLM2 LoRA: 2/6 3/6 5/6 6/6\n50% of 2 GiB\n")])])
    assert hygiene_problems(clean) == []


def _toy_notebook(path: Path) -> None:
    """A two-cell notebook computing a number with course_lib, committed with its true output."""
    nb = new_notebook()
    first = new_code_cell("import torch\nfrom course_lib.retrieval import relevant_ranks\n"
                          "ranks = relevant_ranks(torch.eye(3), torch.eye(3), [0, 1, 2])\n"
                          "print(ranks.tolist(), ranks.float().mean().item())", execution_count=1)
    first.outputs = [new_output("stream", name="stdout", text="[1, 1, 1] 1.0\n")]
    timing = new_code_cell("import time\nprint(time.time())", execution_count=2)
    timing.metadata["tags"] = [IGNORE_TAG]
    timing.outputs = [new_output("stream", name="stdout", text="1700000000.0\n")]
    nb.cells = [first, timing]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


def _nbval(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval", "--nbval-current-env",
         "--nbval-sanitize-with", str(SANITIZE), str(path)],
        capture_output=True, text=True, timeout=300, cwd=path.parent, check=False)


def test_nbval_fails_when_a_committed_number_changes(tmp_path):
    good = tmp_path / "good.ipynb"
    _toy_notebook(good)
    result = _nbval(good)
    assert result.returncode == 0, result.stdout[-3000:]  # true outputs, a varying timing ignored

    bad = tmp_path / "bad.ipynb"
    nb = json.loads(good.read_text())
    changed = copy.deepcopy(nb)
    changed["cells"][0]["outputs"][0]["text"] = "[1, 1, 1] 1.5\n"  # one number edited
    bad.write_text(json.dumps(changed))
    result = _nbval(bad)
    assert result.returncode == 1, result.stdout[-3000:]
    assert "1.5" in result.stdout and "1 failed" in result.stdout


def test_chapter_sources_and_package_pass_ruff():
    """ruff lints the chapters' jupytext sources like the package (pyproject.toml's [tool.ruff])."""
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "notebooks", "course_lib", "tests",
                             "benchmarks"], capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-1000:]
    checked = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--show-files", "notebooks"],
                             capture_output=True, text=True, cwd=ROOT, timeout=120, check=False).stdout
    assert all(p.with_suffix(".py").name in checked for p in NOTEBOOKS), "the chapter sources are linted"
