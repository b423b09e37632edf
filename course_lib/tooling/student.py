"""Student copies of the chapters: the exercises' solutions taken out, their checks kept.

Every chapter ends with exercises. In the committed notebooks each exercise's solution sits in
a code cell between two marker lines::

    def fixed_bytes(parameters, trainable, weight_bytes, optimizer="adamw"):
        # BEGIN SOLUTION
        return parameters * weight_bytes + ...
        # END SOLUTION

and the code cell after it checks the result with ``assert`` calls into ``course_lib``.
:func:`write_student_copies` (the command ``course-lib student notebooks/ out/``) writes copies
in which every region, markers included, becomes one line
``raise NotImplementedError(...)`` at the marker's indentation, and the outputs of the cells
that held a solution are cleared. Everything else, the check cells included, is kept as it is.

Graded with ``pytest --nbval-lax out/``, an unsolved copy fails at the exercise cells (the
stubs raise, the checks find nothing to check) and nowhere else; a solved one passes.
``tests/test_student.py`` runs both.

Write the copies to a folder beside ``notebooks/`` (``out/`` at the top of the repository):
some chapters read ``../benchmarks/results/*.json``.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

from ..atomic_files import atomic_output

BEGIN = "# BEGIN SOLUTION"
END = "# END SOLUTION"
STUB = 'raise NotImplementedError("exercise: write your solution here (see the text above)")'


class SolutionMarkerError(ValueError):
    """A notebook's solution markers do not pair up, the path is not a notebook, or a copy would
    be written over a source (the output folder is the source folder, or holds links to it)."""


@dataclass
class StudentCopy:
    """What :func:`student_notebook` did to one notebook.

    Attributes:
        notebook: the student copy.
        solution_cells: indices (in ``notebook.cells``) of the code cells that held a solution.
        exercise_cells: ``solution_cells`` plus the code cells that follow each of them up to the
            next markdown cell (their checks): the cells where an unsolved copy fails.
        regions: how many solution regions were replaced.
    """

    notebook: nbformat.NotebookNode
    solution_cells: list[int] = field(default_factory=list)
    exercise_cells: list[int] = field(default_factory=list)
    regions: int = 0

    def nbval_names(self, indices: list[int]) -> list[str]:
        """nbval's names ("Cell <n>", counting code cells only) for the cells at ``indices``."""
        code = [i for i, cell in enumerate(self.notebook.cells) if cell.cell_type == "code"]
        return [f"Cell {code.index(i)}" for i in indices]


def _describe(name: str, index: int, cell) -> str:
    first = next((line.strip() for line in cell.source.splitlines() if line.strip()), "")
    return f"{name}, cell {index} (`{first[:60]}`)"


def strip_solutions(source: str, where: str = "this cell") -> tuple[str, int]:
    """Replace each ``# BEGIN SOLUTION`` ... ``# END SOLUTION`` region of ``source`` by a stub.

    Args:
        source: a code cell's text.
        where: how to name the cell in an error message.

    Returns:
        The new text and the number of regions replaced.

    Raises:
        SolutionMarkerError: a region is never closed, an end marker has no beginning, or a
            region opens inside another.
    """
    out: list[str] = []
    regions = 0
    open_line = None
    for number, line in enumerate(source.split("\n"), start=1):
        marker = line.strip()
        if marker.startswith(BEGIN):
            if open_line is not None:
                raise SolutionMarkerError(f"{where}: {BEGIN!r} on line {number} opens inside the region "
                                          f"opened on line {open_line}; close that one first with {END!r}")
            open_line = number
            out.append(line[: len(line) - len(line.lstrip())] + STUB)
        elif marker.startswith(END):
            if open_line is None:
                raise SolutionMarkerError(f"{where}: {END!r} on line {number} has no {BEGIN!r} before it")
            open_line = None
            regions += 1
        elif open_line is None:
            out.append(line)
    if open_line is not None:
        raise SolutionMarkerError(f"{where}: {BEGIN!r} on line {open_line} is never closed: "
                                  f"add a line {END!r} after the solution")
    return "\n".join(out), regions


