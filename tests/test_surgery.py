"""Model surgery: replacing a submodule by its dotted name, and refusing a wrong name cleanly."""

import pytest
import torch
from torch import nn

from course_lib.models import tiny_bert
from course_lib.surgery import parent_and_child, replace_module, short_list


def _net():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2)))


def test_top_level_name():
    model = nn.Module()
    model.head = nn.Linear(3, 2)
    parent, child = parent_and_child(model, "head")
    assert parent is model and child == "head"
    new = nn.Linear(3, 2)
    old = replace_module(model, "head", new)
    assert old is not new and model.head is new
    assert dict(model.named_parameters())["head.weight"] is new.weight  # registered as a submodule


def test_nested_name_in_a_real_model():
    model = tiny_bert()
    name = "encoder.layer.1.attention.self.query"
    parent, child = parent_and_child(model, name)
    assert parent is model.encoder.layer[1].attention.self and child == "query"
    query = model.get_submodule(name)
    wrapper = nn.Sequential(query)
    assert replace_module(model, name, wrapper) is query
    assert model.get_submodule(name) is wrapper
    ids = torch.randint(0, 128, (1, 5))
    model(input_ids=ids)  # the model still runs with the new module in place


def test_index_in_a_sequential():
    model = _net()
    new = nn.Linear(8, 2)
    old = replace_module(model, "2.1", new)
    assert isinstance(old, nn.Linear) and model[2][1] is new


@pytest.mark.parametrize("name", ["2.7", "missing", "0.weight", "1.inner", "", "2..1"])
def test_unknown_name_is_refused_and_the_model_is_unchanged(name):
    model = _net()
    before = [(n, id(m)) for n, m in model.named_modules()]
    with pytest.raises(ValueError, match="no submodule|dotted name"):
        replace_module(model, name, nn.Identity())
    assert [(n, id(m)) for n, m in model.named_modules()] == before


def test_replacement_must_be_a_module():
    model = _net()
    with pytest.raises(TypeError, match="must be an nn.Module"):
        replace_module(model, "0", torch.zeros(3))
    assert isinstance(model[0], nn.Linear)


def test_short_list():
    assert short_list(["a", "b"]) == "['a', 'b']"
    assert short_list([str(i) for i in range(10)], keep=2) == "['0', '1'] ... (10 in all)"
