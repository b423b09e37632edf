"""Chapter 01's build-it exercise: the LoRA forward pass and the merge, written by the learner.

The learner writes ``lora_forward(x, W0, b0, A, B, scaling)``, which returns
``W0 x + b0 + scaling · B A x`` for a batch ``x`` of shape ``n × k`` (so ``x @ W0.T + ...``), and
``lora_merge(W0, A, B, scaling)``, which returns the merged weight ``W0 + scaling · B A``.
:func:`check_lora` compares them with

* the seeds' 2×2 example worked by hand (output ``(5.25, 11.3)``, merged weight written out),
* plain tensor algebra on a seeded random layer with a bias and ``scaling = 4`` (so forgetting
  the scaling shows), and peft's own LoRA ``Linear`` on that layer, both run before the learner's
  code,
* the learner's two functions against each other: a plain linear layer with the merged weight
  must compute the same output as the forward pass, and merging must leave ``W0`` untouched.

While the learner's functions run, course_lib's LoRA layer and merge functions and peft's LoRA
``Linear`` raise `ShortcutError`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from course_lib import lora
from course_lib.tooling.exercises import close, forbidden

# The seeds' hand-worked example: W0 x = (5, 11), A x = 0.5, B A x = (0.25, 0.3).
HAND_W0 = [[1.0, 2.0], [3.0, 4.0]]
HAND_A = [[0.1, 0.2]]
HAND_B = [[0.5], [0.6]]
HAND_X = [[1.0, 2.0]]
HAND_Y = [[5.25, 11.3]]
HAND_MERGED = [[1.05, 2.10], [3.06, 4.12]]   # W0 + B A, with B A = [[0.05, 0.10], [0.06, 0.12]]


def _random_case(seed: int = 0):
    """A 6 -> 4 layer with a bias, rank 2, ``lora_alpha`` 8 (scaling 4), and a batch of 3 inputs."""
    g = torch.Generator().manual_seed(seed)
    n, k, d, r = 3, 6, 4, 2
    return (torch.randn(n, k, generator=g), torch.randn(d, k, generator=g), torch.randn(d, generator=g),
            torch.randn(r, k, generator=g), torch.randn(d, r, generator=g), 8 / r)


def _peft_reference(x, W0, b0, A, B, scaling):
    """Output and ΔW of peft's LoRA ``Linear`` holding these weights (``lora_alpha = scaling · r``)."""
    from peft import LoraConfig, get_peft_model

    r = A.shape[0]
    config = LoraConfig(r=r, lora_alpha=scaling * r, target_modules=["0"])
    with torch.random.fork_rng(devices=[]):   # its random initial weights leave the caller's stream alone
        layer = get_peft_model(nn.Sequential(nn.Linear(W0.shape[1], W0.shape[0])), config).base_model.model[0]
    with torch.no_grad():
        layer.base_layer.weight.copy_(W0)
        layer.base_layer.bias.copy_(b0)
        layer.lora_A["default"].weight.copy_(A)
        layer.lora_B["default"].weight.copy_(B)
        return layer(x), layer.get_delta_weight("default")


def _shortcuts() -> list[tuple[object, str]]:
    """course_lib's and peft's functions that already compute a LoRA forward or merge."""
    from peft.tuners.lora.layer import Linear as PeftLinear
    from peft.tuners.lora.layer import LoraLayer

    return [(lora.LoRALinear, "forward"), (lora.LoRALinear, "merge"), (lora.LoRALinear, "unmerge"),
            (lora.LoRALinear, "delta_weight"), (lora, "delta_weight"), (lora, "merge"),
            (lora, "merge_and_unload"), (PeftLinear, "forward"), (PeftLinear, "merge"),
            (PeftLinear, "unmerge"), (PeftLinear, "get_delta_weight"), (LoraLayer, "_mixed_batch_forward")]


def check_lora(lora_forward, lora_merge) -> None:
    """Check the learner's ``lora_forward(x, W0, b0, A, B, scaling)`` and ``lora_merge(W0, A, B, scaling)``.

    Raises ``AssertionError`` (saying what differs) on a wrong result, and `ShortcutError` if
    either function calls course_lib's or peft's LoRA layer or merge. Prints one line when all passes.
    """
    # expected values first, before any of the learner's code runs
    hand = [torch.tensor(v) for v in (HAND_X, HAND_W0, [0.0, 0.0], HAND_A, HAND_B)] + [1.0]
    x, W0, b0, A, B, scaling = case = _random_case()
    algebra_y = x @ W0.T + b0 + scaling * (x @ A.T) @ B.T
    algebra_w = W0 + scaling * B @ A
    peft_y, peft_delta = _peft_reference(*case)
    agree = torch.allclose(peft_y, algebra_y, atol=1e-5) and torch.allclose(W0 + peft_delta, algebra_w, atol=1e-6)
    if not agree:
        raise RuntimeError("the check's own references disagree (peft vs plain algebra): the installed peft "
                           "computes LoRA differently; report this, it is not your solution's fault")
    inputs = [t.clone() for t in case[:5]]

    hint = "write it with plain tensor operations (@, +, *)"
    with forbidden(*_shortcuts(), hint=hint):
        hand_y = lora_forward(*hand)
        hand_w = lora_merge(hand[1], hand[3], hand[4], 1.0)
        got_y = lora_forward(*case)
        got_w = lora_merge(W0, A, B, scaling)
        got_b = lora_forward(x[:1], W0, b0, A, B, scaling)

    close("lora_forward on the 2x2 worked example (x = (1, 2), scaling 1)", hand_y, torch.tensor(HAND_Y))
    close("lora_merge on the 2x2 worked example (scaling 1)", hand_w, torch.tensor(HAND_MERGED))
    for name, tensor, original in zip(["x", "W0", "b0", "A", "B"], case[:5], inputs):
        if not torch.equal(tensor, original):
            raise AssertionError(f"your functions changed their input {name} in place; return a new tensor "
                                 f"(e.g. W0 + ..., not W0 += ...)")
    close("lora_forward on a 6 -> 4 layer with bias, rank 2, scaling 4 (did you apply scaling and b0?)",
          got_y, algebra_y)
    close("lora_forward on a batch of one row", got_b, algebra_y[:1])
    close("lora_merge on a 6 -> 4 layer, rank 2, scaling 4 (expected W0 + scaling * B @ A, shape out x in)",
          got_w, algebra_w)
    close("a plain linear layer with your merged weight vs your lora_forward", F.linear(x, got_w, b0), got_y)
    print("lora_forward and lora_merge: correct (worked example, random layer, merge = forward)")
