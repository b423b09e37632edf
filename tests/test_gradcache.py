"""GradCache (course_lib.gradcache) against the full-batch gradient and sentence-transformers.

The references are independent of the implementation: the ordinary full-batch backward pass
(`naive_step`, which keeps every chunk's graph) and sentence-transformers'
``CachedMultipleNegativesRankingLoss``. Dropout stays **on** in the gradient tests.

The equalities with the full-batch pass are arithmetic that holds for any encoder, so they run on a
randomly initialised 2-layer BERT (`tiny_encoder`: MiniLM's architecture, tokenizer and dropout,
hidden size 32), where a step takes milliseconds instead of seconds. The real MiniLM runs where the
real model is what is checked: against sentence-transformers' loss (dropout off and on) and in
`code_search_step`, the step the chapters train with.
"""

import copy

import pytest
import torch
from conftest import st_preprocess

from course_lib import data, gradcache, lora, models, retrieval

MAX_TOKENS = 32  # short sequences keep a batch-64 step of the real MiniLM to a few seconds
TINY_LAYERS = 2


@pytest.fixture(scope="module")
def pairs():
    rows = data.load_code_search("train")[:64]
    return [r["query"] for r in rows], [r["document"] for r in rows]


def tiny_encoder(tokenizer, seed: int = 0):
    """MiniLM's architecture (BertModel, its module names, dropout 0.1 on hidden states and attention
    probabilities, its tokenizer's vocabulary) at hidden size 32 with `TINY_LAYERS` layers, randomly
    initialised: the math of these tests does not depend on the weights."""
    return models.tiny_bert(seed, vocab_size=tokenizer.vocab_size, num_hidden_layers=TINY_LAYERS,
                            max_position_embeddings=MAX_TOKENS)


@pytest.fixture()
def encoder(minilm):
    _, tokenizer = minilm
    model = tiny_encoder(tokenizer).train()          # dropout on (hidden and attention, p=0.1)
    return model, lambda texts: retrieval.encode_batch(model, tokenizer, texts, MAX_TOKENS)


def test_tiny_encoder_has_minilms_dropout_and_module_names(minilm):
    """What the tests below rely on when they use `tiny_encoder` instead of MiniLM."""
    base, tokenizer = minilm
    tiny = tiny_encoder(tokenizer)
    assert type(tiny) is type(base)
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "vocab_size", "hidden_act"):
        assert getattr(tiny.config, key) == getattr(base.config, key), key
    in_first_layers = lambda name: not name.startswith("encoder.layer.") or int(name.split(".")[2]) < TINY_LAYERS
    assert [n for n, _ in tiny.named_parameters()] == [n for n, _ in base.named_parameters() if in_first_layers(n)]


def grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def relative_gap(a: dict, b: dict) -> float:
    """‖a − b‖ / ‖b‖ over all parameters' gradients together. (Per tensor it would be noise for
    tensors whose true gradient is zero, e.g. attention key biases: softmax ignores a constant.)"""
    assert a.keys() == b.keys() and a
    flat = lambda g: torch.cat([g[k].flatten() for k in sorted(g)])
    return ((flat(a) - flat(b)).norm() / flat(b).norm()).item()


