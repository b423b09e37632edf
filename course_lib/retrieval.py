"""Retrieval for code search: embeddings, the contrastive loss, and recall@k / MRR.

Every chapter that trains MiniLM scores it with these functions on the same test split
(`course_lib.data.load_code_search`), so numbers are comparable across chapters. Retrieval here
is exact (brute-force cosine similarity): each query has one relevant document, its own
function's source. The instruction task's scoring (exact match, perplexity) is in
`course_lib.instruct`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .checks import optional_positive_int, positive_int
from .progress import progress as _progress

# ---------------------------------------------------------------------------------------------
# Embedding with a plain transformers encoder (what sentence-transformers does for MiniLM)
# ---------------------------------------------------------------------------------------------
DOC_MAX_TOKENS = 128  # documents are truncated to this many tokens (MiniLM was trained on 128)
QUERY_MAX_TOKENS = 64


def mean_pool(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average the token vectors of each sequence, ignoring padding (MiniLM's pooling)."""
    mask = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)
    return (last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def model_device(model) -> torch.device:
    """Where ``model``'s parameters live; CPU for a runner without parameters (`course_lib.export`'s
    ``OnnxEncoder`` and ``OnnxCausalLM``, which onnxruntime runs on the CPU)."""
    parameters = getattr(model, "parameters", None)
    first = next(parameters(), None) if parameters is not None else None
    return first.device if first is not None else torch.device("cpu")


def token_counts(tokenizer, texts: Sequence[str], max_length: int) -> list[int]:
    """How many tokens each text becomes, truncated to ``max_length`` (special tokens included)."""
    return [len(ids) for ids in tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]]


def length_groups(lengths: Sequence[int], group_size: int) -> list[list[int]]:
    """Positions of ``lengths`` sorted longest first, cut into groups of ``group_size``.

    Padded to its own longest text, a group of similar lengths pads little: ``lengths`` 5, 60, 7,
    128 in groups of 2 give ``[[3, 1], [2, 0]]``, 2 × 128 + 2 × 7 = 270 padded tokens instead of
    4 × 128 = 512. Ties keep their input order.
    """
    positive_int("group_size", group_size)
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[start:start + group_size] for start in range(0, len(order), group_size)]


def encode_batch(model, tokenizer, texts: Sequence[str], max_length: int = DOC_MAX_TOKENS,
                 normalize: bool = True, group_size: int | None = None) -> torch.Tensor:
    """Embed one batch *with* the autograd graph (training uses this; evaluation uses `embed`).

    The batch is padded to its longest text, so every text costs the model as much as the longest
    (what sentence-transformers does). With ``group_size`` the texts run through the model
    ``group_size`` at a time, sorted by token count (`length_groups`), each group padded to its
    own longest, and the embeddings come back in input order. The attention mask keeps an
    encoder's texts apart, so it is the same function, up to float rounding; what changes is the
    work, and with dropout on, which masks are drawn.
    """
    optional_positive_int("group_size", group_size, "None: one group, padded to the batch's longest text")
    device = model_device(model)
    texts = list(texts)
    if group_size is None or group_size >= len(texts):
        batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt").to(device)
        out = model(**batch)
        emb = mean_pool(out.last_hidden_state, batch["attention_mask"])
        return F.normalize(emb, dim=-1) if normalize else emb
    lengths = token_counts(tokenizer, texts, max_length)
    groups = length_groups(lengths, group_size)
    parts = [encode_batch(model, tokenizer, [texts[i] for i in group], max_length, normalize)
             for group in groups]
    position = torch.empty(len(texts), dtype=torch.long)       # where each input text's row landed
    position[torch.tensor([i for group in groups for i in group])] = torch.arange(len(texts))
    return torch.cat(parts).index_select(0, position.to(parts[0].device))


