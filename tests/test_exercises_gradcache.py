"""Chapter 03's build-it exercise: the check passes a GradCache step written from scratch and
catches the shortcuts (course_lib's step, sentence-transformers' cached loss), the ordinary
full-batch step, the chunked step that keeps every graph, and a step that forgets the dropout masks."""

import pytest
import torch
import torch.nn.functional as F

from course_lib import gradcache, retrieval
from course_lib.tooling.exercises import ShortcutError
from course_lib.tooling.exercises.gradcache import check_gradcache_step


def _loss(q, d, scale):
    logits = scale * F.normalize(q, dim=-1) @ F.normalize(d, dim=-1).T
    return F.cross_entropy(logits, torch.arange(len(q)))


def _gradcache(encoder, queries, documents, chunk_size, scale, restore_rng=True):
    sides = [[x[i:i + chunk_size] for i in range(0, len(x), chunk_size)] for x in (queries, documents)]
    states, cached = [], []
    with torch.no_grad():
        for parts in sides:
            embs = []
            for part in parts:
                states.append(torch.get_rng_state())
                embs.append(encoder(part))
            cached.append(torch.cat(embs).requires_grad_())
    loss = _loss(*cached, scale)
    grads = torch.autograd.grad(loss, cached)
    state = iter(states)
    for parts, grad in zip(sides, grads):
        for part, g in zip(parts, grad.split(chunk_size)):
            saved = torch.get_rng_state()
            if restore_rng:
                torch.set_rng_state(next(state))
            emb = encoder(part)
            torch.set_rng_state(saved)
            (emb * g).sum().backward()      # the surrogate: its gradient w.r.t. emb is g
    return loss.item()


def test_a_gradcache_step_written_from_scratch_passes():
    check_gradcache_step(_gradcache)
    check_gradcache_step(_gradcache, seed=3)


def test_calling_course_libs_step_is_caught():
    def shortcut(encoder, queries, documents, chunk_size, scale):
        return gradcache.gradcache_step(encoder, queries, documents, chunk_size).loss   # its scale is 20 too
    with pytest.raises(ShortcutError, match="gradcache_step"):
        check_gradcache_step(shortcut)

    def own_step_library_loss(encoder, queries, documents, chunk_size, scale):
        with torch.no_grad():
            q, d = encoder(queries[:chunk_size]), encoder(documents[:chunk_size])
        return retrieval.in_batch_negatives_loss(q, d, scale).item()
    with pytest.raises(ShortcutError, match="in_batch_negatives_loss"):
        check_gradcache_step(own_step_library_loss)


def test_calling_sentence_transformers_cached_loss_is_caught():
    from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss

    class AsSentenceTransformer(torch.nn.Sequential):  # the model interface the cached loss expects
        def forward(self, features):
            return {"sentence_embedding": self[0](features["x"])}

    def shortcut(encoder, queries, documents, chunk_size, scale):
        loss = CachedMultipleNegativesRankingLoss(AsSentenceTransformer(encoder), scale=scale,
                                                  mini_batch_size=chunk_size)
        value = loss([{"x": queries}, {"x": documents}], None)
        value.backward()
        return value.item()
    with pytest.raises(ShortcutError, match="CachedMultipleNegativesRankingLoss"):
        check_gradcache_step(shortcut)


def test_forgetting_the_random_state_is_a_wrong_gradient_not_a_shortcut():
    wrong = lambda *args: _gradcache(*args, restore_rng=False)
    with pytest.raises(AssertionError, match="random state") as caught:
        check_gradcache_step(wrong)
    assert not isinstance(caught.value, ShortcutError)


def test_forgetting_the_scale_is_a_wrong_answer():
    wrong = lambda encoder, q, d, chunk, scale: _gradcache(encoder, q, d, chunk, 1.0)
    with pytest.raises(AssertionError, match="loss") as caught:
        check_gradcache_step(wrong)
    assert not isinstance(caught.value, ShortcutError)


def test_the_ordinary_full_batch_step_is_caught():
    def full_batch(encoder, queries, documents, chunk_size, scale):
        loss = _loss(encoder(queries), encoder(documents), scale)
        loss.backward()
        return loss.item()
    with pytest.raises(AssertionError, match="24 rows at once"):
        check_gradcache_step(full_batch)


def test_keeping_every_chunks_graph_is_caught():
    def chunked_naive(encoder, queries, documents, chunk_size, scale):
        embed = lambda x: torch.cat([encoder(x[i:i + chunk_size]) for i in range(0, len(x), chunk_size)])
        loss = _loss(embed(queries), embed(documents), scale)
        loss.backward()
        return loss.item()
    with pytest.raises(AssertionError, match="chunks' worth of activations"):
        check_gradcache_step(chunked_naive)


def test_the_forbidden_functions_work_again_and_the_random_state_is_kept():
    from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss

    forward = CachedMultipleNegativesRankingLoss.forward
    torch.manual_seed(7)
    before = torch.get_rng_state()
    with pytest.raises(ShortcutError):
        check_gradcache_step(lambda *args: gradcache.naive_step(args[0], args[1], args[2]).loss)
    assert torch.equal(torch.get_rng_state(), before)
    assert CachedMultipleNegativesRankingLoss.forward is forward
    layer = torch.nn.Linear(4, 3)
    q, d = torch.randn(6, 4), torch.randn(6, 4)
    assert gradcache.gradcache_step(layer, q, d, 2).loss == pytest.approx(gradcache.naive_step(layer, q, d).loss)
    assert retrieval.in_batch_negatives_loss(q, d).item() > 0
