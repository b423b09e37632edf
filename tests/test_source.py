"""course_lib.tooling.source shows the code that runs; course_lib.tooling.exercises.forbidden refuses
shortcuts and puts everything back."""

import ast
import importlib
import inspect
from pathlib import Path

import nbformat
import pytest
import torch
from torch import nn

from course_lib import lora
from course_lib.tooling import exercises, source


def test_source_is_the_installed_code_dedented():
    text = source.source(lora.LoRALinear.forward)
    assert text.startswith("def forward(self")
    assert text == inspect.getsource(lora.LoRALinear.forward).replace("\n    ", "\n")[4:].rstrip()


def test_source_of_several_objects_and_bad_input():
    text = source.source(lora.delta_weight, lora.merge)
    assert text.index("def delta_weight") < text.index("def merge") and "\n\n" in text
    with pytest.raises(ValueError, match="at least one"):
        source.source()
    with pytest.raises(TypeError, match="cannot show the source of 3"):
        source.source(3)


def test_show_displays_a_python_block(monkeypatch):
    shown = []
    monkeypatch.setattr(source, "display", shown.append)
    source.show(lora.delta_weight)
    assert shown[0].data.startswith("```python\ndef delta_weight") and shown[0].data.endswith("\n```")


def test_forbidden_refuses_then_restores():
    layer = lora.LoRALinear(nn.Linear(3, 2), r=1, lora_alpha=1)
    x = torch.randn(3)
    before = layer(x)
    with exercises.forbidden((lora.LoRALinear, "forward"), (lora, "merge"), (torch.nn.functional, "linear"),
                             hint="use matrix products"):
        with pytest.raises(exercises.ShortcutError, match="LoRALinear.forward .use matrix products"):
            layer(x)
        with pytest.raises(exercises.ShortcutError, match="merge"):
            lora.merge(nn.Sequential(layer))
        with pytest.raises(exercises.ShortcutError):
            torch.nn.functional.linear(x, torch.eye(3))
    assert torch.equal(layer(x), before)
    assert "forward" in lora.LoRALinear.__dict__ and torch.nn.functional.linear(x, torch.eye(3)).shape == (3,)


def test_forbidden_restores_after_an_error_and_on_an_inherited_method():
    class Child(lora.LoRALinear):
        pass

    with pytest.raises(RuntimeError), exercises.forbidden((Child, "forward")):
        raise RuntimeError("the learner's code failed")
    assert "forward" not in Child.__dict__          # inherited again, not copied onto the subclass
    assert Child.forward is lora.LoRALinear.forward


def test_close_explains_a_mismatch():
    exercises.close("y", torch.tensor([1.0, 2.0]), [1.0, 2.0 + 1e-7])
    with pytest.raises(AssertionError, match="shape"):
        exercises.close("y", torch.zeros(2), torch.zeros(3))
    with pytest.raises(AssertionError, match="largest difference 0.5"):
        exercises.close("y", torch.tensor([1.0, 2.5]), [1.0, 2.0])


CHAPTERS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def _resolve(node: ast.expr):
    """``matryoshka.TwoStageIndex.search`` -> the object, looked up in ``course_lib.matryoshka``."""
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    assert isinstance(node, ast.Name), f"show() is given {ast.unparse(node)!r}: name course_lib objects directly"
    obj = importlib.import_module(f"course_lib.{node.id}")
    for name in reversed(names):
        obj = getattr(obj, name)
    return obj


def _show_calls(cell) -> list[ast.Call]:
    """The ``show(...)`` calls in a code cell (not ``plt.show()``)."""
    if cell.cell_type != "code":
        return []
    return [n for n in ast.walk(ast.parse(cell.source))
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "show"]


def shown_code_drift(path: Path) -> list[str]:
    """Cells whose committed ``show(...)`` output differs from what ``course_lib`` holds now."""
    problems = []
    for i, cell in enumerate(nbformat.read(path, as_version=4).cells):
        calls = _show_calls(cell)
        if not calls:
            continue
        committed = [o["data"]["text/markdown"] for o in cell.outputs if "text/markdown" in o.get("data", {})]
        expected = ["```python\n" + source.source(*map(_resolve, c.args)) + "\n```" for c in calls]
        if not all(text in committed for text in expected):
            problems.append(f"{path.name} cell {i}: the shown code is not course_lib's current source")
    return problems


def test_shown_code_in_committed_chapters_is_current():
    """A change to a shown function must re-execute the chapter that shows it; nbval would fail
    much later (after every chapter ran), this check fails in a second."""
    assert any(_show_calls(c) for p in CHAPTERS for c in nbformat.read(p, as_version=4).cells)
    problems = [p for path in CHAPTERS for p in shown_code_drift(path)]
    assert not problems, "re-execute these chapters:\n" + "\n".join(problems)


def test_shown_code_check_sees_a_stale_output(tmp_path):
    path = next(p for p in CHAPTERS if any(_show_calls(c) for c in nbformat.read(p, as_version=4).cells))
    nb = nbformat.read(path, as_version=4)
    cell = next(c for c in nb.cells if _show_calls(c))
    output = next(o for o in cell.outputs if "text/markdown" in o.get("data", {}))
    output["data"]["text/markdown"] = output["data"]["text/markdown"].replace("\n", "\n    # old\n", 1)
    nbformat.write(nb, tmp_path / path.name)
    assert shown_code_drift(tmp_path / path.name) == [
        f"{path.name} cell {nb.cells.index(cell)}: the shown code is not course_lib's current source"]
