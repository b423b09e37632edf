"""Chapter 04's build-it exercise check: a correct solution passes, shortcuts and mistakes are caught."""

import math

import pytest
import torch
import torch.nn.functional as F

from course_lib import gradcache, matryoshka, retrieval
from course_lib.tooling.exercises import ShortcutError
from course_lib.tooling.exercises.matryoshka import check_matryoshka_loss, expected_matryoshka_loss


def reference_loss(q, d, dims, weights, scale):
    total = 0.0
    for m, w in zip(dims, weights):
        logits = scale * F.normalize(q[:, :m], dim=-1) @ F.normalize(d[:, :m], dim=-1).T
        total = total + w * F.cross_entropy(logits, torch.arange(len(q)))
    return total


def test_reference_solution_passes(capsys):
    check_matryoshka_loss(reference_loss)
    assert "agree" in capsys.readouterr().out


def test_expected_values_agree_with_course_lib_and_the_hand_worked_formula():
    # the check's plain-algebra values are what MatryoshkaLoss computes ...
    g = torch.Generator().manual_seed(0)
    q, d = torch.randn(6, 16, generator=g), torch.randn(6, 16, generator=g)
    ours = matryoshka.MatryoshkaLoss(gradcache.contrastive_loss(scale=5.0), (16, 4, 8), (2.0, 0.5, 1.0))(q, d)
    assert expected_matryoshka_loss(q, d, (16, 4, 8), (2.0, 0.5, 1.0), 5.0).item() == pytest.approx(ours.item(), rel=1e-6)
    # ... and the hand-worked case's closed form
    q, d = torch.tensor([[1.0, 0.0], [-1.0, 0.0]]), torch.tensor([[1.0, 1.0], [-1.0, 1.0]])
    hand = 3 * math.log1p(math.exp(-2)) + 0.5 * math.log1p(math.exp(-math.sqrt(2)))
    assert expected_matryoshka_loss(q, d, (1, 2), (3.0, 0.5), 1.0).item() == pytest.approx(hand, rel=1e-12)


def test_expected_values_agree_with_sentence_transformers():
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    g = torch.Generator().manual_seed(1)
    q, d = torch.randn(6, 16, generator=g), torch.randn(6, 16, generator=g)
    mnrl = MultipleNegativesRankingLoss(None, scale=5.0)
    theirs = sum(w * mnrl.compute_loss_from_embeddings([q[:, :m], d[:, :m]], None) for m, w in [(4, 0.5), (8, 1.0), (16, 2.0)])
    assert expected_matryoshka_loss(q, d, (4, 8, 16), (0.5, 1.0, 2.0), 5.0).item() == pytest.approx(theirs.item(), rel=1e-6)


def test_shortcuts_through_course_lib_are_caught():
    def whole_loss(q, d, dims, weights, scale):
        return matryoshka.MatryoshkaLoss(gradcache.contrastive_loss(scale), dims, weights)(q, d)

    def functional(q, d, dims, weights, scale):
        return matryoshka.matryoshka_loss(None, dims, weights)(q, d)

    def per_prefix(q, d, dims, weights, scale):
        return sum(w * retrieval.in_batch_negatives_loss(matryoshka.truncate(q, m), matryoshka.truncate(d, m), scale)
                   for m, w in zip(dims, weights))

    def per_dim(q, d, dims, weights, scale):
        losses = matryoshka.MatryoshkaLoss(lambda a, b: 0, dims, weights).per_dim(q, d)
        return sum(w * losses[m] for m, w in zip(dims, weights))

    for shortcut in (whole_loss, functional, per_prefix, per_dim):
        with pytest.raises(ShortcutError):
            check_matryoshka_loss(shortcut)


def test_shortcut_through_sentence_transformers_is_caught():
    from sentence_transformers.sentence_transformer import losses as st_losses

    def mnrl(q, d, dims, weights, scale):
        loss = st_losses.MultipleNegativesRankingLoss(None, scale=scale)
        return sum(w * loss.compute_loss_from_embeddings([q[:, :m], d[:, :m]], None) for m, w in zip(dims, weights))

    class Embedded(torch.nn.Module):
        """A stand-in "model" that returns the embeddings it was given (features name which)."""

        def __init__(self, **embeddings):
            super().__init__()
            self.embeddings = embeddings

        def forward(self, features):
            return {"sentence_embedding": self.embeddings[features["which"]]}

        def get_embedding_dimension(self):
            return next(iter(self.embeddings.values())).shape[-1]

    def st_matryoshka(q, d, dims, weights, scale):
        model = Embedded(q=q, d=d)
        base = st_losses.MultipleNegativesRankingLoss(model, scale=scale)
        return st_losses.MatryoshkaLoss(model, base, list(dims), list(weights))([{"which": "q"}, {"which": "d"}], None)

    # both shortcuts compute the right loss: only the refusal stops them
    g = torch.Generator().manual_seed(2)
    q, d = torch.randn(6, 16, generator=g), torch.randn(6, 16, generator=g)
    for shortcut in (mnrl, st_matryoshka):
        assert shortcut(q, d, (16, 4, 8), (2.0, 0.5, 1.0), 5.0).item() == pytest.approx(
            reference_loss(q, d, (16, 4, 8), (2.0, 0.5, 1.0), 5.0).item(), rel=1e-5)
    for shortcut in (mnrl, st_matryoshka):
        with pytest.raises(ShortcutError):
            check_matryoshka_loss(shortcut)


def test_wrong_solutions_fail_with_an_assertion():
    def no_normalisation(q, d, dims, weights, scale):
        return sum(w * F.cross_entropy(scale * q[:, :m] @ d[:, :m].T, torch.arange(len(q))) for m, w in zip(dims, weights))

    def no_scale(q, d, dims, weights, scale):
        return reference_loss(q, d, dims, weights, 1.0)

    def average_not_sum(q, d, dims, weights, scale):
        return reference_loss(q, d, dims, weights, scale) / sum(weights)

    def weights_sorted_with_dims(q, d, dims, weights, scale):      # pairs weights with the sorted dims
        return reference_loss(q, d, sorted(dims), weights, scale)

    def detached(q, d, dims, weights, scale):
        return reference_loss(q.detach(), d.detach(), dims, weights, scale)

    for wrong in (no_normalisation, no_scale, average_not_sum, weights_sorted_with_dims, detached):
        with pytest.raises(AssertionError) as caught:
            check_matryoshka_loss(wrong)
        assert not isinstance(caught.value, ShortcutError), wrong.__name__


def test_forbidden_functions_work_again_after_the_check():
    with pytest.raises(ShortcutError):
        check_matryoshka_loss(lambda q, d, dims, weights, scale: matryoshka.MatryoshkaLoss(None, dims, weights)(q, d))
    q, d = torch.randn(4, 8), torch.randn(4, 8)
    assert torch.isfinite(matryoshka.MatryoshkaLoss(matryoshka_dims=(8, 4))(q, d))
    assert torch.isfinite(matryoshka.matryoshka_loss(None, (8, 4))(q, d))
    assert torch.isfinite(retrieval.in_batch_negatives_loss(q, d)) and torch.isfinite(gradcache.contrastive_loss()(q, d))
    assert set(matryoshka.MatryoshkaLoss(matryoshka_dims=(8, 4)).per_dim(q, d)) == {8, 4}
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    assert torch.isfinite(MultipleNegativesRankingLoss(None).compute_loss_from_embeddings([q, d], None))