@torch.no_grad()
def embed(model, tokenizer, texts: Sequence[str], batch_size: int = 32,
          max_length: int = DOC_MAX_TOKENS, normalize: bool = True,
          progress: bool | str = False) -> torch.Tensor:
    """Embed texts in batches without gradients; returns a float32 CPU tensor (len(texts), dim).

    Texts are batched in order of their token count (`length_groups`), so each batch pads little
    (about 2x faster on CPU for code of mixed lengths), and the result is put back in the input
    order. Batches of 32, sentence-transformers' default, pad less than 64: MiniLM embedded
    chapter 04's 1,506 documents in 39 s instead of 45 s on one idle CPU thread, 41 s instead of
    44 s (4 runs each) beside another such run, and within noise on two threads. Sorted by token
    count rather than by characters, chapter 04's 506 queries and 1,506 documents pad to 119,496
    tokens instead of 140,486 and took 34-35 s instead of 40-42 s on one idle thread (two runs
    each, alternating), with the same top-10 documents for every query.
    """
    if isinstance(texts, str):
        raise TypeError("embed() takes a list of texts, not a single string: wrap it in [ ... ]")
    positive_int("batch_size", batch_size)
    texts = list(texts)
    if not texts:
        return torch.empty(0, model.config.hidden_size)
    lengths = token_counts(tokenizer, texts, max_length)
    batches = length_groups(lengths, batch_size)
    was_training = model.training
    model.eval()
    chunks = []
    desc = progress if isinstance(progress, str) else "embedding"
    try:
        for idx in _progress(batches, desc, disable=not progress):
            chunks.append(encode_batch(model, tokenizer, [texts[i] for i in idx], max_length,
                                       normalize).float().cpu())
    finally:
        model.train(was_training)               # also when a batch fails: the model keeps its mode
    stacked = torch.cat(chunks)
    result = torch.empty_like(stacked)
    result[torch.tensor([i for idx in batches for i in idx])] = stacked
    return result


def in_batch_negatives_loss(query_emb: torch.Tensor, doc_emb: torch.Tensor, scale: float = 20.0,
                            symmetric: bool = False) -> torch.Tensor:
    """Contrastive (InfoNCE) loss with in-batch negatives for a batch of matching pairs.

    Row i of ``query_emb`` matches row i of ``doc_emb``; every other document in the batch is a
    negative. The logits are ``scale`` × cosine similarity and the loss is the cross-entropy of
    picking the right document, which is what sentence-transformers'
    ``MultipleNegativesRankingLoss`` computes (its default scale is 20, i.e. temperature 0.05).
    ``symmetric=True`` averages it with the same loss from documents to queries.
    """
    if query_emb.shape != doc_emb.shape:
        raise ValueError(f"queries {tuple(query_emb.shape)} and documents {tuple(doc_emb.shape)} must pair up")
    logits = scale * F.normalize(query_emb, dim=-1) @ F.normalize(doc_emb, dim=-1).T
    labels = torch.arange(len(logits), device=logits.device)
    loss = F.cross_entropy(logits, labels)
    if symmetric:
        loss = (loss + F.cross_entropy(logits.T, labels)) / 2
    return loss


def code_search_loss(model, tokenizer, rows: Sequence[dict], scale: float = 20.0,
                     doc_max_tokens: int = DOC_MAX_TOKENS) -> torch.Tensor:
    """The training loss of one batch of code-search pairs: embed the queries and their
    documents with the same encoder, then `in_batch_negatives_loss`."""
    q = encode_batch(model, tokenizer, [r["query"] for r in rows], QUERY_MAX_TOKENS)
    d = encode_batch(model, tokenizer, [r["document"] for r in rows], doc_max_tokens)
    return in_batch_negatives_loss(q, d, scale)


# ---------------------------------------------------------------------------------------------
# Retrieval metrics
# ---------------------------------------------------------------------------------------------
def _check_k(k: int, n_docs: int) -> None:
    positive_int("k", k)
    if k > n_docs:
        raise ValueError(f"k={k} is larger than the corpus ({n_docs} documents): "
                         f"use k <= {n_docs}, or add documents to the corpus")


