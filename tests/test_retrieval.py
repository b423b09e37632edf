"""Retrieval metrics and the contrastive loss, checked by hand-made cases and by reference libraries."""

import math

import pytest
import torch

from course_lib import retrieval
from course_lib.data import load_code_search


def test_ranks_by_hand():
    """Three documents on the unit circle; each query's relevant document has a known rank."""
    docs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    queries = torch.tensor([[1.0, 0.1], [1.0, 0.1], [0.0, -1.0]])
    # query 0 -> doc 0 is nearest (rank 1); query 1 -> doc 2 is farthest (rank 3);
    # query 2 scores doc 0 and doc 2 equally at 0 (tie) and doc 1 at -1: doc 0 ties, counts against.
    ranks = retrieval.relevant_ranks(queries, docs, [0, 2, 0])
    assert ranks.tolist() == [1, 3, 2]
    assert retrieval.recall_at_k(ranks, 1, 3) == pytest.approx(1 / 3)
    assert retrieval.recall_at_k(ranks, 2, 3) == pytest.approx(2 / 3)
    assert retrieval.mrr(ranks) == pytest.approx((1 + 1 / 3 + 1 / 2) / 3)
    assert retrieval.mrr(ranks, k=2, n_docs=3) == pytest.approx((1 + 0 + 1 / 2) / 3)


def test_constant_embeddings_get_the_worst_rank_not_the_best():
    ranks = retrieval.relevant_ranks(torch.ones(4, 3), torch.ones(10, 3), [0, 1, 2, 3])
    assert ranks.tolist() == [10, 10, 10, 10]


@pytest.mark.parametrize("k", [0, -1, 11, 2.5])
def test_bad_k_is_refused(k):
    ranks = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="k"):
        retrieval.recall_at_k(ranks, k, n_docs=10)
    with pytest.raises(ValueError, match="k"):
        retrieval.retrieval_metrics(torch.eye(2, 4), torch.eye(10, 4), [0, 1], ks=(k,))


def test_mismatched_inputs_are_refused():
    with pytest.raises(ValueError, match="relevant"):
        retrieval.relevant_ranks(torch.eye(2, 4), torch.eye(3, 4), [0])
    with pytest.raises(ValueError, match="relevant indices"):
        retrieval.relevant_ranks(torch.eye(2, 4), torch.eye(3, 4), [0, 3])
    with pytest.raises(TypeError, match="list of texts"):
        retrieval.embed(None, None, "a single string")
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        retrieval.embed(None, None, ["a"], batch_size=0)


def test_embed_restores_input_order(minilm):
    model, tokenizer = minilm
    texts = ["a", "a much longer text about parsing JSON documents", "mid length text"]
    together = retrieval.embed(model, tokenizer, texts, batch_size=2)
    one_by_one = torch.cat([retrieval.embed(model, tokenizer, [t]) for t in texts])
    torch.testing.assert_close(together, one_by_one, atol=1e-5, rtol=1e-4)


def test_embed_batches_texts_of_similar_token_counts(minilm):
    """embed() batches by token count, not by characters: on real code, whose characters per token
    vary, each batch is padded to its longest member's token count and the batches of a token
    sort pad fewer tokens than those of a character sort would."""
    model, tokenizer = minilm
    texts = [r["document"] for r in load_code_search("train")[:32]]
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=retrieval.DOC_MAX_TOKENS)["input_ids"]]
    by_tokens = retrieval.length_groups(lengths, 4)
    char_order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    by_chars = [char_order[start:start + 4] for start in range(0, len(texts), 4)]
    padded = [sum(len(g) * max(lengths[i] for i in g) for g in groups) for groups in (by_tokens, by_chars)]
    assert padded[0] < padded[1]                 # the sample tells the two sorts apart
    widths = []
    hook = model.register_forward_pre_hook(lambda module, args, kwargs: widths.append(kwargs["attention_mask"].shape),
                                           with_kwargs=True)
    try:
        retrieval.embed(model, tokenizer, texts, batch_size=4)
    finally:
        hook.remove()
    assert widths == [(len(g), max(lengths[i] for i in g)) for g in by_tokens]
    assert not model.training
    assert retrieval.embed(model, tokenizer, []).shape == (0, model.config.hidden_size)


def test_embed_keeps_the_model_mode_when_a_batch_fails(minilm):
    model, tokenizer = minilm

    def fail(module, args):
        raise RuntimeError("out of memory")

    model.train()
    hook = model.register_forward_pre_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="out of memory"):
            retrieval.embed(model, tokenizer, ["one text", "another text"])
        assert model.training
    finally:
        hook.remove()
        model.eval()


def test_token_counts_include_the_special_tokens_and_truncate(minilm):
    _, tokenizer = minilm
    # MiniLM's WordPiece: [CLS] hello world [SEP]; truncated, the last kept token is [SEP] again
    assert retrieval.token_counts(tokenizer, ["hello world", "hello"], max_length=64) == [4, 3]
    assert retrieval.token_counts(tokenizer, ("hello world",), max_length=3) == [3]


def test_length_groups_by_hand():
    # sorted longest first (128, 60, 7, 5 at positions 3, 1, 2, 0), then cut in twos
    assert retrieval.length_groups([5, 60, 7, 128], 2) == [[3, 1], [2, 0]]
    assert retrieval.length_groups([3, 3, 3], 2) == [[0, 1], [2]]      # ties keep their order
    assert retrieval.length_groups([4, 9], 5) == [[1, 0]]
    assert retrieval.length_groups([], 2) == []
    with pytest.raises(ValueError, match="group_size must be a positive integer"):
        retrieval.length_groups([1, 2], 0)


