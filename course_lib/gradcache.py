"""GradCache: a contrastive step over a large batch in the memory of a small one.

An in-batch-negatives loss couples every query with every document of the batch, so the batch
cannot simply be split into independent pieces. Gao et al. (2021, "Scaling Deep Contrastive
Learning Batch Size under Memory Limited Setup") split the *step* instead:

1. embed every chunk of ``chunk_size`` queries and documents **without** an autograd graph,
   remembering the random state each chunk started from;
2. compute the loss on the whole batch of embeddings and its gradient with respect to each
   embedding (the embeddings are leaves: this graph is tiny);
3. embed each chunk again **with** a graph, under the random state remembered in step 1, and
   back-propagate the cached embedding gradients through it (``emb.backward(grad)``).

Only one chunk's activations are alive at a time, so memory is that of a ``chunk_size`` batch,
and the parameter gradients are exactly those of the loss over the whole batch. The price is a
second forward pass per chunk.

**Why the random state is restored.** With dropout on, the second pass must draw the *same*
dropout masks as the first: the cached gradients are the derivative of the loss at the first
pass's embeddings. Without restoring it, step 3 back-propagates those gradients through a
network with other masks, whose embeddings the loss never saw, and the result is the gradient
of no loss at all (``restore_rng=False`` shows it; the tests measure the error).

"The full batch's gradient" with dropout means: the gradient of the loss whose embeddings were
computed chunk by chunk in this order with these masks. `naive_step` computes exactly that with
an ordinary graph held for the whole batch, which is the memory GradCache saves.

Sentence-transformers implements the same method as ``CachedMultipleNegativesRankingLoss``; the
tests check that both give the same loss and gradients.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import torch

from . import retrieval
from .checks import optional_positive_int, positive_int
from .retrieval import in_batch_negatives_loss

Encoder = Callable[[object], torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

__all__ = ["GradCacheResult", "RandomState", "chunks", "code_search_step", "contrastive_loss", "gradcache_step",
           "naive_step"]


def contrastive_loss(scale: float = 20.0, symmetric: bool = False) -> LossFn:
    """The default loss: in-batch-negatives InfoNCE with ``scale`` = 1 / temperature.

    ``symmetric=True`` averages the query→document and document→query directions (CLIP's loss).
    """
    return partial(in_batch_negatives_loss, scale=scale, symmetric=symmetric)


class RandomState:
    """The CPU and CUDA random-number state at one moment, to be replayed later.

    ``with state:`` runs its body from that state and leaves the global state untouched
    afterwards (the body's draws do not advance the caller's generator).
    """

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        self._fork = None

    def __enter__(self) -> None:
        devices = list(range(torch.cuda.device_count())) if self.cuda is not None else []
        self._fork = torch.random.fork_rng(devices=devices)
        self._fork.__enter__()
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)

    def __exit__(self, *exc) -> None:
        self._fork.__exit__(*exc)
        self._fork = None


def _batch_size(inputs) -> int:
    if isinstance(inputs, torch.Tensor):
        return inputs.shape[0]
    if isinstance(inputs, Mapping):
        sizes = {v.shape[0] for v in inputs.values() if isinstance(v, torch.Tensor)}
        if len(sizes) != 1:
            raise ValueError(f"the tensors of a tokenized batch must share their first dimension, got sizes {sizes}")
        return sizes.pop()
    if isinstance(inputs, Sequence) and not isinstance(inputs, str):
        return len(inputs)
    raise TypeError("inputs must be a list of examples (e.g. strings), a tensor, or a tokenized batch "
                    f"(a dict of tensors), got {type(inputs).__name__}")


def _trim_padding(chunk: dict) -> dict:
    """Drop the trailing padding columns that every row of a tokenized chunk shares: a chunk of
    short texts is then embedded at its own width, not the whole batch's (the result is the same,
    since padded positions are masked)."""
    mask = chunk.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[0] == 0:
        return chunk
    used = mask.any(dim=0).nonzero()
    width = int(used.max()) + 1 if len(used) else 1
    return {k: v[:, :width] if isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape[1] == mask.shape[1] else v
            for k, v in chunk.items()}


def chunks(inputs, chunk_size: int) -> list:
    """Split a batch (list, tensor or tokenized dict of tensors) into consecutive chunks of
    ``chunk_size``; the last one is shorter when ``chunk_size`` does not divide the batch. A
    tokenized chunk loses the trailing padding columns it does not need (as sentence-transformers
    does), which saves time without changing any embedding."""
    positive_int("chunk_size", chunk_size)
    n = _batch_size(inputs)
    if isinstance(inputs, Mapping):
        return [_trim_padding({k: v[i:i + chunk_size] if isinstance(v, torch.Tensor) else v
                               for k, v in inputs.items()}) for i in range(0, n, chunk_size)]
    return [inputs[i:i + chunk_size] for i in range(0, n, chunk_size)]


def _embed(encoder: Encoder, chunk, amp: bool, device_type: str) -> torch.Tensor:
    context = torch.autocast(device_type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()
    with context:
        emb = encoder(chunk)
    if not isinstance(emb, torch.Tensor) or emb.dim() != 2:
        shape = tuple(emb.shape) if isinstance(emb, torch.Tensor) else type(emb).__name__
        raise ValueError(f"the encoder must return a 2-D tensor of embeddings (batch, dim), got {shape}; "
                         "pool the token vectors (e.g. retrieval.mean_pool) inside the encoder")
    return emb.float()


def _check_loss(loss: torch.Tensor) -> None:
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"the loss function must return a scalar tensor, got {shape}; reduce it (e.g. .mean())")


def _check_pairs(queries, documents) -> int:
    n_q, n_d = _batch_size(queries), _batch_size(documents)
    if n_q != n_d:
        raise ValueError(f"{n_q} queries and {n_d} documents: row i of each must form a pair, so the counts must match")
    if n_q == 0:
        raise ValueError("the batch is empty")
    return n_q


def _amp(amp: bool | None, encoder) -> tuple[bool, str]:
    params = list(encoder.parameters()) if hasattr(encoder, "parameters") else []
    device_type = params[0].device.type if params else ("cuda" if torch.cuda.is_available() else "cpu")
    return (device_type == "cuda") if amp is None else bool(amp), device_type


@dataclass
class GradCacheResult:
    """What one GradCache step computed: the loss value and the two embedding matrices (detached)."""
    loss: float
    query_embeddings: torch.Tensor
    document_embeddings: torch.Tensor
    n_chunks: int


def gradcache_step(query_encoder: Encoder, queries, documents, chunk_size: int, *,
                   doc_encoder: Encoder | None = None, loss_fn: LossFn | None = None,
                   loss_scale: float = 1.0, restore_rng: bool = True, amp: bool | None = None) -> GradCacheResult:
    """Accumulate into ``.grad`` the gradient of ``loss_fn`` over the whole batch, ``chunk_size`` at a time.

    ``query_encoder`` / ``doc_encoder`` map a chunk of inputs to a ``(chunk, dim)`` tensor (one
    shared encoder when ``doc_encoder`` is None). ``queries`` and ``documents`` are the batch:
    lists of strings, tensors, or tokenized dicts of tensors, row i of each forming a pair.
    ``loss_fn(query_emb, doc_emb)`` returns a scalar (default: `contrastive_loss()`, InfoNCE at
    scale 20). Gradients are *added* to the parameters' ``.grad`` multiplied by ``loss_scale``
    (e.g. ``1 / accumulation_steps``), as ``loss.backward()`` would; the caller zeroes them and
    steps the optimizer. ``amp`` computes the encoders in bfloat16 autocast (default: on CUDA
    only); the loss is always computed in float32.
    """
    doc_encoder = query_encoder if doc_encoder is None else doc_encoder
    loss_fn = contrastive_loss() if loss_fn is None else loss_fn
    _check_pairs(queries, documents)
    use_amp, device_type = _amp(amp, query_encoder)
    sides = [(query_encoder, chunks(queries, chunk_size)), (doc_encoder, chunks(documents, chunk_size))]

    # 1. embed every chunk without a graph, remembering where the random stream stood
    cached, states = [], []
    with torch.no_grad():
        for encoder, parts in sides:
            embs, rng = [], []
            for part in parts:
                rng.append(RandomState())
                embs.append(_embed(encoder, part, use_amp, device_type))
            cached.append(torch.cat(embs))
            states.append(rng)

    # 2. the loss on the whole batch, and its gradient with respect to every embedding
    q_emb, d_emb = (e.detach().requires_grad_(True) for e in cached)
    loss = loss_fn(q_emb, d_emb)
    _check_loss(loss)
    q_grad, d_grad = torch.autograd.grad(loss * loss_scale, [q_emb, d_emb])

    # 3. embed each chunk again with a graph, from the same random state, and push the cached gradient through
    for (encoder, parts), grads, rng in zip(sides, (q_grad, d_grad), states):
        start = 0
        for part, state in zip(parts, rng):
            with state if restore_rng else contextlib.nullcontext():
                emb = _embed(encoder, part, use_amp, device_type)
            emb.backward(grads[start:start + len(emb)])
            start += len(emb)
    return GradCacheResult(loss.item(), q_emb.detach(), d_emb.detach(), sum(len(p) for _, p in sides))


def naive_step(query_encoder: Encoder, queries, documents, *, chunk_size: int | None = None,
               doc_encoder: Encoder | None = None, loss_fn: LossFn | None = None, loss_scale: float = 1.0,
               amp: bool | None = None) -> GradCacheResult:
    """The ordinary step GradCache replaces: embed with a graph, loss, ``backward``.

    With ``chunk_size`` the encoders still run chunk by chunk (so dropout draws the same masks as
    `gradcache_step` from the same seed) but every chunk's graph is kept until the backward pass:
    the memory of the whole batch, which is what GradCache avoids.
    """
    doc_encoder = query_encoder if doc_encoder is None else doc_encoder
    loss_fn = contrastive_loss() if loss_fn is None else loss_fn
    n = _check_pairs(queries, documents)
    use_amp, device_type = _amp(amp, query_encoder)
    size = n if chunk_size is None else chunk_size
    q_parts, d_parts = chunks(queries, size), chunks(documents, size)
    q_emb = torch.cat([_embed(query_encoder, p, use_amp, device_type) for p in q_parts])
    d_emb = torch.cat([_embed(doc_encoder, p, use_amp, device_type) for p in d_parts])
    loss = loss_fn(q_emb, d_emb)
    _check_loss(loss)
    (loss * loss_scale).backward()
    return GradCacheResult(loss.item(), q_emb.detach(), d_emb.detach(), len(q_parts) + len(d_parts))


def code_search_step(tokenizer, chunk_size: int | None = None, loss_fn: LossFn | None = None,
                     group_size: int | None = None):
    """The training step of a code-search encoder, as a ``loss_fn`` for `course_lib.train.train`
    with ``loss_fn_does_backward=True``: ``step(model, rows, loss_scale) -> loss value``.

    Queries are embedded at ``retrieval.QUERY_MAX_TOKENS`` and documents at
    ``retrieval.DOC_MAX_TOKENS`` by the same model; ``loss_fn`` defaults to InfoNCE at scale 20
    (pass a `course_lib.matryoshka.MatryoshkaLoss` for MRL). With ``chunk_size`` the step is a
    GradCache step, otherwise the ordinary one: the same gradient, different memory. With
    ``group_size`` the encoder runs on groups of texts of similar length, each padded to its own
    longest (`retrieval.encode_batch`): less padding, the same embeddings up to float rounding.
    """
    optional_positive_int("chunk_size", chunk_size, "None: the ordinary step")
    optional_positive_int("group_size", group_size, "None: one group, padded to the batch's longest text")

    def step(model, rows, loss_scale: float = 1.0) -> float:
        queries, documents = [r["query"] for r in rows], [r["document"] for r in rows]
        encode_q = partial(retrieval.encode_batch, model, tokenizer, max_length=retrieval.QUERY_MAX_TOKENS,
                           group_size=group_size)
        encode_d = partial(retrieval.encode_batch, model, tokenizer, max_length=retrieval.DOC_MAX_TOKENS,
                           group_size=group_size)
        if chunk_size is None:
            return naive_step(encode_q, queries, documents, doc_encoder=encode_d, loss_fn=loss_fn,
                              loss_scale=loss_scale).loss
        return gradcache_step(encode_q, queries, documents, chunk_size, doc_encoder=encode_d, loss_fn=loss_fn,
                              loss_scale=loss_scale).loss

    return step
