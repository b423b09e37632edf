"""Chapter 01's build-it exercise check: a correct solution passes, shortcuts and mistakes are caught."""

import pytest
import torch
from torch import nn

from course_lib import lora
from course_lib.tooling.exercises import ShortcutError
from course_lib.tooling.exercises.lora import HAND_MERGED, HAND_Y, check_lora


def reference_forward(x, W0, b0, A, B, scaling):
    return x @ W0.T + b0 + scaling * (x @ A.T) @ B.T


def reference_merge(W0, A, B, scaling):
    return W0 + scaling * B @ A


def _layer(W0, b0, A, B, scaling):
    """A course_lib LoRALinear holding these weights (lora_alpha = scaling · r)."""
    r = A.shape[0]
    base = nn.Linear(W0.shape[1], W0.shape[0])
    layer = lora.LoRALinear(base, r=r, lora_alpha=scaling * r)
    with torch.no_grad():
        base.weight.copy_(W0)
        base.bias.copy_(b0)
        layer.lora_A["default"].weight.copy_(A)
        layer.lora_B["default"].weight.copy_(B)
    return layer


def test_reference_solution_passes(capsys):
    check_lora(reference_forward, reference_merge)
    assert "correct" in capsys.readouterr().out


def test_hand_worked_values_are_what_loralinear_computes():
    # the check's literal numbers have their own reason (worked by hand); LoRALinear agrees with them
    layer = _layer(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.zeros(2), torch.tensor([[0.1, 0.2]]),
                   torch.tensor([[0.5], [0.6]]), 1.0)
    assert torch.allclose(layer(torch.tensor([[1.0, 2.0]])), torch.tensor(HAND_Y))
    lora.LoRALinear.merge(layer)
    assert torch.allclose(layer.base_layer.weight, torch.tensor(HAND_MERGED))


def test_shortcut_through_course_lib_is_caught():
    def forward(x, W0, b0, A, B, scaling):
        return _layer(W0, b0, A, B, scaling)(x)

    with pytest.raises(ShortcutError, match="LoRALinear.forward"):
        check_lora(forward, reference_merge)

    def merge(W0, A, B, scaling):
        layer = _layer(W0, torch.zeros(W0.shape[0]), A, B, scaling)
        layer.merge()
        return layer.base_layer.weight.detach().clone()

    with pytest.raises(ShortcutError):
        check_lora(reference_forward, merge)

    def merge_by_delta(W0, A, B, scaling):
        return W0 + lora.delta_weight(_layer(W0, torch.zeros(W0.shape[0]), A, B, scaling), "default")

    with pytest.raises(ShortcutError):
        check_lora(reference_forward, merge_by_delta)


def test_shortcut_through_peft_is_caught():
    from peft import LoraConfig, get_peft_model

    def peft_layer(W0, b0, A, B, scaling):
        r = A.shape[0]
        config = LoraConfig(r=r, lora_alpha=scaling * r, target_modules=["0"])
        layer = get_peft_model(nn.Sequential(nn.Linear(W0.shape[1], W0.shape[0])), config).base_model.model[0]
        with torch.no_grad():
            layer.base_layer.weight.copy_(W0)
            layer.base_layer.bias.copy_(b0)
            layer.lora_A["default"].weight.copy_(A)
            layer.lora_B["default"].weight.copy_(B)
        return layer

    def forward(x, W0, b0, A, B, scaling):
        return peft_layer(W0, b0, A, B, scaling)(x).detach()

    with pytest.raises(ShortcutError, match="forward"):
        check_lora(forward, reference_merge)

    def merge(W0, A, B, scaling):
        return W0 + peft_layer(W0, torch.zeros(W0.shape[0]), A, B, scaling).get_delta_weight("default")

    with pytest.raises(ShortcutError, match="get_delta_weight"):
        check_lora(reference_forward, merge)


@pytest.mark.parametrize("mistake", ["no scaling", "no bias", "merge without scaling", "merge in place"])
def test_plausible_mistakes_fail_with_an_assertion(mistake):
    forward, merge = reference_forward, reference_merge
    if mistake == "no scaling":
        def forward(x, W0, b0, A, B, scaling):
            return x @ W0.T + b0 + (x @ A.T) @ B.T
    elif mistake == "no bias":
        def forward(x, W0, b0, A, B, scaling):
            return x @ W0.T + scaling * (x @ A.T) @ B.T
    elif mistake == "merge without scaling":
        def merge(W0, A, B, scaling):
            return W0 + B @ A
    else:
        def merge(W0, A, B, scaling):
            W0 += scaling * B @ A
            return W0
    with pytest.raises(AssertionError) as info:
        check_lora(forward, merge)
    assert not isinstance(info.value, ShortcutError)


def test_forbidden_functions_work_again_after_the_check():
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.layer import Linear as PeftLinear

    originals = {(owner, name): owner.__dict__[name] for owner, name in [
        (lora.LoRALinear, "forward"), (lora.LoRALinear, "merge"), (lora, "delta_weight"), (lora, "merge"),
        (PeftLinear, "forward"), (PeftLinear, "get_delta_weight")]}
    check_lora(reference_forward, reference_merge)
    with pytest.raises(ShortcutError):
        check_lora(lambda x, W0, b0, A, B, s: _layer(W0, b0, A, B, s)(x), reference_merge)
    assert all(owner.__dict__[name] is original for (owner, name), original in originals.items())
    layer = _layer(torch.eye(2), torch.zeros(2), torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0], [1.0]]), 2.0)
    x = torch.tensor([[1.0, 1.0]])
    assert torch.allclose(layer(x), torch.tensor([[1.0, 3.0]]))      # W0 x + 2 · B A x = (1, 1) + (0, 2)
    lora.merge(layer)
    assert layer.merged_adapters == ["default"]
    theirs = get_peft_model(nn.Sequential(nn.Linear(2, 2)), LoraConfig(r=1, target_modules=["0"])).base_model.model[0]
    assert theirs(x).shape == (1, 2) and theirs.get_delta_weight("default").shape == (2, 2)