def read_notebook(path: str | Path) -> nbformat.NotebookNode:
    """Read a notebook, or raise :class:`SolutionMarkerError` saying why ``path`` is not one."""
    path = Path(path)
    if path.suffix != ".ipynb":
        raise SolutionMarkerError(f"{path}: not a notebook (expected a .ipynb file or a folder of them)")
    if not path.is_file():
        raise SolutionMarkerError(f"{path}: no such notebook")
    try:
        return nbformat.read(path, as_version=4)
    except (json.JSONDecodeError, UnicodeDecodeError, nbformat.reader.NotJSONError) as error:
        raise SolutionMarkerError(f"{path}: not a notebook ({type(error).__name__}: the file is not notebook JSON)") \
            from None
    except Exception as error:  # noqa: BLE001 (nbformat's validation errors have no common base)
        raise SolutionMarkerError(f"{path}: not a valid notebook ({error})") from None


def student_notebook(notebook: nbformat.NotebookNode, name: str = "notebook") -> StudentCopy:
    """The student copy of ``notebook`` (which is left unchanged).

    Only code cells are read for markers (a markdown cell may mention them).

    Raises:
        SolutionMarkerError: naming ``name`` and the cell, when markers do not pair up.
    """
    result = StudentCopy(notebook=copy.deepcopy(notebook))
    cells = result.notebook.cells
    for index, cell in enumerate(cells):
        if cell.cell_type != "code":
            continue
        source, regions = strip_solutions(cell.source, where=_describe(name, index, cell))
        if regions:
            cell.source = source
            cell.outputs = []
            cell.execution_count = None
            result.solution_cells.append(index)
            result.regions += regions
    for index in result.solution_cells:
        following = index
        while following < len(cells) and cells[following].cell_type == "code":
            if following not in result.exercise_cells:
                result.exercise_cells.append(following)
            following += 1
    return result


def notebooks_in(source: str | Path) -> list[Path]:
    """The chapter notebooks named by ``source``: one .ipynb file, or the .ipynb files of a folder."""
    source = Path(source)
    if source.is_dir():
        found = sorted(p for p in source.glob("*.ipynb") if not p.name.startswith("."))
        if not found:
            raise SolutionMarkerError(f"{source}: the folder holds no .ipynb notebook")
        return found
    read_notebook(source)  # raises with the reason when it is not a notebook
    return [source]


def _same_file_as_a_source(target: Path, sources: list[Path]) -> Path | None:
    """The source that ``target`` is (a hard link, a symlink, the same path), or None."""
    if not target.exists():
        return None  # nothing there, or a dangling symlink: replaced by the copy, not written through
    return next((source for source in sources if os.path.samefile(target, source)), None)


def write_student_copies(source: str | Path, out: str | Path, overwrite: bool = False) -> dict[Path, StudentCopy]:
    """Write the student copy of each notebook in ``source`` (a notebook or a folder) into ``out``.

    Every notebook is read and checked before anything is written, so a bad marker leaves
    ``out`` untouched. So is every target: one that is the same file as a source (``out`` is the
    source folder, or holds hard links or symlinks to the sources, as ``cp -al notebooks out``
    makes) is refused, since writing it would erase the solutions. Each copy is written to a
    temporary file in ``out`` and renamed into place, so a failure leaves the old copy whole and
    a link elsewhere to an old copy keeps the old copy.

    Args:
        source: a ``.ipynb`` file or a folder of them (not searched recursively).
        out: the folder for the copies (created); same file names as the originals.
        overwrite: replace copies already in ``out`` (refused by default).

    Returns:
        For each written path, what was done to it.

    Raises:
        SolutionMarkerError: a path is not a notebook, its markers do not pair up, or a copy
            would be written over a source.
        FileExistsError: a copy exists and ``overwrite`` is false.
    """
    out = Path(out)
    sources = notebooks_in(source)
    copies = {}
    for path in sources:
        target = out / path.name
        if target.resolve() == path.resolve() and out.resolve() == path.parent.resolve():
            raise SolutionMarkerError(f"{path}: the output folder is the source folder (a copy there is the same "
                                      "file as its source); choose another one")
        original = _same_file_as_a_source(target, sources)
        if original is not None:
            raise SolutionMarkerError(f"{target} is the same file as the source {original} (a hard link or a "
                                      f"symlink, as `cp -al` makes): writing it would erase the solutions; choose "
                                      f"an output folder without links to the sources, or delete the links in {out}")
        copies[target] = student_notebook(read_notebook(path), name=str(path))
    existing = [str(t) for t in copies if t.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{len(existing)} of the copies already exist in {out} (the first: {existing[0]}): "
                              "choose an empty folder or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    for target, result in copies.items():
        with atomic_output(target, overwrite=overwrite) as tmp:  # renamed into place: never through a link
            nbformat.write(result.notebook, str(tmp))
    return copies
