"""Shared evaluation: embeddings and retrieval metrics for code search, exact match and
perplexity for the SmolLM2 instruction task.

Every chapter scores its model with these functions on the same test split, so numbers are
comparable across chapters. Retrieval here is exact (brute-force cosine similarity): each query
has one relevant document, its own function's source.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

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


def encode_batch(model, tokenizer, texts: Sequence[str], max_length: int = DOC_MAX_TOKENS,
                 normalize: bool = True) -> torch.Tensor:
    """Embed one batch *with* the autograd graph (training uses this; evaluation uses `embed`)."""
    device = model_device(model)
    batch = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt").to(device)
    out = model(**batch)
    emb = mean_pool(out.last_hidden_state, batch["attention_mask"])
    return F.normalize(emb, dim=-1) if normalize else emb


@torch.no_grad()
def embed(model, tokenizer, texts: Sequence[str], batch_size: int = 64,
          max_length: int = DOC_MAX_TOKENS, normalize: bool = True,
          progress: bool | str = False) -> torch.Tensor:
    """Embed texts in batches without gradients; returns a float32 CPU tensor (len(texts), dim).

    Texts are batched in order of length, so each batch pads little (about 2x faster on CPU
    for code of mixed lengths), and the result is put back in the input order.
    """
    if isinstance(texts, str):
        raise TypeError("embed() takes a list of texts, not a single string: wrap it in [ ... ]")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    was_training = model.training
    model.eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
    chunks = []
    steps = range(0, len(order), batch_size)
    desc = progress if isinstance(progress, str) else "embedding"
    for start in tqdm(steps, desc=desc, disable=not progress):
        idx = order[start:start + batch_size]
        chunks.append(encode_batch(model, tokenizer, [texts[i] for i in idx], max_length,
                                   normalize).float().cpu())
    model.train(was_training)
    if not chunks:
        return torch.empty(0, model.config.hidden_size)
    stacked = torch.cat(chunks)
    result = torch.empty_like(stacked)
    result[torch.tensor(order)] = stacked
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
    if not isinstance(k, int) or k <= 0:
        raise ValueError(f"k must be a positive integer, got {k!r}")
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
                      batch_size: int = 64, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Query embeddings of ``pairs`` and document embeddings of the corpus: the pairs' own
    documents first (query i's document is row i), then the distractors."""
    queries = [p["query"] for p in pairs]
    docs = [p["document"] for p in pairs] + [d["document"] for d in distractors]
    q = embed(model, tokenizer, queries, batch_size, QUERY_MAX_TOKENS, progress=progress and "queries")
    d = embed(model, tokenizer, docs, batch_size, DOC_MAX_TOKENS, progress=progress and "documents")
    return q, d


def evaluate_code_search(model, tokenizer, pairs: Sequence[dict], distractors: Sequence[dict] = (),
                         ks: Sequence[int] = (1, 10), batch_size: int = 64,
                         progress: bool = False) -> dict:
    """Embed queries and documents (pairs' own documents, then distractors) and score them.

    Returns the metrics plus ``n_queries`` and ``n_docs`` so a reader knows the corpus size.
    """
    q, d = embed_code_search(model, tokenizer, pairs, distractors, batch_size, progress)
    metrics = retrieval_metrics(q, d, list(range(len(pairs))), ks)
    return {**metrics, "n_queries": len(q), "n_docs": len(d)}


# ---------------------------------------------------------------------------------------------
# The SmolLM2 instruction task: exact match and perplexity
# ---------------------------------------------------------------------------------------------
def normalize_answer(text: str) -> str:
    """Reduce a generated answer to a bare identifier.

    Takes the first backtick-quoted span if there is one (chat models like to write
    ``The function is `abspath`.``), else the first line; then drops quotes, trailing
    punctuation, a call's parentheses, and all but the last dotted component
    (``json.dumps()`` → ``dumps``). Nothing else is guessed: a sentence stays a sentence
    and does not match.
    """
    quoted = re.search(r"`([^`\n]+)`", text)
    line = quoted.group(1) if quoted else (text.strip().splitlines() or [""])[0]
    line = line.strip().strip("'\" ").rstrip(".:;,")
    line = re.sub(r"\(.*\)$", "", line).strip()
    return line.split(".")[-1].strip()