@pytest.mark.parametrize("chunk_size", [1, 8, 24, 32])   # 24 does not divide 32
def test_gradients_equal_the_full_batch_with_dropout_on(encoder, pairs, chunk_size):
    """32 of the 64 pairs: the equality is exact at any batch size, and each chunk size costs a
    full-batch and a chunked step (test_one_chunk_is_the_plain_batch takes all 64)."""
    model, encode = encoder
    queries, docs = pairs[0][:32], pairs[1][:32]
    torch.manual_seed(1)
    reference = gradcache.naive_step(encode, queries, docs, chunk_size=chunk_size)
    expected = grads(model)
    torch.manual_seed(1)
    result = gradcache.gradcache_step(encode, queries, docs, chunk_size)
    assert result.n_chunks == 2 * -(-32 // chunk_size)
    assert result.loss == pytest.approx(reference.loss, rel=1e-6)
    assert relative_gap(grads(model), expected) < 1e-5
    # every encoder parameter that the loss reaches got a gradient (the pooler is not used)
    assert len(expected) == sum(1 for n, _ in model.named_parameters() if "pooler" not in n)


def test_one_chunk_is_the_plain_batch(encoder, pairs):
    """chunk_size = batch: the reference is the ordinary single forward over all 64 pairs."""
    model, encode = encoder
    queries, docs = pairs
    torch.manual_seed(2)
    q = encode(queries)
    d = encode(docs)
    retrieval.in_batch_negatives_loss(q, d).backward()
    expected = grads(model)
    torch.manual_seed(2)
    gradcache.gradcache_step(encode, queries, docs, chunk_size=64)
    assert relative_gap(grads(model), expected) < 1e-5


def test_without_restoring_the_random_state_the_gradient_is_wrong(encoder, pairs):
    model, encode = encoder
    queries, docs = pairs
    torch.manual_seed(3)
    gradcache.naive_step(encode, queries[:32], docs[:32], chunk_size=8)
    expected = grads(model)
    torch.manual_seed(3)
    gradcache.gradcache_step(encode, queries[:32], docs[:32], 8, restore_rng=False)
    assert relative_gap(grads(model), expected) > 1e-2    # other dropout masks: not the loss's gradient


def test_lora_encoder_and_accumulation(minilm, pairs):
    """LoRA-wrapped encoder (lora_dropout on too), two GradCache steps accumulated with
    loss_scale 1/2 equal two accumulated ordinary steps."""
    _, tokenizer = minilm
    model = tiny_encoder(tokenizer).train()
    lora.inject_lora(model, target_modules=["query", "value"], r=8, lora_alpha=16, lora_dropout=0.1)
    with torch.no_grad():   # B = 0 at init would make A's gradient zero: give B values
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    encode = lambda texts: retrieval.encode_batch(model, tokenizer, texts, MAX_TOKENS)
    queries, docs = pairs
    torch.manual_seed(4)
    for half in (slice(0, 32), slice(32, 64)):
        gradcache.naive_step(encode, queries[half], docs[half], chunk_size=8, loss_scale=0.5)
    expected = grads(model)
    torch.manual_seed(4)
    for half in (slice(0, 32), slice(32, 64)):
        gradcache.gradcache_step(encode, queries[half], docs[half], 8, loss_scale=0.5)
    got = grads(model)
    assert all("lora_" in k for k in got) and len(got) == 2 * 2 * TINY_LAYERS   # A and B, q and v, per layer
    assert relative_gap(got, expected) < 1e-5


def test_accumulating_small_batches_is_not_one_large_batch(encoder, pairs):
    """Two accumulated batches of 32 see 31 negatives per query, one batch of 64 sees 63: a
    different loss (a larger softmax denominator, so the large batch's loss is larger for the
    same embeddings) and a different gradient."""
    model, encode = encoder
    model.eval()                                     # dropout off: the embeddings are the same in both
    queries, docs = pairs
    large = gradcache.gradcache_step(encode, queries, docs, 16)
    g_large = grads(model)
    small = [gradcache.gradcache_step(encode, queries[s], docs[s], 16, loss_scale=0.5)
             for s in (slice(0, 32), slice(32, 64))]
    g_small = grads(model)
    assert large.loss > (small[0].loss + small[1].loss) / 2
    assert relative_gap(g_small, g_large) > 0.05


@pytest.mark.parametrize("symmetric", [False, True])
def test_symmetric_loss_option(encoder, pairs, symmetric):
    model, encode = encoder
    model.eval()
    queries, docs = pairs[0][:16], pairs[1][:16]
    loss_fn = gradcache.contrastive_loss(scale=20.0, symmetric=symmetric)
    reference = gradcache.naive_step(encode, queries, docs, loss_fn=loss_fn)
    expected = grads(model)
    result = gradcache.gradcache_step(encode, queries, docs, 4, loss_fn=loss_fn)
    assert result.loss == pytest.approx(reference.loss, rel=1e-6)
    assert relative_gap(grads(model), expected) < 1e-5


def test_separate_query_and_document_encoders(minilm, pairs):
    _, tokenizer = minilm
    q_model, d_model = tiny_encoder(tokenizer, seed=0).eval(), tiny_encoder(tokenizer, seed=1).eval()
    q_enc = lambda t: retrieval.encode_batch(q_model, tokenizer, t, MAX_TOKENS)
    d_enc = lambda t: retrieval.encode_batch(d_model, tokenizer, t, MAX_TOKENS)
    queries, docs = pairs[0][:16], pairs[1][:16]
    gradcache.naive_step(q_enc, queries, docs, doc_encoder=d_enc)
    expected_q, expected_d = grads(q_model), grads(d_model)
    gradcache.gradcache_step(q_enc, queries, docs, 4, doc_encoder=d_enc)
    assert relative_gap(grads(q_model), expected_q) < 1e-5
    assert relative_gap(grads(d_model), expected_d) < 1e-5


@pytest.mark.parametrize("train_mode", [False, True])
def test_equals_sentence_transformers_cached_mnrl(pairs, train_mode):
    from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss

    from course_lib.models import load_minilm_sentence_transformer

    st = load_minilm_sentence_transformer("cpu")
    st.max_seq_length = MAX_TOKENS
    st.train(train_mode)
    queries, docs = pairs[0][:32], pairs[1][:32]
    features = [st_preprocess(st, queries), st_preprocess(st, docs)]
    loss_fn = CachedMultipleNegativesRankingLoss(st, scale=20.0, mini_batch_size=8)
    torch.manual_seed(5)
    theirs = loss_fn([dict(f) for f in features], None)
    theirs.backward()
    expected = grads(st)
    encode = lambda f: st(dict(f))["sentence_embedding"]
    torch.manual_seed(5)
    ours = gradcache.gradcache_step(encode, dict(features[0]), dict(features[1]), 8)
    assert ours.loss == pytest.approx(theirs.item(), rel=1e-5)
    assert relative_gap(grads(st), expected) < 1e-5


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------
def _toy():
    layer = torch.nn.Linear(4, 3)
    return layer, (lambda x: layer(x)), torch.randn(6, 4), torch.randn(6, 4)


@pytest.mark.parametrize("chunk_size", [0, -2, 1.5, True])
def test_bad_chunk_size(chunk_size):
    _, enc, q, d = _toy()
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        gradcache.gradcache_step(enc, q, d, chunk_size)


def test_mismatched_pairs():
    _, enc, q, d = _toy()
    with pytest.raises(ValueError, match="must match"):
        gradcache.gradcache_step(enc, q, d[:5], 2)
    with pytest.raises(ValueError, match="must match"):
        gradcache.naive_step(enc, ["a", "b"], ["c"])


def test_encoder_must_return_2d_embeddings():
    layer, _, q, d = _toy()
    with pytest.raises(ValueError, match="2-D tensor of embeddings"):
        gradcache.gradcache_step(lambda x: layer(x).unsqueeze(1), q, d, 2)
    with pytest.raises(ValueError, match="2-D tensor of embeddings"):
        gradcache.gradcache_step(lambda x: {"emb": layer(x)}, q, d, 2)


def test_loss_must_be_a_scalar():
    _, enc, q, d = _toy()
    with pytest.raises(ValueError, match="scalar"):
        gradcache.gradcache_step(enc, q, d, 2, loss_fn=lambda a, b: (a * b).sum(1))
    with pytest.raises(ValueError, match="scalar"):
        gradcache.naive_step(enc, q, d, loss_fn=lambda a, b: (a * b).sum(1))


def test_random_state_is_replayed_and_caller_stream_untouched():
    torch.manual_seed(0)
    state = gradcache.RandomState()
    first = torch.rand(3)
    after = torch.rand(3)
    torch.manual_seed(0)
    torch.rand(3)
    with state:
        replay = torch.rand(3)
    assert torch.equal(replay, first)
    assert torch.equal(torch.rand(3), after)     # the replay did not advance the caller's stream


def test_tokenized_chunks_drop_only_the_padding_they_share():
    ids = torch.tensor([[5, 6, 0, 0, 0], [7, 0, 0, 0, 0], [1, 2, 3, 4, 0]])
    batch = {"input_ids": ids, "attention_mask": (ids > 0).long(), "lengths": [2, 1, 4]}
    first, second = gradcache.chunks(batch, 2)
    assert torch.equal(first["input_ids"], ids[:2, :2]) and first["attention_mask"].shape == (2, 2)
    assert torch.equal(second["input_ids"], ids[2:, :4])
    assert first["lengths"] == [2, 1, 4]      # non-tensor entries pass through untouched


def test_code_search_step_gradcache_equals_ordinary(minilm):
    """The step the chapters train with: GradCache (chunk 3) and the ordinary step give the same
    loss and gradients (dropout off, so any chunking embeds alike), with an MRL loss too; so do
    both when the encoder runs on groups of similar length (``group_size``, chapter 04)."""
    from course_lib.matryoshka import MatryoshkaLoss

    base, tokenizer = minilm
    model = copy.deepcopy(base).eval()
    rows = data.load_code_search("train")[:8]
    for loss_fn in (None, MatryoshkaLoss(matryoshka_dims=(384, 64))):
        plain = gradcache.code_search_step(tokenizer, None, loss_fn)(model, rows, 0.5)
        expected = grads(model)
        for chunk_size, group_size in [(3, None), (None, 3), (3, 2)]:
            step = gradcache.code_search_step(tokenizer, chunk_size, loss_fn, group_size=group_size)
            assert step(model, rows, 0.5) == pytest.approx(plain, rel=1e-5)
            assert relative_gap(grads(model), expected) < 1e-5
    with pytest.raises(ValueError, match="positive integer or None"):
        gradcache.code_search_step(tokenizer, 0)
    with pytest.raises(ValueError, match="group_size must be a positive integer or None"):
        gradcache.code_search_step(tokenizer, group_size=0)
