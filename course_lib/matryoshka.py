"""Matryoshka embeddings: one vector whose prefixes are good vectors too.

An ordinary encoder spreads what it knows over all 384 numbers of its embedding; cut the vector
to its first 64 and retrieval collapses. Kusupati et al. (2022, "Matryoshka Representation
Learning") train it so that it does not: the loss is a weighted sum of the *same* contrastive loss
computed on nested prefixes of the embedding,

    L = Σ_m  w_m · loss(q[:, :d_m], doc[:, :d_m])      for d_1 > d_2 > … (e.g. 384, 256, …, 32),

each prefix re-normalised to unit length. The network is unchanged and a step costs one forward
pass (the prefixes are slices of the same output); only the loss knows about the nesting.
`MatryoshkaLoss` is that sum around any ``loss_fn(query_emb, doc_emb) -> scalar``, so it also
serves as the ``loss_fn`` of `course_lib.gradcache.gradcache_step`.

What it buys is at search time. A prefix is a smaller index (`build_index`: 4·d bytes per
vector in float32, d + 4 in int8, d/8 in sign bits), and **two-stage search** (`two_stage_search`)
gets most of the full model's quality from it: score the whole corpus cheaply at a short prefix,
keep the best ``k`` as a shortlist, and re-rank only those ``k`` at full dimension. With ``k``
equal to the corpus the re-rank sees everything and the result *is* full-dimension search; the
question a chapter measures is how small ``k`` and the prefix can be before recall drops.

Conventions: nested dimensions may be given in any order and are kept largest first (as
sentence-transformers' ``MatryoshkaLoss`` sorts them), each weight travelling with its
dimension; a dimension listed twice is an error. The weights are used as given (a plain weighted
sum, not an average), as in sentence-transformers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .checks import positive_int
from .retrieval import _check_k, in_batch_negatives_loss, recall_at_k, retrieval_metrics

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
INDEX_TYPES = ("float32", "int8", "binary")
MINILM_DIMS = (384, 256, 128, 64, 32)

__all__ = ["INDEX_TYPES", "EmbeddingIndex", "MatryoshkaLoss", "TwoStageIndex", "TwoStageResult", "build_index", "check_dims",
           "matryoshka_loss", "metrics_by_dim", "shortlist_ranks", "truncate", "two_stage_recall",
           "two_stage_search"]


# ---------------------------------------------------------------------------------------------
# Nested dimensions and truncation
# ---------------------------------------------------------------------------------------------
def check_dims(matryoshka_dims: Sequence[int]) -> tuple[int, ...]:
    """The nested dimensions, validated and sorted largest first."""
    dims = tuple(matryoshka_dims)
    if not dims:
        raise ValueError("matryoshka_dims is empty: give at least one dimension, e.g. (384, 256, 128, 64)")
    for d in dims:
        positive_int("each of matryoshka_dims", d, f"in {dims}")
    repeated = sorted({d for d in dims if dims.count(d) > 1})
    if repeated:
        raise ValueError(f"matryoshka_dims lists {repeated} more than once: give each nested dimension once")
    return tuple(sorted(dims, reverse=True))


def truncate(emb: torch.Tensor, dim: int, normalize: bool = True) -> torch.Tensor:
    """The first ``dim`` numbers of each embedding, re-scaled to unit length (``normalize=True``).

    A unit vector's prefix is shorter than 1, by a different amount for each vector, so cosine
    similarity and dot products of prefixes only agree once they are re-normalised.
    """
    positive_int("the truncation dimension", dim)
    if dim > emb.shape[-1]:
        raise ValueError(f"dimension {dim} is larger than the embedding's {emb.shape[-1]}: "
                         f"use dimensions <= {emb.shape[-1]}")
    prefix = emb[..., :dim]
    return F.normalize(prefix, dim=-1) if normalize else prefix


def metrics_by_dim(query_emb: torch.Tensor, doc_emb: torch.Tensor, relevant: Sequence[int],
                   dims: Sequence[int], ks: Sequence[int] = (1, 10)) -> dict[int, dict]:
    """`course_lib.retrieval.retrieval_metrics` (recall@k, MRR) with queries and documents both
    truncated to each of ``dims`` and re-normalised: how retrieval degrades as the vector shrinks."""
    return {d: retrieval_metrics(truncate(query_emb, d), truncate(doc_emb, d), relevant, ks) for d in dims}


# ---------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------
class MatryoshkaLoss:
    """``Σ_m w_m · base_loss(truncate(q, d_m), truncate(doc, d_m))``: a callable ``(q, doc) -> scalar``.

    ``base_loss`` defaults to `course_lib.retrieval.in_batch_negatives_loss` (InfoNCE at scale 20,
    sentence-transformers' ``MultipleNegativesRankingLoss``). ``matryoshka_weights`` default to 1
    each. A dimension larger than the embeddings is reported when the loss is called.
    """

    def __init__(self, base_loss: LossFn | None = None, matryoshka_dims: Sequence[int] = MINILM_DIMS,
                 matryoshka_weights: Sequence[float] | None = None) -> None:
        given = tuple(matryoshka_dims)
        weights = [1.0] * len(given) if matryoshka_weights is None else list(matryoshka_weights)
        if len(weights) != len(given):
            raise ValueError(f"got {len(weights)} matryoshka_weights for {len(given)} matryoshka_dims: "
                             "give one weight per dimension, or None for all 1")
        dims = check_dims(given)
        by_dim = dict(zip(given, weights))
        self.base_loss = in_batch_negatives_loss if base_loss is None else base_loss
        self.matryoshka_dims = dims
        self.matryoshka_weights = tuple(float(by_dim[d]) for d in dims)

    def per_dim(self, query_emb: torch.Tensor, doc_emb: torch.Tensor) -> dict[int, torch.Tensor]:
        """The unweighted base loss at each nested dimension (what a chapter plots)."""
        return {d: self.base_loss(truncate(query_emb, d), truncate(doc_emb, d)) for d in self.matryoshka_dims}

    def __call__(self, query_emb: torch.Tensor, doc_emb: torch.Tensor) -> torch.Tensor:
        losses = self.per_dim(query_emb, doc_emb)
        return sum(w * losses[d] for d, w in zip(self.matryoshka_dims, self.matryoshka_weights))

    def __repr__(self) -> str:
        name = getattr(self.base_loss, "__name__", type(self.base_loss).__name__)
        return (f"MatryoshkaLoss({name}, matryoshka_dims={self.matryoshka_dims}, "
                f"matryoshka_weights={self.matryoshka_weights})")


def matryoshka_loss(base_loss: LossFn | None = None, matryoshka_dims: Sequence[int] = MINILM_DIMS,
                    matryoshka_weights: Sequence[float] | None = None) -> MatryoshkaLoss:
    """The functional spelling of `MatryoshkaLoss`, beside `course_lib.gradcache.contrastive_loss`."""
    return MatryoshkaLoss(base_loss, matryoshka_dims, matryoshka_weights)


# ---------------------------------------------------------------------------------------------
# Indexes: the corpus at one prefix length, stored in float32, int8 or sign bits
# ---------------------------------------------------------------------------------------------
_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def _pack_signs(emb: torch.Tensor) -> torch.Tensor:
    """One bit per number (1 where > 0), eight to a byte, first number in the high bit."""
    bits = (emb > 0).to(torch.uint8)
    bits = F.pad(bits, (0, -bits.shape[1] % 8)).reshape(len(bits), -1, 8)
    return (bits * _BIT_WEIGHTS).sum(-1, dtype=torch.uint8)


def _unpack_signs(codes: torch.Tensor, dim: int) -> torch.Tensor:
    """The ±1 vectors that `_pack_signs` stored."""
    bits = (codes[..., None] & _BIT_WEIGHTS) > 0
    return bits.reshape(len(codes), -1)[:, :dim].float() * 2 - 1


@dataclass
class EmbeddingIndex:
    """A corpus of unit vectors at ``dim`` numbers, stored as ``kind``:

    * ``"float32"``: the vectors, 4·dim bytes each; scores are cosine similarities.
    * ``"int8"``: per-vector absmax quantisation: ``codes = round(127 · v / max|v|)`` plus one
      float32 ``scale = max|v| / 127`` per vector, dim + 4 bytes each. A float query is scored
      against ``codes · scale`` (asymmetric: only the corpus is quantised).
    * ``"binary"``: the sign of each number, ceil(dim / 8) bytes each. The query is reduced to
      signs too and the score is the dot product of the ±1 vectors, ``dim - 2·Hamming distance``
      (what XOR + popcount computes in a real binary index).
    """
    kind: str
    dim: int
    codes: torch.Tensor
    scales: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of storage: the codes plus the int8 scales."""
        extra = 0 if self.scales is None else self.scales.numel() * self.scales.element_size()
        return self.codes.numel() * self.codes.element_size() + extra

    def scores(self, query_emb: torch.Tensor) -> torch.Tensor:
        """(queries, documents) similarity of each query, truncated to ``dim``, to every vector."""
        q = truncate(query_emb.float(), self.dim)
        if self.kind == "float32":
            return q @ self.codes.T
        if self.kind == "int8":
            return (q @ self.codes.float().T) * self.scales
        return torch.where(q > 0, 1.0, -1.0) @ _unpack_signs(self.codes, self.dim).T


def _check_index_type(index: str) -> None:
    if index not in INDEX_TYPES:
        raise ValueError(f"unknown index type {index!r}: use one of {', '.join(map(repr, INDEX_TYPES))}")


def build_index(doc_emb: torch.Tensor, dim: int | None = None, index: str = "float32") -> EmbeddingIndex:
    """Store the corpus at its first ``dim`` numbers (default: all), re-normalised, as ``index``."""
    _check_index_type(index)
    dim = doc_emb.shape[-1] if dim is None else dim
    docs = truncate(doc_emb.float(), dim)
    if index == "float32":
        return EmbeddingIndex(index, dim, docs.contiguous())
    if index == "int8":
        scales = docs.abs().amax(dim=1).clamp(min=1e-12) / 127
        return EmbeddingIndex(index, dim, torch.round(docs / scales[:, None]).to(torch.int8), scales)
    return EmbeddingIndex(index, dim, _pack_signs(docs))


# ---------------------------------------------------------------------------------------------
# Two-stage search and its recall
# ---------------------------------------------------------------------------------------------
@dataclass
class TwoStageResult:
    """``indices``: the ``top`` documents of each query, best first; ``ranking``: the whole
    shortlist of ``k`` in full-dimension order, with its cosine ``scores``; ``index_bytes``: the
    size of the shortlist index; ``n_docs``: the corpus size."""
    indices: torch.Tensor
    ranking: torch.Tensor
    scores: torch.Tensor
    index_bytes: int
    n_docs: int


class TwoStageIndex:
    """A corpus ready for two-stage search, built once: the ``shortlist`` index (the documents at
    ``shortlist_dim``, stored as ``index``) and the ``full`` float32 unit vectors for re-ranking.

    `search` shortlists ``k`` documents per query from the small index, then re-ranks only those
    by full-dimension cosine similarity: the first stage reads the small index, the second
    ``k`` full vectors per query.
    """

    def __init__(self, doc_emb: torch.Tensor, shortlist_dim: int, index: str = "float32") -> None:
        _check_index_type(index)
        self.shortlist = build_index(doc_emb, shortlist_dim, index)
        self.full = F.normalize(doc_emb.float(), dim=-1)

    @property
    def n_docs(self) -> int:
        return self.full.shape[0]

    def first_stage(self, query_emb: torch.Tensor, k: int) -> torch.Tensor:
        """Stage 1 alone: the ``k`` best documents of each query in the shortlist index (unordered
        by full-dimension score). Its cost, a (queries, documents) score matrix at ``shortlist_dim``
        and a top-k over each row, bounds how much faster than brute force the search can be."""
        self._check_query(query_emb)
        _check_k(k, self.n_docs)
        return self.shortlist.scores(query_emb).topk(k, dim=1).indices

    def _check_query(self, query_emb: torch.Tensor) -> None:
        if query_emb.shape[-1] != self.full.shape[-1]:
            raise ValueError(f"query dim {query_emb.shape[-1]} != document dim {self.full.shape[-1]}: "
                             "embed both with the same model")

    def search(self, query_emb: torch.Tensor, k: int, top: int = 10, query_batch: int = 64) -> TwoStageResult:
        """The ``top`` documents of each query (and the whole re-ranked shortlist of ``k``).
        Queries go through both stages ``query_batch`` at a time to bound memory."""
        self._check_query(query_emb)
        _check_k(k, self.n_docs)
        if positive_int("top", top) > k:
            raise ValueError(f"top={top!r} results cannot come from a shortlist of k={k}: use 1 <= top <= k")
        positive_int("query_batch", query_batch)
        unit = F.normalize(query_emb.float(), dim=-1)
        rankings, all_scores = [], []
        for start in range(0, len(query_emb), query_batch):
            q = query_emb[start:start + query_batch]
            shortlist = self.first_stage(q, k)                                      # stage 1: small index
            # stage 2: the k full vectors of each query's shortlist (index_select: the same rows as
            # self.full[shortlist], with less work per call), scored at full dimension
            shortlisted = self.full.index_select(0, shortlist.flatten()).view(len(q), k, -1)
            fine = torch.einsum("qd,qkd->qk", unit[start:start + query_batch], shortlisted)
            scores, order = fine.sort(dim=1, descending=True)
            rankings.append(shortlist.gather(1, order))
            all_scores.append(scores)
        if not rankings:
            ranking, scores = torch.empty(0, k, dtype=torch.long), torch.empty(0, k)
        elif len(rankings) == 1:                # one batch (one query, say): no copy
            ranking, scores = rankings[0], all_scores[0]
        else:
            ranking, scores = torch.cat(rankings), torch.cat(all_scores)
        return TwoStageResult(ranking[:, :top], ranking, scores, self.shortlist.nbytes, self.n_docs)


def two_stage_search(query_emb: torch.Tensor, doc_emb: torch.Tensor, k: int, shortlist_dim: int,
                     top: int = 10, index: str = "float32", query_batch: int = 64) -> TwoStageResult:
    """Shortlist ``k`` documents per query at ``shortlist_dim`` from an ``index`` of that size,
    then re-rank the shortlist by full-dimension float32 cosine similarity (`TwoStageIndex`,
    built and searched once; build the index yourself to search it many times)."""
    if query_emb.shape[-1] != doc_emb.shape[-1]:
        raise ValueError(f"query dim {query_emb.shape[-1]} != document dim {doc_emb.shape[-1]}: "
                         "embed both with the same model")
    return TwoStageIndex(doc_emb, shortlist_dim, index).search(query_emb, k, top, query_batch)


def shortlist_ranks(ranking: torch.Tensor, relevant: Sequence[int], n_docs: int) -> torch.Tensor:
    """1-based position of each query's relevant document in its ranked shortlist, or
    ``n_docs + 1`` (a rank no recall@k counts) when the shortlist missed it."""
    rel = torch.as_tensor(list(relevant), dtype=torch.long)
    if len(rel) != len(ranking):
        raise ValueError(f"{len(ranking)} queries but {len(rel)} relevant indices: give one per query")
    hits = ranking == rel[:, None]
    position = hits.float().argmax(dim=1) + 1
    return torch.where(hits.any(dim=1), position, torch.full_like(position, n_docs + 1))


def two_stage_recall(result: TwoStageResult, relevant: Sequence[int], ks: Sequence[int] = (1, 10)) -> dict:
    """recall@k of a two-stage search for each k (one relevant document per query), through
    `course_lib.retrieval.recall_at_k`. Each k must fit in the shortlist, the only ranks known."""
    k_short = result.ranking.shape[1]
    for k in ks:
        if isinstance(k, int) and k > k_short:
            raise ValueError(f"recall@{k} needs ranks beyond the shortlist of {k_short}: "
                             f"use ks <= {k_short}, or search with a larger k")
    ranks = shortlist_ranks(result.ranking, relevant, result.n_docs)
    return {f"recall@{k}": recall_at_k(ranks, k, result.n_docs) for k in ks}