def exact_match(predictions: Sequence[str], answers: Sequence[str]) -> float:
    """Fraction of predictions whose normalised form equals the answer exactly (case-sensitive)."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions but {len(answers)} answers")
    if not answers:
        raise ValueError("exact_match of zero examples is undefined")
    return sum(normalize_answer(p) == a for p, a in zip(predictions, answers)) / len(answers)


def chat_prompt(tokenizer, instruction: str) -> str:
    """The instruction wrapped in the model's chat template, ending where the answer starts."""
    return tokenizer.apply_chat_template([{"role": "user", "content": instruction}],
                                         add_generation_prompt=True, tokenize=False)


@torch.no_grad()
def generate_answers(model, tokenizer, instructions: Sequence[str], max_new_tokens: int = 12,
                     batch_size: int = 16, progress: bool = False) -> list[str]:
    """Greedy answers to chat instructions, batched with left padding."""
    device = next(model.parameters()).device
    tokenizer.padding_side = "left"
    answers = []
    for start in tqdm(range(0, len(instructions), batch_size), desc="generating", disable=not progress):
        prompts = [chat_prompt(tokenizer, x) for x in instructions[start:start + batch_size]]
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        answers += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return answers


def answer_batch(tokenizer, instructions: Sequence[str], answers: Sequence[str],
                 max_length: int = 256) -> dict:
    """Tokenised chat prompt + answer + end-of-turn, with ``labels`` = -100 on the prompt and
    padding, so a causal-LM loss (and perplexity) counts only the answer tokens."""
    rows, labels = [], []
    for instruction, answer in zip(instructions, answers, strict=True):
        prompt = tokenizer(chat_prompt(tokenizer, instruction), add_special_tokens=False)["input_ids"]
        target = tokenizer(answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        ids = (prompt + target)[-max_length:]
        n_target = min(len(target), len(ids))
        rows.append(ids)
        labels.append([-100] * (len(ids) - n_target) + ids[-n_target:])
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    return {  # right padding: positions stay 0..n-1 for every row
        "input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
        "labels": torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels]),
    }


def answer_loss(model, tokenizer, rows: Sequence[dict]) -> torch.Tensor:
    """The training loss of one batch of instruction rows: next-token cross-entropy on the
    answer tokens only (the prompt is context, not target)."""
    device = next(model.parameters()).device
    batch = answer_batch(tokenizer, [r["instruction"] for r in rows], [r["answer"] for r in rows])
    return model(**{k: v.to(device) for k, v in batch.items()}).loss


@torch.no_grad()
def perplexity(model, tokenizer, instructions: Sequence[str], answers: Sequence[str],
               batch_size: int = 16) -> float:
    """exp(mean negative log-likelihood per answer token), prompt tokens excluded."""
    if not answers:
        raise ValueError("perplexity of zero examples is undefined")
    device = model_device(model)
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(answers), batch_size):
        batch = answer_batch(tokenizer, instructions[start:start + batch_size],
                             answers[start:start + batch_size])
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        shift_logits, shift_labels = logits[:, :-1].float(), batch["labels"][:, 1:]
        nll = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]),
                              shift_labels.reshape(-1), ignore_index=-100, reduction="sum")
        total_nll += nll.item()
        total_tokens += (shift_labels != -100).sum().item()
    return math.exp(total_nll / total_tokens)


@torch.no_grad()
def text_perplexity(model, tokenizer, texts: Sequence[str], max_length: int = 128, batch_size: int = 8) -> float:
    """exp(mean negative log-likelihood per predicted token) of plain ``texts`` under a causal LM.

    Each text is truncated to ``max_length`` tokens; every token after the first is predicted
    from those before it (padding excluded). This is the held-out-text perplexity used to
    compare quantized copies of one model (chapter 02).
    """
    if not texts:
        raise ValueError("perplexity of zero texts is undefined")
    device = model_device(model)
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(texts), batch_size):
        rows = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_length] for t in texts[start:start + batch_size]]
        if min(len(r) for r in rows) < 2:
            raise ValueError("every text needs at least two tokens to predict one")
        width, pad = max(len(r) for r in rows), tokenizer.pad_token_id
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        total_nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                     ignore_index=-100, reduction="sum").item()
        total_tokens += (labels != -100).sum().item()
    return math.exp(total_nll / total_tokens)
