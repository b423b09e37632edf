"""Chapter 07's build-it exercise check (`course_lib.tooling.exercises.ia3`): a correct IA³ layer
passes; one that calls peft's IA³ layer or the course's `make_method` is caught as a shortcut; a
plausible mistake fails with an AssertionError that is not a shortcut; the shortcuts work again
afterwards."""

import pytest
import torch
from torch import nn

from course_lib import models, peft_methods
from course_lib.tooling.exercises import ShortcutError, ia3

# peft's get_peft_model asks transformers a deprecated question (not the course's code)
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


def reference(x, W, b, l, feedforward):
    if feedforward:
        out = (x * l) @ W.T
        return out if b is None else out + b
    out = x @ W.T
    return l * (out if b is None else out + b)


def test_a_correct_solution_passes(capsys):
    ia3.check_ia3_linear(reference)
    assert "agrees" in capsys.readouterr().out


def test_the_hand_worked_case_is_right():
    """The comment's arithmetic, redone here with nn.Linear (no IA³ code involved)."""
    lin = nn.Linear(2, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor(ia3.HAND_W))
        lin.bias.copy_(torch.tensor(ia3.HAND_B))
        x, l = torch.tensor(ia3.HAND_X), torch.tensor(ia3.HAND_L)
        assert torch.equal(l * lin(x), torch.tensor(ia3.HAND_EXPECTED[False]))
        assert torch.equal(lin(l * x), torch.tensor(ia3.HAND_EXPECTED[True]))


def _peft_layer(W, b, l, feedforward):
    """peft's IA3 Linear around an nn.Linear holding W and b, with l as its vector (what a learner
    taking the shortcut would build)."""
    from peft import IA3Config
    from peft.tuners.ia3.layer import Linear

    base = nn.Linear(W.shape[1], W.shape[0], bias=b is not None, dtype=W.dtype)
    with torch.no_grad():
        base.weight.copy_(W)
        if b is not None:
            base.bias.copy_(b)
        layer = Linear(base, "default", IA3Config(), is_feedforward=feedforward)
        layer.ia3_l["default"].copy_(l.reshape(layer.ia3_l["default"].shape))
    return layer


def _peft_shortcut(x, W, b, l, feedforward):
    with torch.no_grad():
        return _peft_layer(W, b, l, feedforward)(x)


def _peft_merge_shortcut(x, W, b, l, feedforward):
    layer = _peft_layer(W, b, l, feedforward)
    with torch.no_grad():
        layer.merge()
        return layer.base_layer(x)


def _course_lib_shortcut(x, W, b, l, feedforward):
    model = peft_methods.make_method(models.tiny_llama(), "ia3")   # then copy W, b, l in and run one layer...
    return model.get_base_model().model.layers[0].mlp.down_proj(x)


@pytest.mark.parametrize("shortcut", [_peft_shortcut, _peft_merge_shortcut, _course_lib_shortcut])
def test_shortcuts_are_caught(shortcut):
    with pytest.raises(ShortcutError):
        ia3.check_ia3_linear(shortcut)


def test_the_peft_shortcut_is_right_outside_the_check():
    """So the ShortcutError above is about the call, not a wrong answer; and the patches are undone."""
    from peft.tuners.ia3.layer import Linear

    forward, merge = Linear.forward, Linear.merge
    with pytest.raises(ShortcutError):
        ia3.check_ia3_linear(_peft_shortcut)
    assert Linear.forward is forward and Linear.merge is merge
    g = torch.Generator().manual_seed(1)
    x, W, b = torch.randn(4, 3, generator=g), torch.randn(5, 3, generator=g), torch.randn(5, generator=g)
    for feedforward, l in ((False, torch.rand(5, generator=g)), (True, torch.rand(3, generator=g))):
        assert torch.allclose(_peft_shortcut(x, W, b, l, feedforward), reference(x, W, b, l, feedforward), atol=1e-6)
        assert torch.allclose(_peft_merge_shortcut(x, W, b, l, feedforward), reference(x, W, b, l, feedforward), atol=1e-6)
    adapted = peft_methods.make_method(models.tiny_llama(), "ia3")
    assert any("ia3_l" in name for name, p in adapted.named_parameters() if p.requires_grad)


def _bias_not_scaled(x, W, b, l, feedforward):
    if feedforward:
        return reference(x, W, b, l, feedforward)
    return l * (x @ W.T) + (0 if b is None else b)


def _always_scales_the_output(x, W, b, l, feedforward):
    return reference(x, W, b, l, False) if l.shape[0] == W.shape[0] else reference(x, W, b, torch.ones(W.shape[0]), False)


def _forgets_the_bias(x, W, b, l, feedforward):
    return reference(x, W, None, l, feedforward)


@pytest.mark.parametrize("wrong", [_bias_not_scaled, _always_scales_the_output, _forgets_the_bias])
def test_plausible_mistakes_fail_without_being_called_shortcuts(wrong):
    with pytest.raises(AssertionError) as caught:
        ia3.check_ia3_linear(wrong)
    assert not isinstance(caught.value, ShortcutError)


def test_the_bias_mistake_gets_a_hint():
    with pytest.raises(AssertionError, match="bias should be scaled"):
        ia3.check_ia3_linear(_bias_not_scaled)


def test_changing_an_input_in_place_is_refused():
    def in_place(x, W, b, l, feedforward):
        return x.mul_(l) @ W.T + (0 if b is None else b) if feedforward else reference(x, W, b, l, feedforward)

    with pytest.raises(AssertionError, match="in place"):
        ia3.check_ia3_linear(in_place)
