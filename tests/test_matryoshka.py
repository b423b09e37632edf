"""Matryoshka loss and two-stage search (course_lib.matryoshka) against independent references.

The loss is checked against sentence-transformers' ``MatryoshkaLoss`` on the real MiniLM (value
and parameter gradients), against the ordinary backward pass inside a GradCache step, and
against formulas (re-normalised prefixes, a single full dimension). Search is checked against
brute-force full-dimension cosine ranking, a hand-made case where the shortlist misses, numpy's
``packbits`` and Hamming distance, and `course_lib.retrieval`'s recall.
"""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import st_preprocess

from course_lib import data, gradcache, matryoshka, retrieval
from course_lib.matryoshka import MatryoshkaLoss

MAX_TOKENS = 32
N_PAIRS = 16



@pytest.fixture(scope="module")
def pairs():
    rows = data.load_code_search("train")[:N_PAIRS]
    return [r["query"] for r in rows], [r["document"] for r in rows]


@pytest.fixture(scope="module")
def st():
    from course_lib.models import load_minilm_sentence_transformer

    model = load_minilm_sentence_transformer("cpu")
    model.max_seq_length = MAX_TOKENS
    return model.eval()


def grads(model) -> torch.Tensor:
    """All parameter gradients as one vector (in name order), then cleared."""
    named = sorted((n, p) for n, p in model.named_parameters() if p.grad is not None)
    assert named
    flat = torch.cat([p.grad.flatten() for _, p in named])
    model.zero_grad(set_to_none=True)
    return flat


def relative_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return ((a - b).norm() / b.norm()).item()


def random_unit(n: int, dim: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


# ---------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dims, weights", [
    ([384, 256, 128, 64, 32], None),
    ([32, 384, 128], [0.5, 2.0, 1.0]),          # unsorted, non-uniform: each weight follows its dim
    ([256, 64], [1.0, 3.0]),                     # full dimension left out
])
def test_equals_sentence_transformers_matryoshka_loss(st, pairs, dims, weights):
    from sentence_transformers.sentence_transformer.losses import MatryoshkaLoss as STMatryoshkaLoss
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    features = [st_preprocess(st, pairs[0]), st_preprocess(st, pairs[1])]
    reference = STMatryoshkaLoss(st, MultipleNegativesRankingLoss(st, scale=20.0),
                                 matryoshka_dims=dims, matryoshka_weights=weights)
    theirs = reference([dict(f) for f in features], None)
    theirs.backward()
    expected = grads(st)

    q, d = (st(dict(f))["sentence_embedding"] for f in features)
    ours = MatryoshkaLoss(matryoshka_dims=dims, matryoshka_weights=weights)(q, d)
    ours.backward()
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)
    assert relative_gap(grads(st), expected) < 1e-5


def test_inside_gradcache_equals_the_plain_backward(minilm, pairs):
    model, tokenizer = minilm
    model = copy.deepcopy(model).eval()
    encode = lambda texts: retrieval.encode_batch(model, tokenizer, texts, MAX_TOKENS)
    loss_fn = MatryoshkaLoss(matryoshka_dims=(384, 128, 32), matryoshka_weights=(1.0, 0.5, 2.0))
    reference = gradcache.naive_step(encode, *pairs, loss_fn=loss_fn)
    expected = grads(model)
    result = gradcache.gradcache_step(encode, *pairs, chunk_size=4, loss_fn=loss_fn)
    assert result.loss == pytest.approx(reference.loss, rel=1e-6)
    assert relative_gap(grads(model), expected) < 1e-5


def test_gradcache_equals_sentence_transformers_cached_matryoshka(st, pairs):
    """Ours in gradcache_step against ST's MatryoshkaLoss around CachedMultipleNegativesRankingLoss."""
    from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss
    from sentence_transformers.sentence_transformer.losses import MatryoshkaLoss as STMatryoshkaLoss

    dims, weights = [384, 64], [1.0, 2.0]
    features = [st_preprocess(st, pairs[0]), st_preprocess(st, pairs[1])]
    reference = STMatryoshkaLoss(st, CachedMultipleNegativesRankingLoss(st, scale=20.0, mini_batch_size=4),
                                 matryoshka_dims=dims, matryoshka_weights=weights)
    theirs = reference([dict(f) for f in features], None)
    theirs.backward()
    expected = grads(st)
    encode = lambda f: st(dict(f))["sentence_embedding"]
    ours = gradcache.gradcache_step(encode, dict(features[0]), dict(features[1]), 4,
                                    loss_fn=MatryoshkaLoss(matryoshka_dims=dims, matryoshka_weights=weights))
    assert ours.loss == pytest.approx(theirs.item(), rel=1e-5)
    assert relative_gap(grads(st), expected) < 1e-5


