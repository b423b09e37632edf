"""Beyond one device: N processes share one batch and one model, with PyTorch's own engines.

1. **Processes.** `launch` runs ``fn(rank, world_size, *args)`` in N processes joined in a process
   group (gloo on CPU, NCCL on GPUs) and returns their results; a hang fails after ``timeout``
   seconds, a child's exception comes back with its rank. The same ``fn`` runs under ``torchrun
   --nproc_per_node N script.py`` or ``accelerate launch --multi_gpu --num_processes N script.py``
   when the script calls it as ``fn(*init_from_env())``.
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

import importlib
import os
import pickle
import re
import socket
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from functools import partial, reduce
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor
from torch.multiprocessing.spawn import ProcessException

from . import gradcache
from .checks import one_of, positive_int, positive_number
from .retrieval import in_batch_negatives_loss

__all__ = ["STRATEGIES", "average_gradients", "contrastive_loss_across_processes", "current_device",
           "decoder_layers", "free_port", "full_parameters", "gather_with_grad", "gradcache_step_across_processes",
           "init_from_env", "launch", "local_rows", "make_optimizer", "mean_over_processes", "rank_and_world",
           "shard", "state_bytes", "train_step"]


# ---------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------
def free_port(port: int | None = None) -> int:
    """A TCP port on 127.0.0.1 that is free now: ``port`` itself (a ``ValueError`` if it is in use)
    or, with ``None``, one the system picks (binding port 0 makes it choose a free one)."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port or 0))
        except OSError as error:
            raise ValueError(f"port {port} on 127.0.0.1 is in use ({error.strerror}); pass port=None to let "
                             "launch pick a free one, or choose another port") from None
        return s.getsockname()[1]


def _backend(backend: str | None, nprocs: int) -> str:
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    one_of("backend", backend, {"gloo", "nccl"})
    if backend == "nccl" and torch.cuda.device_count() < nprocs:
        raise ValueError(f"nccl needs one GPU per process: {nprocs} processes, {torch.cuda.device_count()} GPUs; "
                         "use fewer processes, or backend='gloo' to run them on the CPU")
    return backend


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process; ``(0, 1)`` outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def current_device() -> torch.device:
    """This process's device: its own GPU under NCCL, otherwise the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_from_env(backend: str | None = None, timeout: float = 600.0) -> tuple[int, int]:
    """Join the process group ``torchrun`` / ``accelerate launch`` describe in the environment
    (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...; under NCCL each process takes GPU ``LOCAL_RANK``);
    returns ``(rank, world_size)``. A script ``fn(*init_from_env(), ...)`` runs ``fn`` as `launch` does."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    backend = _backend(backend, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
    return rank_and_world()


def _to_cpu(value):
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value.detach().cpu() if isinstance(value, torch.Tensor) else value


def _save_record(folder, index: int, record: dict) -> None:
    torch.save(record, Path(folder) / f"rank{index}.tmp")
    os.replace(Path(folder) / f"rank{index}.tmp", Path(folder) / f"rank{index}")


def _worker(index, fn, args, world_size, port, backend, folder, timeout) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(index), LOCAL_RANK=str(index),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    try:
        if backend == "nccl":
            torch.cuda.set_device(index)
        else:   # share the cores instead of each process starting one thread per core
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        # a collective times out a minute after launch's own deadline, so that the clearer TimeoutError comes first
        dist.init_process_group(backend, rank=index, world_size=world_size, timeout=timedelta(seconds=timeout + 60))
        result = _to_cpu(fn(index, world_size, *args))
        dist.barrier()                   # no rank tears its connections down while a peer still uses them
        dist.destroy_process_group()     # only on success: after a failure the peers may be stuck mid-collective
        _save_record(folder, index, {"result": result})
    except BaseException as error:
        # plain strings, so that launch reads the record back with weights_only=True
        _save_record(folder, index, {"error_type": f"{type(error).__module__}:{type(error).__qualname__}",
                                     "message": str(error), "traceback": traceback.format_exc()})
        raise
    # Saved, group gone: leave without the interpreter's shutdown, whose C++ destructors (gloo's threads,
    # OpenMP's pool) once aborted a rank (SIGABRT) after it had saved a correct result.
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)


