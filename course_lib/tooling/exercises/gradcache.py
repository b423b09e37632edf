"""Chapter 03's build-it exercise: a GradCache step, checked against the whole batch's gradient.

The learner writes ``gradcache_step(encoder, queries, documents, chunk_size, scale) -> float``.
:func:`check_gradcache_step` gives it a small MLP with dropout (in training mode) and a batch of
pairs. The expected gradient is that of the in-batch-negatives loss written out with
``log_softmax``, back-propagated through an ordinary graph of the same chunks run in the same
order (query chunks, then document chunks) from the same seed, so the dropout masks are the same.

Three things are checked while the learner's step runs: the encoder never builds a graph on more
than ``chunk_size`` rows (a forward pre-hook on every layer records the rows of each call made
with gradients on), the activations saved for backward never exceed about two chunks' worth
(`course_lib.memory.SavedActivations`: keeping every chunk's graph until one backward is the
ordinary step's memory), and the step does not call course_lib's or sentence-transformers' step
or loss.
"""

from __future__ import annotations

import torch
from torch import nn

from ... import gradcache, memory, retrieval
from . import close, forbidden

N_PAIRS, N_FEATURES, HIDDEN, EMBED_DIM = 24, 16, 512, 8
CHUNK_SIZE, SCALE, DROPOUT = 4, 20.0, 0.2


def _encoder() -> nn.Module:
    return nn.Sequential(nn.Linear(N_FEATURES, HIDDEN), nn.Tanh(), nn.Dropout(DROPOUT), nn.Linear(HIDDEN, EMBED_DIM))


def _loss(q: torch.Tensor, d: torch.Tensor, scale: float) -> torch.Tensor:
    """-mean_i log softmax_j(scale cos(q_i, d_j)) at j = i, written out (no cross_entropy)."""
    cos = (q / q.norm(dim=1, keepdim=True)) @ (d / d.norm(dim=1, keepdim=True)).T
    return -torch.log_softmax(scale * cos, dim=1).diagonal().mean()


def _shortcuts() -> list[tuple[object, str]]:
    """course_lib's and sentence-transformers' GradCache steps and in-batch-negatives losses."""
    targets = [(gradcache, "gradcache_step"), (gradcache, "naive_step"), (gradcache, "code_search_step"),
               (gradcache, "contrastive_loss"), (gradcache, "in_batch_negatives_loss"),
               (retrieval, "in_batch_negatives_loss")]
    try:
        from sentence_transformers.sentence_transformer import losses
    except ImportError:                                   # sentence-transformers 5.x
        from sentence_transformers import losses
    cached, mnrl = losses.CachedMultipleNegativesRankingLoss, losses.MultipleNegativesRankingLoss
    for owner in (cached, *cached.__mro__[1:-2], mnrl):   # the class and its mixins, not Module/object
        for name in ("forward", "forward_cached", "calculate_loss", "calculate_loss_and_cache_gradients",
                     "compute_loss_from_embeddings"):
            if name in vars(owner):
                targets.append((owner, name))
    return targets


def _reference(encoder: nn.Module, queries, documents, chunk_size: int, scale: float) -> tuple[float, dict]:
    """The whole batch's loss and gradients: every chunk's graph kept, one backward."""
    embed = lambda x: torch.cat([encoder(x[i:i + chunk_size]) for i in range(0, len(x), chunk_size)])
    loss = _loss(embed(queries), embed(documents), scale)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in encoder.named_parameters()}
    encoder.zero_grad(set_to_none=True)
    return loss.item(), grads


def _saved_peak(encoder: nn.Module, fn) -> int:
    with memory.SavedActivations(encoder) as saved:
        fn()
    return saved.peak


def check_gradcache_step(learner_fn, seed: int = 0) -> None:
    """Check ``learner_fn(encoder, queries, documents, chunk_size, scale) -> float`` (a GradCache step).

    Raises :class:`~course_lib.tooling.exercises.ShortcutError` if it calls an existing GradCache
    step or in-batch-negatives loss, and AssertionError if its gradients or loss differ from the
    whole batch's, or if it runs the encoder with gradients on more than ``chunk_size`` rows or
    keeps more than about two chunks' activations alive. The caller's random state is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = _encoder().train()
        queries, documents = torch.randn(N_PAIRS, N_FEATURES), torch.randn(N_PAIRS, N_FEATURES)

        torch.manual_seed(seed + 1)                       # the dropout masks of the reference ...
        expected_loss, expected = _reference(encoder, queries, documents, CHUNK_SIZE, SCALE)
        chunk = queries[:CHUNK_SIZE]
        one_chunk = _saved_peak(encoder, lambda: encoder(chunk).sum().backward())
        q_leaf, d_leaf = (encoder(x).detach().requires_grad_() for x in (queries, documents))
        loss_graph = _saved_peak(encoder, lambda: _loss(q_leaf, d_leaf, SCALE).backward())
        encoder.zero_grad(set_to_none=True)
        allowed = 2 * one_chunk + loss_graph

        rows_with_grad = []

        def record(module, args):                         # the rows of every call that builds a graph
            if torch.is_grad_enabled() and args and isinstance(args[0], torch.Tensor):
                rows_with_grad.append(args[0].shape[0])
        hooks = [m.register_forward_pre_hook(record) for m in encoder.modules()]
        try:
            torch.manual_seed(seed + 1)                   # ... are the ones the learner's step draws
            with forbidden(*_shortcuts(), hint="write the three passes and the loss yourself"), \
                    memory.SavedActivations(encoder) as saved:
                got_loss = learner_fn(encoder, queries.clone(), documents.clone(), CHUNK_SIZE, SCALE)
        finally:
            for hook in hooks:
                hook.remove()

    if max(rows_with_grad, default=0) > CHUNK_SIZE:
        raise AssertionError(f"your step ran the encoder with gradients on {max(rows_with_grad)} rows at once, but "
                             f"chunk_size is {CHUNK_SIZE}: embed the whole batch under torch.no_grad() first, "
                             "then re-embed one chunk at a time with gradients")
    if not rows_with_grad:
        raise AssertionError("your step never ran the encoder with gradients on, so no gradient can reach its "
                             "parameters: the second pass re-embeds each chunk with gradients")
    if saved.peak > allowed:
        raise AssertionError(f"your step kept {saved.peak / one_chunk:.1f} chunks' worth of activations alive at "
                             "once: back-propagate each chunk's cached gradient (emb.backward(grad)) before "
                             "embedding the next chunk, so that only one chunk's graph exists at a time")
    try:
        got_loss = float(got_loss)
    except (TypeError, ValueError, RuntimeError):
        raise AssertionError(f"return the loss as a float (loss.item()), got {type(got_loss).__name__}") from None
    close("the returned loss", got_loss, expected_loss, atol=1e-5, rtol=1e-5)
    for name, p in encoder.named_parameters():
        if p.grad is None:
            raise AssertionError(f"encoder parameter {name} has no gradient: the second pass must call backward")
        try:
            close(f"the gradient of encoder parameter {name}", p.grad, expected[name], atol=1e-6, rtol=1e-5)
        except AssertionError as err:
            raise AssertionError(f"{err}. Are the chunks re-embedded in the same order (query chunks, then "
                                 "document chunks), each from the random state its first pass started from "
                                 "(dropout must draw the same masks), with the scale applied to the cosine "
                                 "similarities?") from None