def test_one_full_dimension_is_the_base_loss():
    q = torch.randn(8, 48, generator=torch.Generator().manual_seed(0), requires_grad=True)
    d = torch.randn(8, 48, generator=torch.Generator().manual_seed(1), requires_grad=True)
    for base in (retrieval.in_batch_negatives_loss, gradcache.contrastive_loss(scale=10.0, symmetric=True)):
        expected = base(q, d)
        g_expected = torch.autograd.grad(expected, [q, d])
        got = MatryoshkaLoss(base, matryoshka_dims=(48,), matryoshka_weights=(1.0,))(q, d)
        g_got = torch.autograd.grad(got, [q, d])
        assert got.item() == pytest.approx(expected.item(), rel=1e-6)
        for a, b in zip(g_got, g_expected):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_prefixes_are_renormalised_and_weighted():
    """With a base loss that does not normalise (mean dot product), the loss at each dimension is
    the mean cosine of the prefixes, and the total is their plain weighted sum."""
    q, d = torch.randn(5, 32), torch.randn(5, 32)
    mean_dot = lambda a, b: (a * b).sum(1).mean()
    loss = MatryoshkaLoss(mean_dot, matryoshka_dims=(8, 32, 2), matryoshka_weights=(3.0, 1.0, 0.5))
    cosine = {m: F.cosine_similarity(q[:, :m], d[:, :m], dim=1).mean().item() for m in (32, 8, 2)}
    assert {m: v.item() for m, v in loss.per_dim(q, d).items()} == pytest.approx(cosine, rel=1e-5)
    assert loss(q, d).item() == pytest.approx(cosine[32] + 3 * cosine[8] + 0.5 * cosine[2], rel=1e-5)


def test_dims_are_sorted_largest_first_with_their_weights():
    loss = matryoshka.matryoshka_loss(matryoshka_dims=[32, 384, 128], matryoshka_weights=[0.5, 2.0, 1.0])
    assert loss.matryoshka_dims == (384, 128, 32)
    assert loss.matryoshka_weights == (2.0, 1.0, 0.5)
    assert MatryoshkaLoss().matryoshka_weights == (1.0,) * 5


def test_truncate_is_a_unit_length_prefix():
    emb = torch.randn(6, 64)
    t = matryoshka.truncate(emb, 16)
    assert t.shape == (6, 16)
    torch.testing.assert_close(t.norm(dim=1), torch.ones(6))
    torch.testing.assert_close(t * emb[:, :16].norm(dim=1, keepdim=True), emb[:, :16])   # same direction
    assert torch.equal(matryoshka.truncate(emb, 16, normalize=False), emb[:, :16])


