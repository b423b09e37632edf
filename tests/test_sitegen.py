"""The site's generated parts (course_lib.tooling.sitegen, docs/hooks.py): chapter times and the benchmarks page."""

import importlib.util
import json
from pathlib import Path

import nbformat
import pytest

from course_lib.tooling import sitegen
from course_lib.tooling.figures import format_figure, parse_figure_line

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
RESULTS = sorted((ROOT / "benchmarks" / "results").glob("*.json"))


def heading(path: Path) -> str:
    """The benchmarks page's heading for a results JSON: ``<name>.<device>.json`` is <name>.py's run on that device."""
    script, _, device = path.stem.partition(".")
    return f"## `{script}.py`" + (f" on {device}" if device else "")


def write_notebook(path: Path, title: str, timestamps: list[tuple[str, str]] | None) -> Path:
    """A chapter-like notebook: a heading, then one code cell per (execute_input, execute_reply),
    with an empty code cell in the middle (nbconvert leaves those without metadata);
    ``timestamps=None`` gives two code cells that were never executed."""
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_markdown_cell(f"# {title}\n\nWhat the chapter teaches."))
    for i, (start, reply) in enumerate(timestamps or [(None, None)] * 2):
        cell = nbformat.v4.new_code_cell(f"x = {i}")
        if start is not None:
            cell.metadata["execution"] = {"iopub.execute_input": start, "iopub.status.busy": start,
                                          "iopub.status.idle": reply, "shell.execute_reply": reply}
        nb.cells.append(cell)
        if i == 0:
            nb.cells.append(nbformat.v4.new_code_cell(""))
    path.write_text(nbformat.writes(nb), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# notebook_seconds and the chapter table
# ---------------------------------------------------------------------------------------------
def test_notebook_seconds_is_last_reply_minus_first_input(tmp_path):
    path = write_notebook(tmp_path / "00_x.ipynb", "00 · X", [
        ("2026-01-02T10:00:00.250000Z", "2026-01-02T10:00:01.500000Z"),
        ("2026-01-02T10:00:30.000000Z", "2026-01-02T10:00:31.000000Z"),
        ("2026-01-02T10:01:00.000000Z", "2026-01-02T10:01:32.750000Z"),
    ])
    # 10:01:32.75 - 10:00:00.25 = 1 min 32.5 s
    assert sitegen.notebook_seconds(path) == pytest.approx(92.5)


def test_a_notebook_that_was_not_executed_is_refused(tmp_path):
    path = write_notebook(tmp_path / "03_unrun.ipynb", "03 · Unrun", None)
    with pytest.raises(ValueError, match=r"03_unrun\.ipynb carries no execution metadata"):
        sitegen.notebook_seconds(path)


def test_a_cell_added_after_the_run_is_refused(tmp_path):
    path = write_notebook(tmp_path / "04_edited.ipynb", "04 · Edited", [
        ("2026-01-02T10:00:00Z", "2026-01-02T10:00:01Z")])
    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("y = 1"))
    nbformat.write(nb, path)
    with pytest.raises(ValueError, match=r"04_edited\.ipynb carries no execution metadata"):
        sitegen.notebook_seconds(path)


@pytest.mark.parametrize("seconds, text", [(0.4, "0 s"), (45, "45 s"), (92.4, "1 min 32 s"), (60, "1 min 0 s"),
                                           (3725, "1 h 2 min 5 s")])
def test_format_duration(seconds, text):
    assert sitegen.format_duration(seconds) == text


def test_the_chapters_are_00_to_08():
    assert [p.name[:2] for p in CHAPTERS] == [f"{i:02d}" for i in range(9)]


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_every_committed_chapter_carries_its_execution_time(path):
    seconds = sitegen.notebook_seconds(path)
    assert 0 < seconds < 600


def test_the_table_lists_every_chapter_in_order_with_a_total(tmp_path):
    stamps = {"00_a": ("10:00:00Z", "10:01:05Z"), "01_b": ("11:00:00Z", "11:00:40Z"), "02_c": ("12:00:00Z", "12:03:00Z")}
    for stem, (start, reply) in reversed(stamps.items()):  # written out of order on purpose
        write_notebook(tmp_path / f"{stem}.ipynb", f"{stem[:2]} · Chapter {stem[-1]}",
                       [(f"2026-01-02T{start}", f"2026-01-02T{reply}")])
    write_notebook(tmp_path / "scratch.ipynb", "not a chapter", [("2026-01-02T10:00:00Z", "2026-01-02T10:00:01Z")])
    lines = sitegen.chapter_times_table(tmp_path).splitlines()
    assert lines[:2] == ["| chapter | measured time on 2 CPU cores |", "|---|---|"]
    assert lines[2:] == ["| [00 · Chapter a](notebooks/00_a.ipynb) | 1 min 5 s |",
                         "| [01 · Chapter b](notebooks/01_b.ipynb) | 40 s |",
                         "| [02 · Chapter c](notebooks/02_c.ipynb) | 3 min 0 s |",
                         "| **total** | **4 min 45 s** |"]