def _exception_type(name: str) -> type:
    module, _, qualname = name.partition(":")
    try:
        found = reduce(getattr, qualname.split("."), importlib.import_module(module))
    except (ImportError, AttributeError, ValueError):
        return RuntimeError
    return found if isinstance(found, type) and issubclass(found, BaseException) else RuntimeError


def _child_error(folder: Path, rank: int, world: int, failure: Exception) -> Exception:
    """The child's own exception, its message prefixed with the rank, its traceback as a note."""
    try:
        record = torch.load(folder / f"rank{rank}", weights_only=True)
    except (OSError, pickle.UnpicklingError, EOFError, RuntimeError):
        return RuntimeError(f"rank {rank} of {world} died without a Python exception: {failure}")
    if "result" in record:
        return RuntimeError(f"rank {rank} of {world} returned its result, then its process died while exiting "
                            f"({failure}): a crash in a library's clean-up; run again, and report it if it repeats")
    kind = _exception_type(record["error_type"])
    text = f"rank {rank} of {world} raised {record['error_type'].rpartition(':')[2]}: {record['message']}"
    try:
        raised = kind(text)
    except TypeError:     # an exception class that wants other arguments than a message
        raised = RuntimeError(text)
    raised.add_note("traceback in the child process:\n" + record["traceback"])
    return raised


def _load_result(folder: Path, rank: int):
    try:
        return torch.load(folder / f"rank{rank}", weights_only=True)["result"]
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        what = f"a {found.group(1)}" if found else "an object of another kind"
        raise TypeError(f"rank {rank} returned something launch cannot bring back safely ({what}): return "
                        "tensors, numbers, strings, dtypes, and lists, tuples or dicts of them") from None


def launch(fn, nprocs: int, *args, timeout: float = 300.0, backend: str | None = None,
           port: int | None = None) -> list:
    """Run ``fn(rank, world_size, *args)`` in ``nprocs`` new processes and return their results, by rank.

    The processes (``torch.multiprocessing``, spawn) join one process group on 127.0.0.1:``port``
    (default: a free one) with ``backend`` (default: NCCL, one GPU per process, when CUDA is
    available, else gloo, the CPU cores shared out). ``fn`` must be importable (defined at the top
    of a module, not in a notebook cell) and return tensors, numbers, strings, dtypes, or lists,
    tuples and dicts of them (read back with ``weights_only=True``); tensors come back on the CPU. If a process raises, the others are stopped and its exception is raised here, naming its
    rank (its traceback attached as a note). If they have not all finished after ``timeout``
    seconds they are killed and ``TimeoutError`` is raised: a hang fails instead of blocking.
    """
    positive_int("nprocs", nprocs)
    positive_number("timeout", timeout)
    backend = _backend(backend, nprocs)
    port = free_port(None if port is None else positive_int("port", port))
    with tempfile.TemporaryDirectory(prefix="course-launch-") as tmp:
        folder = Path(tmp)
        context = torch.multiprocessing.start_processes(
            _worker, args=(fn, args, nprocs, port, backend, tmp, timeout), nprocs=nprocs, join=False,
            start_method="spawn")
        deadline = time.monotonic() + timeout
        try:
            while not context.join(timeout=max(0.01, min(1.0, deadline - time.monotonic()))):
                if time.monotonic() > deadline:
                    for process in context.processes:
                        process.kill()
                        process.join()
                    raise TimeoutError(f"{nprocs} processes running {getattr(fn, '__name__', fn)} did not finish "
                                       f"within {timeout:g} s and were killed: usually one rank waits in a collective "
                                       "that another never reaches (e.g. ranks given different numbers of batches)")
        except ProcessException as failure:
            raise _child_error(folder, failure.error_index, nprocs, failure) from None
        return [_load_result(folder, r) for r in range(nprocs)]


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