# ---------------------------------------------------------------------------------------------
# Indexes and two-stage search
# ---------------------------------------------------------------------------------------------
def brute_force(q: torch.Tensor, docs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scores = F.normalize(q, dim=-1) @ F.normalize(docs, dim=-1).T
    return scores.sort(dim=1, descending=True)


@pytest.mark.parametrize("index", ["float32", "int8", "binary"])
@pytest.mark.parametrize("shortlist_dim", [8, 64])
def test_whole_corpus_shortlist_is_brute_force(index, shortlist_dim):
    """A shortlist of the whole corpus, re-ranked at full size, is brute force's ranking. Stage 2
    scores with an einsum over the shortlist, brute force with one matmul: two documents whose
    scores differ only by float rounding may swap (an unseeded run once failed on such a pair, in a
    clean clone beside other work), so the check is that every position holds a document whose
    true score is brute force's score at that position, to 1e-6, and each document once."""
    gen = torch.Generator().manual_seed(0)
    q, docs = torch.randn(7, 64, generator=gen), torch.randn(50, 64, generator=gen)
    expected_scores, expected = brute_force(q, docs)
    cosine = F.normalize(q, dim=-1) @ F.normalize(docs, dim=-1).T
    result = matryoshka.two_stage_search(q, docs, k=50, shortlist_dim=shortlist_dim, top=50, index=index)
    assert torch.equal(result.ranking.sort(dim=1).values, torch.arange(50).expand(7, 50))   # a permutation
    torch.testing.assert_close(cosine.gather(1, result.ranking), expected_scores, rtol=0, atol=1e-6)
    assert (result.ranking == expected).float().mean() > 0.9   # swaps are rare, not the rule
    assert torch.equal(result.indices, result.ranking)
    torch.testing.assert_close(result.scores, expected_scores)
    top3 = matryoshka.two_stage_search(q, docs, k=50, shortlist_dim=shortlist_dim, top=3, index=index)
    torch.testing.assert_close(cosine.gather(1, top3.indices), expected_scores[:, :3], rtol=0, atol=1e-6)


def test_shortlist_at_a_short_prefix_can_miss_the_best_document():
    """By hand, in 2-D with a 1-number prefix. Query (0.1, 1): its prefix points along +x.
    A = (1, 0) and C = (1, 1) score 1 on the prefix, B = (-0.1, 1) scores -1; at full dimension
    B is nearest (cos 0.98), then C (0.77), then A (0.10). A shortlist of 2 keeps A and C only."""
    q = torch.tensor([[0.1, 1.0]])
    docs = torch.tensor([[1.0, 0.0], [-0.1, 1.0], [1.0, 1.0]])   # A, B, C
    assert brute_force(q, docs)[1].tolist() == [[1, 2, 0]]
    result = matryoshka.two_stage_search(q, docs, k=2, shortlist_dim=1, top=1)
    assert result.ranking.tolist() == [[2, 0]]
    assert result.indices.tolist() == [[2]]
    assert matryoshka.shortlist_ranks(result.ranking, [1], n_docs=3).tolist() == [4]   # missed
    assert matryoshka.two_stage_recall(result, [1], ks=(1, 2)) == {"recall@1": 0.0, "recall@2": 0.0}
    assert matryoshka.two_stage_recall(result, [0], ks=(1, 2)) == {"recall@1": 0.0, "recall@2": 1.0}
    full = matryoshka.two_stage_search(q, docs, k=3, shortlist_dim=1, top=1)
    assert full.indices.tolist() == [[1]]


def test_first_stage_is_the_prefix_top_k_that_search_reorders():
    """Stage 1 is a top-k by cosine at the prefix (computed here from the definition); stage 2
    only reorders those k documents (the whole-corpus case above fixes the order), so timing
    `first_stage` alone times the least work a search does."""
    g = torch.Generator().manual_seed(4)
    q, docs = torch.randn(9, 48, generator=g), torch.randn(200, 48, generator=g)
    index = matryoshka.TwoStageIndex(docs, shortlist_dim=12)
    prefix = F.normalize(q[:, :12], dim=-1) @ F.normalize(docs[:, :12], dim=-1).T
    expected = prefix.topk(15, dim=1).indices.sort(dim=1).values
    assert torch.equal(index.first_stage(q, 15).sort(dim=1).values, expected)
    cosine = F.normalize(q, dim=-1) @ F.normalize(docs, dim=-1).T     # full dimension, by definition
    for query_batch in (4, 64):     # batches of 4, and all 9 in one batch: the same shortlists
        result = index.search(q, k=15, top=15, query_batch=query_batch)
        assert torch.equal(result.ranking.sort(dim=1).values, expected)
        assert torch.all(result.scores[:, :-1] >= result.scores[:, 1:])
        torch.testing.assert_close(result.scores, cosine.gather(1, result.ranking), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="query_batch must be a positive integer"):
        index.search(q, k=15, query_batch=0)


def test_two_stage_recall_at_full_shortlist_equals_retrieval_metrics():
    docs = torch.randn(40, 32, generator=torch.Generator().manual_seed(2))
    relevant = list(range(0, 40, 2))
    q = docs[relevant] + 1.2 * torch.randn(20, 32, generator=torch.Generator().manual_seed(3))
    expected = retrieval.retrieval_metrics(q, docs, relevant, ks=(1, 5))
    assert 0 < expected["recall@1"] < 1          # a case where the ranks matter
    result = matryoshka.two_stage_search(q, docs, k=40, shortlist_dim=4, top=5)
    got = matryoshka.two_stage_recall(result, relevant, ks=(1, 5))
    assert got == {k: pytest.approx(expected[k]) for k in ("recall@1", "recall@5")}


@pytest.mark.parametrize("dim", [64, 20])
def test_index_bytes_follow_the_formulas(dim):
    docs = torch.randn(100, 64)
    sizes = {kind: matryoshka.build_index(docs, dim, kind).nbytes for kind in matryoshka.INDEX_TYPES}
    assert sizes == {"float32": 100 * 4 * dim, "int8": 100 * (dim + 4), "binary": 100 * -(-dim // 8)}
    result = matryoshka.two_stage_search(docs[:3], docs, k=10, shortlist_dim=dim, index="binary")
    assert result.index_bytes == 100 * -(-dim // 8)


def test_int8_codes_are_within_half_a_step():
    docs = torch.randn(30, 24)
    idx = matryoshka.build_index(docs, 24, "int8")
    unit = F.normalize(docs, dim=-1)
    assert idx.codes.dtype == torch.int8 and idx.codes.abs().max() == 127
    torch.testing.assert_close(idx.scales, unit.abs().amax(1) / 127)
    error = (idx.codes.float() * idx.scales[:, None] - unit).abs()
    assert (error <= idx.scales[:, None] / 2 + 1e-7).all()


def test_binary_index_matches_numpy_packbits_and_hamming():
    q, docs = torch.randn(4, 24), torch.randn(30, 24)
    idx = matryoshka.build_index(docs, 24, "binary")
    assert np.array_equal(idx.codes.numpy(), np.packbits(docs.numpy() > 0, axis=1))
    hamming = ((q.numpy() > 0)[:, None, :] != (docs.numpy() > 0)[None, :, :]).sum(-1)
    assert np.array_equal(idx.scores(q).numpy(), 24 - 2 * hamming)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dims, message", [
    ((384, 128, 128), r"\[128\] more than once"),
    ((384, 0), "positive integer"),
    ((384, -64), "positive integer"),
    ((384, 64.0), "positive integer"),
    ((), "empty"),
])
def test_bad_dims(dims, message):
    with pytest.raises(ValueError, match=message):
        MatryoshkaLoss(matryoshka_dims=dims)


def test_dim_larger_than_the_embedding():
    q = d = torch.randn(4, 384)
    with pytest.raises(ValueError, match="dimension 512 is larger than the embedding's 384"):
        MatryoshkaLoss(matryoshka_dims=(512, 64))(q, d)
    with pytest.raises(ValueError, match="larger than the embedding's 384"):
        matryoshka.truncate(q, 385)
    with pytest.raises(ValueError, match="larger than the embedding's 384"):
        matryoshka.two_stage_search(q, d, k=2, shortlist_dim=500, top=1)
    with pytest.raises(ValueError, match="positive integer"):
        matryoshka.truncate(q, 0)


def test_weights_of_the_wrong_length():
    with pytest.raises(ValueError, match="got 2 matryoshka_weights for 3 matryoshka_dims: give one weight"):
        MatryoshkaLoss(matryoshka_dims=(384, 128, 32), matryoshka_weights=(1.0, 1.0))


@pytest.mark.parametrize("k, message", [(0, "positive integer"), (-3, "positive integer"),
                                        (11, r"k=11 is larger than the corpus \(10 documents\)")])
def test_bad_shortlist_size(k, message):
    q, docs = random_unit(2, 16, 0), random_unit(10, 16, 1)
    with pytest.raises(ValueError, match=message):
        matryoshka.two_stage_search(q, docs, k=k, shortlist_dim=8, top=1)
    with pytest.raises(ValueError, match=message):
        matryoshka.TwoStageIndex(docs, 8).first_stage(q, k)


def test_bad_top_index_type_and_recall_ks():
    q, docs = random_unit(2, 16, 0), random_unit(10, 16, 1)
    with pytest.raises(ValueError, match="top=10 results cannot come from a shortlist of k=5"):
        matryoshka.two_stage_search(q, docs, k=5, shortlist_dim=8)
    with pytest.raises(ValueError, match="unknown index type 'int4': use one of 'float32', 'int8', 'binary'"):
        matryoshka.two_stage_search(q, docs, k=5, shortlist_dim=8, top=1, index="int4")
    with pytest.raises(ValueError, match="unknown index type"):
        matryoshka.build_index(docs, 8, "fp16")
    with pytest.raises(ValueError, match="query dim 8 != document dim 16"):
        matryoshka.two_stage_search(q[:, :8], docs, k=5, shortlist_dim=8, top=1)
    with pytest.raises(ValueError, match="query dim 8 != document dim 16"):
        matryoshka.TwoStageIndex(docs, 8).first_stage(q[:, :8], 5)
    result = matryoshka.two_stage_search(q, docs, k=5, shortlist_dim=8, top=1)
    with pytest.raises(ValueError, match="recall@10 needs ranks beyond the shortlist of 5"):
        matryoshka.two_stage_recall(result, [0, 1], ks=(1, 10))
    with pytest.raises(ValueError, match="one per query"):
        matryoshka.two_stage_recall(result, [0], ks=(1,))


def test_metrics_by_dim_truncates_both_sides():
    g = torch.Generator().manual_seed(4)
    docs = torch.randn(30, 16, generator=g)
    q = docs + 0.8 * torch.randn(30, 16, generator=g)
    relevant = list(range(30))
    got = matryoshka.metrics_by_dim(q, docs, relevant, dims=(16, 4), ks=(1, 5))
    assert got[16] == retrieval.retrieval_metrics(q, docs, relevant, ks=(1, 5))
    assert got[4] == retrieval.retrieval_metrics(q[:, :4], docs[:, :4], relevant, ks=(1, 5))   # cosine: scale-free