def test_the_table_of_the_committed_chapters():
    table = sitegen.chapter_times_table(ROOT / "notebooks")
    positions = [table.index(f"](notebooks/{p.name})") for p in CHAPTERS]
    assert positions == sorted(positions)
    for path in CHAPTERS:
        assert f"[{sitegen.notebook_title(path)}](notebooks/{path.name})" in table
    assert table.splitlines()[-1].startswith("| **total** | **")


# ---------------------------------------------------------------------------------------------
# The benchmarks page
# ---------------------------------------------------------------------------------------------
def test_the_benchmarks_page_names_every_results_json():
    page = sitegen.benchmarks_page(ROOT / "benchmarks" / "results")
    assert RESULTS
    for path in RESULTS:
        data = json.loads(path.read_text())
        assert heading(path) in page
        assert data["command"] in page and str(data["date"]) in page


def test_recorded_figures_become_a_table(tmp_path):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "speed.json").write_text(json.dumps({
        "command": "python -m benchmarks.speed --fast", "date": "2026-01-02", "device": "cpu", "threads": 2,
        "figures": ["FIGURE a_over_b: 0.991 (target <= 1.05) met", "FIGURE c_over_d: 0.251 (target >= 1.0) missed"],
        "ratio": 0.99123, "runs": [{"method": "ours", "seconds": 1.5}, {"method": "theirs", "seconds": 2.0}],
        "losses": list(range(20)),
    }))
    page = sitegen.benchmarks_page(tmp_path / "results")
    assert "python -m benchmarks.speed --fast" in page and "Run on 2026-01-02 · device cpu · 2 threads." in page
    assert "| `a_over_b` | 0.991 | `<= 1.05` | met |" in page
    assert "| `c_over_d` | 0.251 | `>= 1.0` | missed |" in page
    assert "| `ratio` | 0.9912 |" in page
    assert "| method | seconds |" in page and "| theirs | 2 |" in page
    assert "losses" not in page  # a loss curve is left out


def test_a_result_without_figures_is_refused_with_the_command_that_adds_them(tmp_path):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "train.json").write_text(json.dumps({"command": "python -m benchmarks.train",
                                                                 "date": "2026-01-02", "gain": 0.1}))
    with pytest.raises(ValueError, match=r"train\.json stores no \"figures\": add them with "
                                         r"`python -m benchmarks\.train --figures-only --save`"):
        sitegen.benchmarks_page(tmp_path / "results")


def test_the_page_shows_figures_as_format_figure_writes_them(tmp_path):
    (tmp_path / "results").mkdir()
    lines = [format_figure("tiny_gap", 3.2e-07, "<=", 1e-05), format_figure("ratio", 1.0034, "<=", 1.02, ".3f"),
             format_figure("speedup", 96.31, ">=", 5, ".1f")]
    (tmp_path / "results" / "probe.json").write_text(json.dumps({"command": "c", "date": "d", "figures": lines}))
    page = sitegen.benchmarks_page(tmp_path / "results")
    assert "| `tiny_gap` | 3.2e-07 | `<= 1e-05` | met |" in page
    assert "| `ratio` | 1.003 | `<= 1.02` | met |" in page
    assert "| `speedup` | 96.3 | `>= 5` | met |" in page
    assert "3 figures from 1 runs of 1 scripts: 3 met their target, 0 missed." in page


def test_a_result_with_no_figure_says_so(tmp_path):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "quiet.json").write_text(json.dumps({"command": "c", "date": "d", "figures": []}))
    assert "This run states no figures." in sitegen.benchmarks_page(tmp_path / "results")


def test_a_malformed_figure_line_is_refused(tmp_path):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "bad.json").write_text(json.dumps({"date": "2026-01-02", "figures": ["FIGURE x: 1"]}))
    with pytest.raises(ValueError, match=r"bad\.json: not a FIGURE line: 'FIGURE x: 1'"):
        sitegen.benchmarks_page(tmp_path / "results")


# ---------------------------------------------------------------------------------------------
# The mkdocs hook
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hooks():
    spec = importlib.util.spec_from_file_location("course_site_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_hook_fills_both_placeholders(hooks, tmp_path):
    (tmp_path / "notebooks").mkdir()
    write_notebook(tmp_path / "notebooks" / "00_only.ipynb", "00 · Only",
                   [("2026-01-02T10:00:00Z", "2026-01-02T10:00:07Z")])
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "results" / "probe.json").write_text(json.dumps(
        {"command": "python -m benchmarks.probe", "date": "2026-01-02", "figures": []}))
    (tmp_path / "mkdocs.yml").write_text("site_name: probe\n")
    config = {"config_file_path": str(tmp_path / "mkdocs.yml")}

    page = "# Home\n\n<!-- course:chapter-times -->\n\nText.\n\n<!-- course:benchmarks -->\n"
    out = hooks.on_page_markdown(page, page=None, config=config, files=None)
    assert "<!-- course:" not in out
    assert "| [00 · Only](notebooks/00_only.ipynb) | 7 s |" in out
    assert "## `probe.py`" in out
    assert out.startswith("# Home\n\n| chapter |") and "\nText.\n" in out

    plain = "# Another page\n\nNo placeholder.\n"
    assert hooks.on_page_markdown(plain, page=None, config=config, files=None) == plain