def test_grouped_encoding_is_the_same_function_with_less_padding(minilm):
    """Texts run in groups of similar length embed as the whole batch padded to its longest does
    (MiniLM's attention mask keeps texts apart), rows in input order, gradients too; the groups
    pad fewer tokens. A group as large as the batch is the plain path, bit for bit."""
    model, tokenizer = minilm                    # in eval mode: dropout off
    assert not model.training
    texts = [r["document"] for r in load_code_search("train")[:12]]
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=retrieval.DOC_MAX_TOKENS)["input_ids"]]
    assert len(set(lengths)) > 4                                        # mixed lengths, or the test shows nothing
    groups = retrieval.length_groups(lengths, 4)
    assert sum(len(g) * max(lengths[i] for i in g) for g in groups) < len(texts) * max(lengths)

    weight = model.encoder.layer[0].attention.self.query.weight
    probe = torch.randn(len(texts), model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    results = {}
    for group_size in (None, 4, 5, 12):
        emb = retrieval.encode_batch(model, tokenizer, texts, group_size=group_size)
        (emb * probe).sum().backward()           # a gradient that depends on which row is which
        results[group_size] = (emb.detach(), weight.grad.clone())
        model.zero_grad(set_to_none=True)
    plain_emb, plain_grad = results[None]
    for group_size in (4, 5):
        emb, grad = results[group_size]
        torch.testing.assert_close(emb, plain_emb, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(grad, plain_grad, atol=1e-4, rtol=1e-3)
    assert torch.equal(results[12][0], plain_emb) and torch.equal(results[12][1], plain_grad)
    with pytest.raises(ValueError, match="group_size must be a positive integer or None"):
        retrieval.encode_batch(model, tokenizer, texts, group_size=0)


def test_metrics_agree_with_sentence_transformers_evaluator(tmp_path):
    """recall@1/@10 and MRR@10 on real code-search pairs equal InformationRetrievalEvaluator's."""
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    from course_lib.models import load_minilm_sentence_transformer

    pairs = load_code_search("test")[:60]
    st = load_minilm_sentence_transformer("cpu")
    st.max_seq_length = retrieval.DOC_MAX_TOKENS
    # The evaluator embeds with sentence-transformers, so we score the same embeddings it does.
    q = st.encode([p["query"] for p in pairs], convert_to_tensor=True).cpu()
    d = st.encode([p["document"] for p in pairs], convert_to_tensor=True).cpu()
    ours = retrieval.retrieval_metrics(q, d, list(range(len(pairs))), ks=(1, 10))
    ranks = retrieval.relevant_ranks(q, d, list(range(len(pairs))))
    evaluator = InformationRetrievalEvaluator(
        queries={str(i): p["query"] for i, p in enumerate(pairs)},
        corpus={str(i): p["document"] for i, p in enumerate(pairs)},
        relevant_docs={str(i): {str(i)} for i in range(len(pairs))},
        accuracy_at_k=[1, 10], precision_recall_at_k=[1, 10], mrr_at_k=[10], ndcg_at_k=[10],
        map_at_k=[10], write_csv=False,
    )
    ref = evaluator(st, output_path=str(tmp_path))
    key = next(k for k in ref if k.endswith("recall@1")).removesuffix("recall@1")
    assert ours["recall@1"] == pytest.approx(ref[key + "recall@1"], abs=1e-6)
    assert ours["recall@10"] == pytest.approx(ref[key + "recall@10"], abs=1e-6)
    assert retrieval.mrr(ranks, k=10, n_docs=len(pairs)) == pytest.approx(ref[key + "mrr@10"], abs=1e-6)
    assert 0.2 < ours["recall@10"] <= 1.0  # a real model on real pairs, far above chance (10/60)


def test_in_batch_negatives_loss_equals_sentence_transformers():
    """Our InfoNCE equals MultipleNegativesRankingLoss (scale 20, cosine) on the same embeddings."""
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    torch.manual_seed(0)
    q, d = torch.randn(16, 384), torch.randn(16, 384)
    reference = MultipleNegativesRankingLoss(model=None, scale=20.0)
    expected = reference.compute_loss_from_embeddings([q, d], labels=None)
    torch.testing.assert_close(retrieval.in_batch_negatives_loss(q, d, scale=20.0), expected)
    # perfect, well-separated pairs give a loss near 0; identical documents give log(batch)
    eye = torch.eye(16, 384)
    assert retrieval.in_batch_negatives_loss(eye, eye).item() < 1e-6
    same = torch.ones(16, 384)
    assert retrieval.in_batch_negatives_loss(torch.randn(16, 384), same).item() == pytest.approx(math.log(16), rel=1e-5)


def test_training_losses_are_the_metrics_losses(minilm):
    """code_search_loss is in_batch_negatives_loss of the embeddings `embed` returns."""
    model, tokenizer = minilm
    rows = load_code_search("train")[:4]
    with torch.no_grad():
        loss = retrieval.code_search_loss(model, tokenizer, rows)
    q = retrieval.embed(model, tokenizer, [r["query"] for r in rows], max_length=retrieval.QUERY_MAX_TOKENS)
    d = retrieval.embed(model, tokenizer, [r["document"] for r in rows])
    assert loss.item() == pytest.approx(retrieval.in_batch_negatives_loss(q, d).item(), rel=1e-4)
