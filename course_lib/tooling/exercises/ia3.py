"""Chapter 07's build-it exercise: an IA³ linear layer, written by hand.

IA³ learns one vector ``l`` per adapted layer and multiplies an activation by it. On attention
keys and values it scales the layer's *output*, bias included: ``l ⊙ (W x + b)``; on the
feed-forward down projection it scales the layer's *input*: ``W (l ⊙ x) + b``. That is what
peft's ``peft.tuners.ia3.layer.Linear.forward`` computes (``is_feedforward`` picks the case; its
``merge`` scales the bias only in the output case, the same thing).

`check_ia3_linear` works its expected values out three ways before the learner's function runs:
plain tensor algebra, a 2×2 case worked by hand, and peft's own IA³ layer on the same weights.
"""

from __future__ import annotations

import torch
from torch import nn

from . import close, forbidden

# The hand-worked case: W = [[1, 2], [3, 4]], b = [1, -1], x = [1, 1], l = [2, 0.5].
#   output scaled:  W x + b = [1+2+1, 3+4-1] = [4, 6];          l ⊙ that = [8, 3]
#   input scaled:   l ⊙ x = [2, 0.5];  W (l ⊙ x) = [2+1, 6+2] = [3, 8];  + b = [4, 7]
HAND_W = [[1.0, 2.0], [3.0, 4.0]]
HAND_B = [1.0, -1.0]
HAND_X = [[1.0, 1.0]]
HAND_L = [2.0, 0.5]
HAND_EXPECTED = {False: [[8.0, 3.0]], True: [[4.0, 7.0]]}


def _by_algebra(x, W, b, l, feedforward):
    """The definition, written out: the same sums as the learner's, but as an independent reference."""
    if feedforward:
        out = torch.einsum("...i,oi->...o", x * l, W)
        return out if b is None else out + b
    out = torch.einsum("...i,oi->...o", x, W)
    return l * (out if b is None else out + b)


@torch.no_grad()
def _by_peft(x, W, b, l, feedforward):
    """peft's IA³ ``Linear`` wrapped around an ``nn.Linear`` holding ``W`` and ``b``, its vector set to ``l``."""
    from peft import IA3Config
    from peft.tuners.ia3.layer import Linear

    base = nn.Linear(W.shape[1], W.shape[0], bias=b is not None, dtype=W.dtype)
    base.weight.copy_(W)
    if b is not None:
        base.bias.copy_(b)
    layer = Linear(base, "default", IA3Config(), is_feedforward=feedforward)
    layer.ia3_l["default"].copy_(l.reshape(layer.ia3_l["default"].shape))
    return layer(x)


def _cases():
    """(name, x, W, b, l, feedforward): the hand-worked 2×2 ones, then seeded random ones."""
    cases = []
    for feedforward in (False, True):
        cases.append((f"the hand-worked 2x2 case, feedforward={feedforward}", torch.tensor(HAND_X),
                      torch.tensor(HAND_W), torch.tensor(HAND_B), torch.tensor(HAND_L), feedforward))
    g = torch.Generator().manual_seed(7)
    d_in, d_out = 6, 5
    for feedforward in (False, True):
        for with_bias in (True, False):
            x = torch.randn(2, 3, d_in, generator=g, dtype=torch.float64)     # (batch, tokens, features)
            W = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
            b = torch.randn(d_out, generator=g, dtype=torch.float64) if with_bias else None
            l = 1 + 0.5 * torch.randn(d_in if feedforward else d_out, generator=g, dtype=torch.float64)
            name = f"random x of shape (2, 3, {d_in}), feedforward={feedforward}, {'with a bias' if with_bias else 'b=None'}"
            cases.append((name, x, W, b, l, feedforward))
    return cases


def check_ia3_linear(ia3_linear) -> None:
    """Check ``ia3_linear(x, W, b, l, feedforward)`` against algebra, a hand-worked case and peft.

    ``x``: ``(..., in_features)``; ``W``: ``(out_features, in_features)``; ``b``: ``(out_features,)``
    or None; ``l``: ``(out_features,)`` when ``feedforward`` is False (the output, bias included, is
    scaled), ``(in_features,)`` when it is True (the input is scaled). Inside the check peft's IA³
    layer and the course's ``make_method`` raise `ShortcutError`.
    """
    import peft
    from peft.tuners.ia3.layer import Linear

    from course_lib import peft_methods

    cases = _cases()
    expected = []
    for name, x, W, b, l, feedforward in cases:           # every expected value before the learner runs
        algebra = _by_algebra(x, W, b, l, feedforward)
        library = _by_peft(x, W, b, l, feedforward)
        close(f"the check's own references ({name})", algebra, library, atol=1e-9, rtol=1e-9)
        if name.startswith("the hand-worked"):
            close(f"the check's own references ({name})", algebra, torch.tensor(HAND_EXPECTED[feedforward]))
        expected.append(algebra)

    hint = "multiply by l and use the weight matrix yourself"
    for (name, x, W, b, l, feedforward), want in zip(cases, expected, strict=True):
        inputs = [t if t is None else t.clone() for t in (x, W, b, l)]
        with forbidden((Linear, "forward"), (Linear, "merge"), (peft, "get_peft_model"),
                       (peft_methods, "make_method"), hint=hint):
            got = ia3_linear(*inputs, feedforward)
        if not isinstance(got, torch.Tensor):
            raise AssertionError(f"ia3_linear should return a tensor, got {type(got).__name__}")  # noqa: TRY004 (a wrong answer)
        for before, after, what in zip((x, W, b, l), inputs, "xWbl", strict=True):
            if before is not None and not torch.equal(before, after):
                raise AssertionError(f"ia3_linear changed its input {what} in place: compute a new tensor instead")
        if name.startswith("the hand-worked") and got.shape == want.shape and not torch.allclose(got.double(), want.double()):
            other = _by_algebra(x, W, b, l, not feedforward)
            if torch.allclose(got.double(), other.double()):
                raise AssertionError(f"{name}: your result is the other case's (feedforward={not feedforward}); "
                                     "feedforward=True scales the input x, feedforward=False the output")
            if not feedforward and torch.allclose(got.double(), (l * (x @ W.T) + b).double()):
                raise AssertionError(f"{name}: the bias should be scaled too, l ⊙ (W x + b), as peft's layer does")
        close(f"ia3_linear on {name}", got, want, atol=1e-6, rtol=1e-6)
    print(f"ia3_linear agrees with the algebra, the hand-worked 2x2 case and peft's IA3 layer on {len(cases)} cases")
