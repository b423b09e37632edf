"""course_lib.tooling.source shows the code that runs; course_lib.tooling.exercises.forbidden refuses
shortcuts and puts everything back."""

import inspect

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
