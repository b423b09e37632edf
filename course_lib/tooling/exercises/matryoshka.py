"""Chapter 04's build-it exercise: the Matryoshka loss, written from tensors.

The learner writes ``matryoshka_loss(q, d, dims, weights, scale)``: for each nested dimension
``m`` (with its weight ``w``), cut queries and documents to their first ``m`` numbers, rescale
each prefix to unit length, score every query against every document (``scale`` × cosine), take
the in-batch-negatives cross-entropy (row ``i``'s right document is ``i``), and sum ``w`` × that
loss over the dimensions. :func:`check_matryoshka_loss` compares it with a hand-worked case whose
value is known in closed form, and with plain tensor algebra (an explicit log-sum-exp, in float64)
on seeded random batches, values and gradients, while ``course_lib``'s and
sentence-transformers' losses refuse to run.
"""

from __future__ import annotations

import math
import sys

import torch

from ... import gradcache, matryoshka, retrieval
from . import close, forbidden

_ST_LOSSES = "sentence_transformers.sentence_transformer.losses"
_HINT = ("cut each prefix with slicing, normalise it, build the scale * cosine matrix and take the "
         "cross-entropy yourself")


def expected_matryoshka_loss(q: torch.Tensor, d: torch.Tensor, dims, weights, scale: float) -> torch.Tensor:
    """The loss by plain algebra: ``Σ w_m · mean_i(logsumexp_j(s·cos_ij) - s·cos_ii)`` at each prefix."""
    total = torch.zeros((), dtype=torch.float64)
    for m, w in zip(dims, weights):
        qm, dm = q[:, :m].double(), d[:, :m].double()
        cos = (qm / qm.norm(dim=1, keepdim=True)) @ (dm / dm.norm(dim=1, keepdim=True)).T
        logits = scale * cos
        total = total + w * (logits.logsumexp(dim=1) - logits.diagonal()).mean()
    return total


def _targets():
    """(owner, attribute) of every function that already computes the loss (or its per-prefix part)."""
    targets = [(matryoshka.MatryoshkaLoss, "__call__"), (matryoshka.MatryoshkaLoss, "per_dim"),
               (matryoshka, "matryoshka_loss"), (matryoshka, "in_batch_negatives_loss"),
               (retrieval, "in_batch_negatives_loss"), (retrieval, "code_search_loss"),
               (gradcache, "contrastive_loss"), (gradcache, "in_batch_negatives_loss")]
    st = sys.modules.get(_ST_LOSSES)
    if st is not None:
        targets += [(st.MatryoshkaLoss, "forward"), (st.MultipleNegativesRankingLoss, "forward"),
                    (st.MultipleNegativesRankingLoss, "compute_loss_from_embeddings")]
    return targets


def _call(learner_fn, *args):
    """Call the learner with the shortcuts refused. sentence-transformers takes seconds to import,
    so it is not imported here: if the learner's call imported it, the call is repeated with its
    losses refused too."""
    st_loaded = _ST_LOSSES in sys.modules
    with forbidden(*_targets(), hint=_HINT):
        got = learner_fn(*args)
    if not st_loaded and _ST_LOSSES in sys.modules:
        with forbidden(*_targets(), hint=_HINT):
            got = learner_fn(*args)
    if not isinstance(got, torch.Tensor):
        # an AssertionError, not a TypeError: a failed check, as the grader reports it
        raise AssertionError(f"matryoshka_loss should return a torch tensor, got {type(got).__name__}")  # noqa: TRY004
    return got


def check_matryoshka_loss(learner_fn) -> None:
    """Check ``learner_fn(q, d, dims, weights, scale) -> scalar tensor`` against independent values."""
    # 1. Hand-worked: q = (1, 0), (-1, 0); d = (1, 1), (-1, 1). At m = 1 the unit prefixes are
    #    ±1, cosines [[1, -1], [-1, 1]], so each row's loss is log(1 + e^(-2s)); at m = 2 the
    #    cosines are ±1/√2 and each row's loss is log(1 + e^(-√2 s)).
    q = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    d = torch.tensor([[1.0, 1.0], [-1.0, 1.0]])
    s = 1.0
    hand = 3.0 * math.log1p(math.exp(-2 * s)) + 0.5 * math.log1p(math.exp(-math.sqrt(2) * s))
    got = _call(learner_fn, q, d, (1, 2), (3.0, 0.5), s)
    close("hand-worked 2 x 2 case (dims (1, 2), weights (3, 0.5), scale 1)", got.detach(), torch.tensor(hand),
          atol=1e-5, rtol=1e-5)

    # 2. Seeded random batches (not unit length: each prefix must be normalised), values and
    #    gradients, with the weights in the order of their dimensions.
    g = torch.Generator().manual_seed(4)
    q0, d0 = torch.randn(6, 16, generator=g), torch.randn(6, 16, generator=g)
    for dims, weights, scale in [((4, 8, 16), (1.0, 1.0, 1.0), 20.0), ((4, 8, 16), (0.5, 1.0, 2.0), 5.0),
                                 ((16, 4, 8), (2.0, 0.5, 1.0), 5.0)]:
        case = f"dims {dims}, weights {weights}, scale {scale}"
        q_ref, d_ref = q0.double().requires_grad_(), d0.double().requires_grad_()
        expected = expected_matryoshka_loss(q_ref, d_ref, dims, weights, scale)
        grad_q, grad_d = torch.autograd.grad(expected, (q_ref, d_ref))
        q, d = q0.clone().requires_grad_(), d0.clone().requires_grad_()
        got = _call(learner_fn, q, d, dims, weights, scale)
        close(f"loss ({case})", got.detach(), expected.detach().float(), atol=1e-4, rtol=1e-5)
        if not got.requires_grad:
            raise AssertionError(f"the loss ({case}) does not depend on q and d through autograd: "
                                 "compute it with torch operations only (no .item(), .detach(), numpy)")
        got.backward()
        close(f"gradient with respect to q ({case})", q.grad, grad_q.float(), atol=1e-5, rtol=1e-4)
        close(f"gradient with respect to d ({case})", d.grad, grad_d.float(), atol=1e-5, rtol=1e-4)
    print("matryoshka_loss: the hand-worked case and 3 random batches (values and gradients) agree")