def relevant_ranks(query_emb: torch.Tensor, doc_emb: torch.Tensor,
                   relevant: Sequence[int]) -> torch.Tensor:
    """1-based rank of each query's relevant document among all documents (cosine similarity).

    ``relevant[i]`` is the index in ``doc_emb`` of query i's document. Ties count against the
    relevant document (a document scoring equal is ranked above it), so a degenerate model
    that gives every document the same score gets the worst rank, not the best.
    """
    if query_emb.shape[0] != len(relevant):
        raise ValueError(f"{query_emb.shape[0]} queries but {len(relevant)} relevant indices")
    if query_emb.shape[1] != doc_emb.shape[1]:
        raise ValueError(f"query dim {query_emb.shape[1]} != document dim {doc_emb.shape[1]}")
    rel = torch.as_tensor(list(relevant), dtype=torch.long)
    if len(rel) and (rel.min() < 0 or rel.max() >= doc_emb.shape[0]):
        raise ValueError(f"relevant indices must lie in [0, {doc_emb.shape[0]})")
    q = F.normalize(query_emb.float(), dim=-1)
    d = F.normalize(doc_emb.float(), dim=-1)
    ranks = []
    for start in range(0, len(q), 1024):  # bounded memory for large corpora
        scores = q[start:start + 1024] @ d.T
        own = scores.gather(1, rel[start:start + 1024, None])
        ranks.append((scores >= own).sum(1))
    return torch.cat(ranks) if ranks else torch.empty(0, dtype=torch.long)


def recall_at_k(ranks: torch.Tensor, k: int, n_docs: int) -> float:
    """Fraction of queries whose relevant document is in the top k (one relevant per query)."""
    _check_k(k, n_docs)
    return (ranks <= k).float().mean().item()


def mrr(ranks: torch.Tensor, k: int | None = None, n_docs: int | None = None) -> float:
    """Mean reciprocal rank; with ``k``, ranks beyond k score 0 (MRR@k)."""
    recip = 1.0 / ranks.float()
    if k is not None:
        _check_k(k, n_docs if n_docs is not None else int(ranks.max()))
        recip = torch.where(ranks <= k, recip, torch.zeros_like(recip))
    return recip.mean().item()


def retrieval_metrics(query_emb: torch.Tensor, doc_emb: torch.Tensor, relevant: Sequence[int],
                      ks: Sequence[int] = (1, 10)) -> dict:
    """recall@k for each k and MRR (no cut-off) of queries against a document corpus."""
    n_docs = doc_emb.shape[0]
    for k in ks:
        _check_k(k, n_docs)
    ranks = relevant_ranks(query_emb, doc_emb, relevant)
    out = {f"recall@{k}": recall_at_k(ranks, k, n_docs) for k in ks}
    out["mrr"] = mrr(ranks)
    return out


def embed_code_search(model, tokenizer, pairs: Sequence[dict], distractors: Sequence[dict] = (),
                      batch_size: int = 32, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Query embeddings of ``pairs`` and document embeddings of the corpus: the pairs' own
    documents first (query i's document is row i), then the distractors."""
    queries = [p["query"] for p in pairs]
    docs = [p["document"] for p in pairs] + [d["document"] for d in distractors]
    q = embed(model, tokenizer, queries, batch_size, QUERY_MAX_TOKENS, progress=progress and "queries")
    d = embed(model, tokenizer, docs, batch_size, DOC_MAX_TOKENS, progress=progress and "documents")
    return q, d


def evaluate_code_search(model, tokenizer, pairs: Sequence[dict], distractors: Sequence[dict] = (),
                         ks: Sequence[int] = (1, 10), batch_size: int = 32,
                         progress: bool = False) -> dict:
    """Embed queries and documents (pairs' own documents, then distractors) and score them.

    Returns the metrics plus ``n_queries`` and ``n_docs`` so a reader knows the corpus size.
    """
    q, d = embed_code_search(model, tokenizer, pairs, distractors, batch_size, progress)
    metrics = retrieval_metrics(q, d, list(range(len(pairs))), ks)
    return {**metrics, "n_queries": len(q), "n_docs": len(d)}
