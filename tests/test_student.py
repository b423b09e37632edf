"""Student copies and grading: `course-lib student` and `pytest --nbval-lax` on its copies.

The end-to-end test grades chapter 08 with ``pytest --nbval-lax``: the unsolved copy must fail at
exactly the exercise cells (the stubs and their checks) and the solved notebook must pass. The
two copies are the same cells up to the first solution, and those cells are the original's, which
``make test`` runs under the stricter ``--nbval`` anyway; so the graded notebook holds the
chapter's first code cell (its imports and parameters) and then what differs: the student copy
from its first solution on as written, and, after the kernel's names are put back as they were
before that cell, the original's cells from there on (see
`test_nbval_lax_fails_exactly_at_the_exercises_and_passes_when_solved`). Chapter 08's exercises
need nothing from the cells skipped (two multi-process runs, about 1.5 minutes): a check that did
would fail in the solved part, and the test with it. Every other chapter's copy is checked
without running it: only its solution regions differ from the original.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import nbformat
import pytest
from nbformat.corpus.words import generate_corpus_id

from course_lib import cli
from course_lib.tooling import student

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
GRADED = ROOT / "notebooks" / "08_beyond_one_device.ipynb"
CHECK_CALL = re.compile(r"\bcheck_\w+\(")


def _notebook(*cells) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    for kind, source in cells:
        cell = nbformat.v4.new_code_cell(source) if kind == "code" else nbformat.v4.new_markdown_cell(source)
        if kind == "code":
            cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="the answer\n")]
            cell.execution_count = 1
        nb.cells.append(cell)
    return nb


def test_a_region_becomes_one_stub_at_its_indentation():
    source = "def f(x):\n    # BEGIN SOLUTION\n    y = x + 1\n    return y\n    # END SOLUTION\n\nprint(f(1))"
    new, regions = student.strip_solutions(source)
    assert regions == 1
    assert new == f"def f(x):\n    {student.STUB}\n\nprint(f(1))"
    namespace = {}
    exec(new.replace("print(f(1))", ""), namespace)  # noqa: S102 (the stub must raise when called)
    with pytest.raises(NotImplementedError):
        namespace["f"](1)


def test_two_regions_and_untouched_code():
    source = "# BEGIN SOLUTION\na = 1\n# END SOLUTION\nb = 2\n  # BEGIN SOLUTION\n  c = 3\n  # END SOLUTION"
    new, regions = student.strip_solutions(source)
    assert regions == 2
    assert new.split("\n") == [student.STUB, "b = 2", "  " + student.STUB]
    assert student.strip_solutions("x = 1\ny = 2") == ("x = 1\ny = 2", 0)


@pytest.mark.parametrize("source,expected", [
    ("# BEGIN SOLUTION\nx = 1\n", "line 1 is never closed"),
    ("x = 1\n# END SOLUTION\n", "line 2 has no '# BEGIN SOLUTION'"),
    ("# BEGIN SOLUTION\n# BEGIN SOLUTION\n# END SOLUTION\n", "line 2 opens inside the region opened on line 1"),
])
def test_unpaired_markers_are_refused(source, expected):
    with pytest.raises(student.SolutionMarkerError, match=expected):
        student.strip_solutions(source, where="nb.ipynb, cell 3")


def test_student_notebook_clears_solution_outputs_keeps_checks_and_markdown():
    nb = _notebook(("markdown", "Write `f`; the solution sits between `# BEGIN SOLUTION` markers."),
                   ("code", "def f():\n    # BEGIN SOLUTION\n    return 42\n    # END SOLUTION"),
                   ("code", "assert f() == 42"),
                   ("code", "print('more check')"),
                   ("markdown", "next"),
                   ("code", "print('not an exercise')"))
    result = student.student_notebook(nb, name="t.ipynb")
    assert result.solution_cells == [1] and result.exercise_cells == [1, 2, 3] and result.regions == 1
    cells = result.notebook.cells
    assert cells[1].outputs == [] and cells[1].execution_count is None
    assert [c.source for c in cells[2:]] == [c.source for c in nb.cells[2:]]
    assert cells[2].outputs == nb.cells[2].outputs
    assert cells[0].source == nb.cells[0].source                       # markdown mentioning markers: kept
    assert "return 42" in nb.cells[1].source and nb.cells[1].outputs     # the original is unchanged


@pytest.mark.parametrize("path", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_each_chapter_has_two_to_four_exercises_with_checks(path):
    original = nbformat.read(path, as_version=4)
    result = student.student_notebook(original, name=path.name)
    assert 2 <= result.regions <= 4, f"{path.name}: {result.regions} exercises"
    for index in result.solution_cells:
        following, i = [], index + 1
        while i in result.exercise_cells and i not in result.solution_cells:
            following.append(i)
            i += 1
        assert following, f"{path.name}: the solution in cell {index} has no check cell after it"
        # an assert, or a build-it exercise's check (course_lib.tooling.exercises), which raises on a wrong answer
        assert any("assert" in original.cells[i].source or CHECK_CALL.search(original.cells[i].source)
                   for i in following), f"{path.name}: no assert or check_...() checks the solution in cell {index}"
    for index, (a, b) in enumerate(zip(original.cells, result.notebook.cells)):
        if index in result.solution_cells:
            assert "SOLUTION" not in b.source and student.STUB in b.source and b.outputs == []
        else:
            assert a == b, f"{path.name}: cell {index} changed although it holds no solution"


def test_cli_writes_copies_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["student", str(GRADED), str(out)]) == 0
    cells = nbformat.read(GRADED, as_version=4).cells
    solutions = [i for i, c in enumerate(cells) if c.cell_type == "code" and "# BEGIN SOLUTION" in c.source]
    names = [f"Cell {sum(c.cell_type == 'code' for c in cells[:i + k])}" for i in solutions for k in (0, 1)]
    assert f"{len(solutions)} solution(s) replaced by stubs; an unsolved copy fails at {', '.join(names)}" in capsys.readouterr().out
    assert (out / GRADED.name).exists()
    assert cli.main(["student", str(GRADED), str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main(["student", str(GRADED), str(out), "--overwrite"]) == 0


def test_cli_bad_input_names_the_file_and_the_cell(tmp_path, capsys):
    nb = nbformat.read(GRADED, as_version=4)
    result = student.student_notebook(nb)
    index = result.solution_cells[-1]
    nb.cells[index].source = "\n".join(line for line in nb.cells[index].source.split("\n")
                                       if "END SOLUTION" not in line)
    broken = tmp_path / "unclosed.ipynb"
    nbformat.write(nb, broken)
    assert cli.main(["student", str(broken), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(broken) in err and f"cell {index}" in err and "never closed" in err
    assert not (tmp_path / "out").exists()                               # nothing written

    text = tmp_path / "notes.txt"
    text.write_text("not a notebook")
    fake = tmp_path / "fake.ipynb"
    fake.write_text("not json {")
    for path in (text, fake, tmp_path / "missing.ipynb"):
        assert cli.main(["student", str(path), str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("course-lib: error: ") and str(path) in err and "Traceback" not in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["student", str(empty), str(tmp_path / "out")]) == 2
    assert "holds no .ipynb" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Overwriting: never through a link into the sources, never half-written
# ---------------------------------------------------------------------------------------------
def _sources(folder: Path) -> dict[str, bytes]:
    """Two small chapters with a solution each, written into ``folder``; their bytes by name."""
    folder.mkdir()
    for name, answer in (("01_a.ipynb", 1), ("02_b.ipynb", 2)):
        nb = _notebook(("markdown", "Write `f`."),
                       ("code", f"def f():\n    # BEGIN SOLUTION\n    return {answer}\n    # END SOLUTION"),
                       ("code", f"assert f() == {answer}"))
        nbformat.write(nb, folder / name)
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("link", ["cp -al (hard links)", "symlinks", "symlink to another chapter", "second only",
                                  "the source folder itself"])
def test_overwrite_refuses_targets_that_are_the_sources(tmp_path, capsys, link):
    """`cp -al notebooks out; course-lib student notebooks out --overwrite` must not strip the
    solutions out of notebooks/: refused before anything is written, with what to do."""
    src, out = tmp_path / "notebooks", tmp_path / "out"
    originals = _sources(src)
    if link == "the source folder itself":
        out = src
    elif link == "cp -al (hard links)":
        shutil.copytree(src, out, copy_function=os.link)
    else:
        out.mkdir()
        if link == "symlinks":
            for name in originals:
                (out / name).symlink_to(src / name)
        elif link == "symlink to another chapter":
            (out / "01_a.ipynb").symlink_to(src / "02_b.ipynb")
        else:  # the first copy is an ordinary old one, the second a hard link: nothing may be written
            (out / "01_a.ipynb").write_text("an old copy")
            os.link(src / "02_b.ipynb", out / "02_b.ipynb")
    before = _bytes(out)
    assert cli.main(["student", str(src), str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "same file" in err and "Traceback" not in err, err
    assert str(out) in err and "choose" in err
    assert _bytes(src) == originals                       # the solutions are still there
    assert _bytes(out) == before                          # and nothing was written
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_overwrite_replaces_a_copy_instead_of_writing_through_it(tmp_path):
    """The new copy is renamed into place: another name for the old copy (a hard link a teacher
    kept) still holds the old one."""
    src, out = tmp_path / "notebooks", tmp_path / "out"
    _sources(src)
    student.write_student_copies(src, out)
    kept = tmp_path / "kept.ipynb"
    os.link(out / "01_a.ipynb", kept)
    old = kept.read_bytes()
    nb = nbformat.read(src / "01_a.ipynb", as_version=4)
    nb.cells[0].source = "Write `f` (second edition)."
    nbformat.write(nb, src / "01_a.ipynb")
    student.write_student_copies(src, out, overwrite=True)
    assert "second edition" in (out / "01_a.ipynb").read_text()
    assert kept.read_bytes() == old
    assert sorted(p.name for p in out.iterdir()) == ["01_a.ipynb", "02_b.ipynb"]


def test_failed_write_leaves_the_old_copy_whole(tmp_path, monkeypatch):
    src, out = tmp_path / "notebooks", tmp_path / "out"
    _sources(src)
    student.write_student_copies(src, out)
    before = _bytes(out)

    def write_half_then_die(nb, fp, *args, **kwargs):
        Path(fp).write_text('{"cells": [')
        raise OSError("No space left on device")

    monkeypatch.setattr(nbformat, "write", write_half_then_die)
    with pytest.raises(OSError, match="No space left"):
        student.write_student_copies(src, out, overwrite=True)
    assert _bytes(out) == before
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def _nbval_lax(folder: Path) -> tuple[int, set[str], int]:
    """Run ``pytest --nbval-lax`` on ``folder``; (exit status, failed cell names, cells run)."""
    report = folder / "report.xml"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax",
                          "--nbval-current-env", f"--junitxml={report}", str(folder)],
                         cwd=ROOT, capture_output=True, text=True, check=False)
    cases = ET.parse(report).getroot().iter("testcase")
    failed, total = set(), 0
    for case in cases:
        total += 1
        if case.find("failure") is not None or case.find("error") is not None:
            failed.add(case.get("name"))
    return run.returncode, failed, total


@pytest.fixture
def grading_folder():
    # beside notebooks/, as a teacher's out/ folder would be: the chapters read ../benchmarks/results
    folder = Path(tempfile.mkdtemp(prefix=".grading-", dir=ROOT))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


SNAPSHOT = "_grading_globals_before_the_exercises"  # a name no chapter uses (checked below)


def _unsolved_then_solved(result: student.StudentCopy, original: nbformat.NotebookNode) -> tuple[
        nbformat.NotebookNode, list[int], int]:
    """One notebook that grades both copies from the first solution on: the chapter's first code
    cell (imports, parameters), one cell that keeps the kernel's names (``dict(globals())``), the
    student copy's cells from its first solution cell on as written; then a cell that puts the names
    back as they were kept (those added since removed, the rest rebound), then the original's cells
    from its first solution cell on. The cells before the first solution, other than the first code
    cell, are left out: they are the same in both copies and in the original. Returns the notebook,
    the indices in it of the student copy's exercise cells, and the index of the first original cell
    after the restore."""
    first = result.solution_cells[0]
    setup = next(i for i, cell in enumerate(original.cells) if cell.cell_type == "code")
    assert setup < first, "the first code cell holds a solution: grade the whole chapter instead"
    keep = nbformat.v4.new_code_cell(f"{SNAPSHOT} = dict(globals())")
    restore = nbformat.v4.new_code_cell(
        f"def _restore(names=globals(), kept={SNAPSHOT}):\n"
        "    for name in set(names) - set(kept):\n"
        "        del names[name]\n"
        "    names.update(kept)\n"
        "\n"
        "_restore()")
    solved = copy.deepcopy(original.cells[first:])
    for cell in solved:  # the student copy has the same cell ids; each must be unique
        cell.id = generate_corpus_id()
    nb = copy.deepcopy(result.notebook)
    nb.cells = [nb.cells[setup], keep, *nb.cells[first:], restore, *solved]
    shift = 2 - first                     # where the student copy's cell `first` now sits, minus `first`
    solved_from = len(result.notebook.cells) + shift + 1
    return nb, [i + shift for i in result.exercise_cells], solved_from


def test_nbval_lax_fails_exactly_at_the_exercises_and_passes_when_solved(grading_folder):
    """The cells before the first solution are the same in both copies and the original's (checked
    here; make test runs them under --nbval), so only the chapter's first code cell runs before the
    part that differs: the unsolved copy's cells as a student's would run, then the original's from
    its first solution on, after the names are put back as the first cell left them. nbval must
    report exactly the unsolved exercise cells failing, no other cell."""
    original = nbformat.read(GRADED, as_version=4)
    unsolved = grading_folder / "unsolved"
    (result,) = student.write_student_copies(GRADED, unsolved, overwrite=True).values()
    result.notebook = nbformat.read(unsolved / GRADED.name, as_version=4)   # the copy as written
    shutil.rmtree(unsolved)
    first = result.solution_cells[0]
    assert result.exercise_cells[0] == first
    assert result.notebook.cells[:first] == original.cells[:first]      # the shared part: the same cells
    assert all(SNAPSHOT not in cell.source and "_restore" not in cell.source for cell in original.cells)

    nb, unsolved_exercises, solved_from = _unsolved_then_solved(result, original)
    nbformat.write(nb, grading_folder / GRADED.name)
    graded = student.StudentCopy(notebook=nb)
    code_cells = sum(cell.cell_type == "code" for cell in nb.cells)
    expected = set(graded.nbval_names(unsolved_exercises))
    assert len(expected) == len(result.exercise_cells)
    assert all(student.STUB in nb.cells[i].source for i in unsolved_exercises if i - 2 + first in result.solution_cells)
    solved = set(graded.nbval_names([i for i in range(solved_from, len(nb.cells)) if nb.cells[i].cell_type == "code"]))
    assert len(solved) == sum(cell.cell_type == "code" for cell in original.cells[first:])

    status, failed, total = _nbval_lax(grading_folder)
    assert total == code_cells
    assert status == 1 and failed == expected, f"failed {sorted(failed)}, expected {sorted(expected)}"
    assert not failed & solved
