"""Beyond one device: N processes share one batch and one model, with PyTorch's own engines.

1. **Processes** (`course_lib.processes`, re-exported here). `launch` runs ``fn(rank, world_size,
   *args)`` in N processes joined in a process group (gloo on CPU, NCCL on GPUs) and returns their
   results; a hang fails after ``timeout`` seconds, a child's exception comes back with its rank.
   The same ``fn`` runs under ``torchrun --nproc_per_node N script.py`` or ``accelerate launch
   --multi_gpu --num_processes N script.py`` when the script calls it as ``fn(*init_from_env())``.
2. **Gathering.** Each process holds ``B / N`` pairs, so an in-batch-negatives loss would see
   ``B / N - 1`` negatives per query. `gather_with_grad` all-gathers the embeddings
   (``torch.distributed.nn.functional.all_gather``: its backward hands each rank the gradient of
   its own slice) and `contrastive_loss_across_processes` scores each local query against the
   documents of every rank, as sentence-transformers' ``MultipleNegativesRankingLoss
   (gather_across_devices=True)`` does; with `gradcache_step_across_processes`, N processes ×
   GradCache chunks compute one large batch's exact gradient.
3. **Sharding.** `shard` gives ZeRO's stages with PyTorch's engines: ``"ddp"`` (ZeRO-0),
   ``"optimizer"`` (ZeRO-1, ``ZeroRedundancyOptimizer``), ``"grad_op"`` and ``"full"`` (ZeRO-2-like
   and ZeRO-3: FSDP2 ``fully_shard`` per decoder layer, then the root, with
   ``reshard_after_forward`` False / True). `state_bytes` counts what one rank holds, exactly, on
   its local shards (``DTensor.to_local()``).

**Why no factor of N in the gathered loss.** Rank r's loss is the mean over its ``B / N`` queries;
through the all-gather's backward its embeddings also receive the gradients of the other ranks'
losses, so its parameter gradient is N × its share of the full-batch gradient. DDP (and
`average_gradients`) *average* the N ranks: exactly the full batch's gradient. (Summing them
instead would need ``loss / N``.)
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor

from . import gradcache
from .checks import one_of, positive_int
from .processes import current_device, free_port, init_from_env, launch, rank_and_world
from .retrieval import in_batch_negatives_loss

__all__ = ["STRATEGIES", "average_gradients", "contrastive_loss_across_processes", "current_device",
           "decoder_layers", "free_port", "full_parameters", "gather_with_grad", "gradcache_step_across_processes",
           "init_from_env", "launch", "local_rows", "make_optimizer", "mean_over_processes", "rank_and_world",
           "shard", "state_bytes", "train_step"]


# ---------------------------------------------------------------------------------------------
# Data parallel: shards of a batch, gathered embeddings, the contrastive loss over all ranks
# ---------------------------------------------------------------------------------------------
def local_rows(batch, rank: int | None = None, world_size: int | None = None):
    """This rank's contiguous share of a global batch (a list, a tensor, or a dict of tensors):
    rows ``rank·b .. (rank+1)·b`` with ``b = B / world_size``, the order the gathered loss's labels
    assume. Every rank must get the same number of rows: otherwise their gradients would be
    averaged with unequal weights and the gathered tensors would not line up."""
    rank = rank_and_world()[0] if rank is None else rank
    world = rank_and_world()[1] if world_size is None else positive_int("world_size", world_size)
    n = len(next(iter(batch.values()))) if isinstance(batch, dict) else len(batch)
    if n < world:
        raise ValueError(f"a global batch of {n} rows cannot feed {world} processes (each needs at least one row): "
                         f"use at most {n} processes or a batch of at least {world} rows")
    if n % world:
        raise ValueError(f"a global batch of {n} rows does not split evenly over {world} processes "
                         f"({n} % {world} = {n % world}): use a batch of {n - n % world} or {n + world - n % world} "
                         "rows (drop_last), so that every rank holds the same number")
    b = n // world
    if isinstance(batch, dict):
        return {k: v[rank * b:(rank + 1) * b] for k, v in batch.items()}
    return batch[rank * b:(rank + 1) * b]


def _check_same_shape(t: torch.Tensor, world: int) -> None:
    shape = torch.tensor([t.dim(), *t.shape, *[0] * (7 - t.dim())][:8], device=t.device)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape)
    if any(not torch.equal(s, shapes[0]) for s in shapes):
        sizes = [tuple(s[1:1 + int(s[0])].tolist()) for s in shapes]
        raise ValueError(f"every rank must gather a tensor of the same shape, got {sizes} by rank: give each "
                         "process the same number of rows (local_rows splits a batch evenly)")


class _GatherWithGrad(torch.autograd.Function):
    """All-gather forward; backward: every rank's gradient of the whole gathered tensor, summed
    over the ranks (each rank's loss used every slice), and this rank keeps its own slice."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.rows = dist.get_rank(), len(t)
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)        # sum over ranks (gloo has no reduce_scatter)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Every rank's ``t`` concatenated along dim 0 (rank 0's rows first), differentiable: the
    backward pass sums each slice's gradient over the ranks and hands it to the rank that owns
    the slice (the same as ``torch.distributed.nn.functional.all_gather``, which torch 2.13
    deprecates; the tests compare the two). All ranks must call it, with tensors of one shape.
    Outside a process group, or with one process, it returns ``t`` itself."""
    world = rank_and_world()[1]
    if world == 1:
        return t
    _check_same_shape(t, world)
    return _GatherWithGrad.apply(t)


def contrastive_loss_across_processes(query_emb: torch.Tensor, doc_emb: torch.Tensor, scale: float = 20.0,
                                      gather: bool = True, symmetric: bool = False) -> torch.Tensor:
    """In-batch-negatives InfoNCE (`retrieval.in_batch_negatives_loss`) when the batch is split
    over processes; row i of each rank's ``query_emb`` matches row i of its ``doc_emb``.

    ``gather=True``: each local query is scored against the documents of *all* ranks (its
    positive at ``rank · b + i``); ``symmetric`` adds each local document against all queries. The
    loss is the mean over local rows, as in sentence-transformers' ``MultipleNegativesRankingLoss
    (gather_across_devices=True)`` (which gathers the queries too, but uses only the local ones
    unless symmetric); under DDP's averaging its gradient is the full batch's (module docstring).
    ``gather=False``: the local batch only, ``b - 1`` negatives per query: another, weaker loss.
    One process: the ordinary loss.
    """
    if query_emb.shape != doc_emb.shape or query_emb.dim() != 2 or len(query_emb) == 0:
        raise ValueError(f"queries {tuple(query_emb.shape)} and documents {tuple(doc_emb.shape)} must be two "
                         "non-empty (rows, dim) matrices of the same shape; row i of each forms a pair")
    rank, world = rank_and_world()
    if not gather or world == 1:
        return in_batch_negatives_loss(query_emb, doc_emb, scale=scale, symmetric=symmetric)
    b = len(query_emb)
    labels = torch.arange(rank * b, (rank + 1) * b, device=query_emb.device)
    q, d = F.normalize(query_emb, dim=-1), F.normalize(doc_emb, dim=-1)
    loss = F.cross_entropy(scale * q @ gather_with_grad(d).T, labels)
    if symmetric:
        loss = (loss + F.cross_entropy(scale * d @ gather_with_grad(q).T, labels)) / 2
    return loss


def gradcache_step_across_processes(query_encoder, queries, documents, chunk_size: int, *, doc_encoder=None,
                                    scale: float = 20.0, symmetric: bool = False, loss_scale: float = 1.0,
                                    restore_rng: bool = True, amp: bool | None = None) -> gradcache.GradCacheResult:
    """`course_lib.gradcache.gradcache_step` on this rank's pairs, with the loss gathered over all
    ranks: N processes × chunks give the gradient of one batch of ``N · len(queries)`` pairs; only
    embeddings travel, never activations. Follow it with `average_gradients` (or DDP, ``no_sync``
    for all but the last backward). The loss returned is this rank's (`mean_over_processes`)."""
    loss_fn = partial(contrastive_loss_across_processes, scale=scale, gather=True, symmetric=symmetric)
    return gradcache.gradcache_step(query_encoder, queries, documents, chunk_size, doc_encoder=doc_encoder,
                                    loss_fn=loss_fn, loss_scale=loss_scale, restore_rng=restore_rng, amp=amp)