def test_the_hook_on_the_repository(hooks):
    config = {"config_file_path": str(ROOT / "mkdocs.yml")}
    out = hooks.on_page_markdown("<!-- course:benchmarks -->", page=None, config=config, files=None)
    assert all(heading(p) in out for p in RESULTS)


def test_a_run_on_another_device_is_its_script_s_run(tmp_path):
    (tmp_path / "results").mkdir()
    for name, line in (("speed", "FIGURE a_cpu: 1 (target <= 2) met"), ("speed.cuda", "FIGURE a_cuda: 3 (target <= 2) missed")):
        (tmp_path / "results" / f"{name}.json").write_text(json.dumps({"command": "c", "date": "d", "figures": [line]}))
    page = sitegen.benchmarks_page(tmp_path / "results")
    assert "2 figures from 2 runs of 1 scripts: 1 met their target, 1 missed." in page
    assert "## `speed.py`\n" in page and "## `speed.py` on cuda\n" in page
    assert "| `speed.py` on cuda | `a_cuda` | 3 | `<= 2` | missed |" in page


def test_the_summary_counts_every_recorded_figure(tmp_path):
    (tmp_path / "results").mkdir()
    for name, lines in {"a": ["FIGURE x: 1 (target <= 2) met", "FIGURE y: 3 (target <= 2) missed"],
                        "b": ["FIGURE z: 0.5 (target > 0) met"]}.items():
        (tmp_path / "results" / f"{name}.json").write_text(json.dumps({"command": "c", "date": "d", "figures": lines}))
    page = sitegen.benchmarks_page(tmp_path / "results")
    assert "3 figures from 2 runs of 2 scripts: 2 met their target, 1 missed." in page
    assert "| `a.py` | `y` | 3 | `<= 2` | missed |" in page
    committed = sitegen.benchmarks_page(ROOT / "benchmarks" / "results")
    figures = [parse_figure_line(line) for path in RESULTS for line in json.loads(path.read_text())["figures"]]
    met = sum(f.met for f in figures)
    scripts = {path.stem.partition(".")[0] for path in RESULTS}
    assert (f"{len(figures)} figures from {len(RESULTS)} runs of {len(scripts)} scripts: {met} met their target, "
            f"{len(figures) - met} missed.") in committed


# ---------------------------------------------------------------------------------------------
# Solutions page, local MathJax
# ---------------------------------------------------------------------------------------------
def test_the_solutions_page_takes_each_solution_cell_under_its_exercise(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("# 03 · Probe"),
        nbformat.v4.new_markdown_cell("## Exercises\n\n**Exercise 1: a step by hand.** Write `step`."),
        nbformat.v4.new_code_cell("def step():\n    # BEGIN SOLUTION\n    return 1\n    # END SOLUTION"),
        nbformat.v4.new_code_cell("assert step() == 1"),
        nbformat.v4.new_markdown_cell("**Exercise 2.** A tagged cell."),
        nbformat.v4.new_code_cell("answer = 2", metadata={"tags": ["solution"]}),
        nbformat.v4.new_markdown_cell("**Exercise 3 (open).** No code."),
    ])
    nbformat.write(nb, tmp_path / "03_probe.ipynb")
    assert sitegen.solution_cells(tmp_path / "03_probe.ipynb") == [
        ("Exercise 1: a step by hand", "def step():\n    # BEGIN SOLUTION\n    return 1\n    # END SOLUTION"),
        ("Exercise 2", "answer = 2")]
    page = sitegen.solutions_page(tmp_path)
    assert page.startswith("## 03 · Probe\n\n### Exercise 1: a step by hand\n\n```python\ndef step():")
    assert "### Exercise 2\n\n```python\nanswer = 2\n```" in page and "Exercise 3" not in page


def test_every_committed_solution_cell_is_tagged_so_the_site_hides_it():
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        untagged = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and "# BEGIN SOLUTION" in c.source
                    and sitegen.SOLUTION_TAG not in c.metadata.get("tags", [])]
        assert not untagged, f"{path.name}: solution cells {untagged} lack the tag {sitegen.SOLUTION_TAG!r}"


def test_markdown_pages_with_formulas_get_the_local_mathjax(hooks):
    class Page:
        url = "solutions/"

    out = hooks.on_post_page('<p><span class="arithmatex">\\(x\\)</span></p></body>', Page(), {})
    assert '<script src="../assets/mathjax/MathJax.js?config=TeX-AMS-MML_HTMLorMML-full,Safe"></script>' in out
    assert hooks.on_post_page("<p>no formula</p></body>", Page(), {}) == "<p>no formula</p></body>"


def test_the_build_copies_mathjax_into_the_site(hooks, tmp_path):
    hooks.on_post_build({"site_dir": str(tmp_path)})
    assert (tmp_path / "assets" / "mathjax" / "MathJax.js").is_file()
    assert (tmp_path / "assets" / "mathjax" / "config" / "TeX-AMS-MML_HTMLorMML-full.js").is_file()