def average_gradients(model: nn.Module) -> None:
    """What DDP does after ``backward``: replace every ``.grad`` by its mean over the ranks."""
    world = rank_and_world()[1]
    for p in model.parameters():
        if p.grad is not None and world > 1:
            dist.all_reduce(p.grad)
            p.grad /= world


def mean_over_processes(value) -> float:
    """The mean of a number (or scalar tensor) over the ranks: the full batch's loss when every
    rank reports its local mean over equally many rows. (gloo has no AVG: SUM, then divide.)"""
    world = rank_and_world()[1]
    t = torch.as_tensor(value, dtype=torch.float64).detach().clone().to(current_device())
    if world > 1:
        dist.all_reduce(t)
    return t.item() / world


# ---------------------------------------------------------------------------------------------
# Sharded training: ZeRO's stages with DDP, ZeroRedundancyOptimizer and FSDP2
# ---------------------------------------------------------------------------------------------
STRATEGIES = {
    "ddp": "ZeRO-0: every rank holds all parameters, gradients and optimizer state; DDP averages gradients",
    "optimizer": "ZeRO-1: DDP + ZeroRedundancyOptimizer: each rank keeps the optimizer state of its share",
    "grad_op": "ZeRO-2-like: FSDP2 shards everything at rest, keeps parameters gathered from forward to backward",
    "full": "ZeRO-3: FSDP2 shards parameters, gradients and optimizer state, gathering each layer when used",
}


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks (a transformers model lists their class in ``_no_split_modules``:
    ``LlamaDecoderLayer``, ``BertLayer``), the units FSDP gathers one at a time."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(model).__name__} names no repeated block in _no_split_modules; pass "
                         "layers=[...] (e.g. model.model.layers) to shard()")
    return layers


def shard(model: nn.Module, strategy: str = "full", *, layers: list[nn.Module] | None = None) -> nn.Module:
    """Prepare ``model`` (already on this rank, identical on every rank) for data-parallel training.

    ``"ddp"`` / ``"optimizer"`` wrap it in ``DistributedDataParallel`` (use `make_optimizer`,
    which gives ``"optimizer"`` a ``ZeroRedundancyOptimizer``); ``"grad_op"`` / ``"full"`` apply
    FSDP2's ``fully_shard`` to each of ``layers`` (default `decoder_layers`) and then to the root,
    in place: every parameter becomes a ``DTensor`` of which this rank stores 1/N along dim 0.
    Works for a full fine-tune and for a LoRA model (frozen and trainable parameters may share a
    layer in FSDP2). The strategy is recorded as ``model.sharding_strategy``. Returns the model.
    """
    one_of("strategy", strategy, STRATEGIES)
    world = rank_and_world()[1]
    if not dist.is_initialized():
        raise RuntimeError("shard() needs a process group: call it inside a function run by "
                           "course_lib.distributed.launch, or after init_from_env() under torchrun")
    device = current_device()
    model.to(device)
    if strategy in ("ddp", "optimizer"):
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.index is not None
                                                      else None)
        wrapped.sharding_strategy = strategy
        return wrapped
    mesh = init_device_mesh(device.type, (world,))
    for layer in decoder_layers(model) if layers is None else layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=strategy == "full")
    fully_shard(model, mesh=mesh, reshard_after_forward=strategy == "full")
    model.sharding_strategy = strategy
    return model


def make_optimizer(model: nn.Module, lr: float = 1e-3, **adamw_kwargs) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; after ``shard(model, "optimizer")`` a ZeroRedundancyOptimizer
    around AdamW (each rank keeps the state of, and updates, its share of the parameters, then broadcasts)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameter (requires_grad): nothing to optimize")
    if getattr(model, "sharding_strategy", None) == "optimizer":
        return ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW, lr=lr, **adamw_kwargs)
    return torch.optim.AdamW(params, lr=lr, **adamw_kwargs)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn, batch,
               max_grad_norm: float | None = None) -> float:
    """One optimizer step on this rank's ``batch``: ``loss_fn(model, batch)``, backward (the engine
    averages gradients over the ranks), optional clipping of the global gradient norm, step.
    Returns the loss averaged over the ranks (the global batch's loss for equal shards)."""
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model, batch)
    loss.backward()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_grad_norm)
    optimizer.step()
    return mean_over_processes(loss.detach())


def _bytes(tensors) -> int:
    local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in local)


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes this rank holds now: ``parameters`` (as registered at this moment: sharded at rest,
    whole between forward and backward under ``"grad_op"``), ``gradients`` and ``optimizer`` state
    (a ``ZeroRedundancyOptimizer`` holds only its share), counted on the local shards."""
    params = list(model.parameters())   # each tensor once: tied weights are not counted twice
    state = getattr(optimizer, "optim", optimizer).state if optimizer is not None else {}   # ZeRO: its local optim
    return {"parameters": _bytes(params), "gradients": _bytes(p.grad for p in params),
            "optimizer": _bytes(v for s in state.values() for v in s.values())}


def full_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter whole, on the CPU, by its name in the unwrapped model. Under FSDP this is a
    collective (each ``DTensor.full_tensor()`` gathers the shards): call it on every rank."""
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu().clone()
            for name, p in inner.named_parameters()}
