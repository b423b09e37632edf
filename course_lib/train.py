"""One small training loop shared by the chapters.

AdamW (or any optimizer you pass), linear warm-up then cosine decay, gradient accumulation,
gradient clipping, optional gradient (activation) checkpointing, progress (`course_lib.progress`),
optional periodic evaluation, and a record of every step (loss, learning rate, seconds). It is
seeded and, on CPU, deterministic. On CUDA it runs the forward pass under autocast in bfloat16
(float16 with loss scaling where bfloat16 is not supported); on CPU it stays in float32, which is
several times faster there than bfloat16.

What a step computes is up to the caller: ``loss_fn(model, batch)`` returns a scalar loss, so
the same loop trains MiniLM contrastively and SmolLM2 on next-token prediction.

Underneath is `accelerate.Accelerator`, so the same loop runs in one process or in several
(data parallelism): launched by ``accelerate launch --multi_gpu --num_processes N script.py``
(on CPU too, where the processes talk over gloo), every process reads the same seeded stream of
*global* micro-batches, keeps its own contiguous share of each (`shard`), and DistributedDataParallel
averages the gradients in backward. Averaging per-process mean losses equals the mean over the
global batch when the shares weigh the same (same rows, same token counts), so N processes take
the same optimizer steps as one process on the whole batch, up to floating-point summation order.
In a single process nothing is wrapped: the model, its optimizer and the numbers are as before.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from .checks import positive_int
from .memory import measure_step
from .models import cuda_half_dtype, gradient_checkpointing_enabled, set_gradient_checkpointing
from .progress import progress as _progress


def seed_everything(seed: int) -> None:
    """Seed Python's and torch's generators (CPU and every GPU)."""
    random.seed(seed)
    torch.manual_seed(seed)


def batches(rows: Sequence, batch_size: int, seed: int = 0, drop_last: bool = True) -> Iterator[list]:
    """Endless, reproducible mini-batches: each epoch is a fresh seeded shuffle of ``rows``."""
    positive_int("batch_size", batch_size)
    if len(rows) < batch_size and drop_last:
        raise ValueError(f"batch_size={batch_size} is larger than the {len(rows)} training rows")
    rng = random.Random(seed)
    while True:
        order = list(range(len(rows)))
        rng.shuffle(order)
        stop = len(order) - batch_size + 1 if drop_last else len(order)
        for start in range(0, stop, batch_size):
            yield [rows[i] for i in order[start:start + batch_size]]


def warmup_cosine(step: int, total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.0) -> float:
    """Learning-rate multiplier: linear warm-up to 1, then cosine decay to ``min_ratio``."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def shard(batch, index: int, count: int):
    """Process ``index``'s contiguous share of a global micro-batch split over ``count`` processes.

    A list is a batch of rows (`batches` yields lists of dicts) and is sliced; a tensor is split
    along its first dimension; a tuple or a dict is a record of such fields and is split field by
    field (``(x, y)``, ``{"input_ids": ..., "attention_mask": ...}``). The shares must be equal,
    or the processes' mean losses would weigh rows unequally.
    """
    if count == 1:
        return batch
    if isinstance(batch, dict):
        return {key: shard(value, index, count) for key, value in batch.items()}
    if isinstance(batch, tuple):
        return tuple(shard(value, index, count) for value in batch)
    if not isinstance(batch, (list, torch.Tensor)):
        raise TypeError(f"cannot split a {type(batch).__name__} between processes: "
                        "yield lists of rows, tensors, or tuples/dicts of them")
    if len(batch) % count:
        raise ValueError(f"a micro-batch of {len(batch)} rows cannot be split evenly over {count} processes")
    size = len(batch) // count
    return batch[index * size:(index + 1) * size]


@dataclass
class History:
    """What happened during training, one entry per optimizer step."""

    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    evals: list[tuple[int, dict]] = field(default_factory=list)
    step_memory: dict | None = None   # the first step's memory (``train(measure_memory=True)``)

    @property
    def seconds_per_step(self) -> float:
        """Median seconds per optimizer step, the first step (warm-up of kernels) excluded."""
        times = sorted(self.seconds[1:] or self.seconds)
        return times[len(times) // 2] if times else float("nan")


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that require gradients (after LoRA injection: only the adapters)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters: did you freeze everything?")
    return params


def check_schedule(steps: int, grad_accum: int = 1, warmup_steps: int = 0) -> None:
    """Refuse a run that cannot mean what it says: no steps, no micro-batches per step, or a
    warm-up longer than the run (the learning rate would never reach its peak)."""
    positive_int("steps", steps)
    positive_int("grad_accum", grad_accum, "micro-batches per optimizer step, at least 1")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps cannot be negative, got {warmup_steps}")
    if warmup_steps > steps:
        raise ValueError(f"warmup_steps={warmup_steps} is longer than the run (steps={steps}): the learning "
                         "rate would never reach its peak; use fewer warm-up steps or more steps")


def make_accelerator(device: torch.device):
    """The `accelerate.Accelerator` the loop runs under: precision is the loop's own business
    (``mixed_precision="no"``) and the model stays where the caller put it (no device placement).
    Under ``accelerate launch`` it joins the process group the launcher set up (gloo on CPU)."""
    from accelerate import Accelerator

    cpu = device.type == "cpu" and not torch.cuda.is_available()
    return Accelerator(cpu=cpu, mixed_precision="no", device_placement=False)


def train(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, object], torch.Tensor],
    data: Iterable,
    steps: int,
    lr: float = 1e-4,
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
    grad_accum: int = 1,
    max_grad_norm: float | None = 1.0,
    optimizer: torch.optim.Optimizer | None = None,
    eval_fn: Callable[[nn.Module], dict] | None = None,
    eval_every: int = 0,
    seed: int = 0,
    progress: bool = True,
    desc: str = "training",
    loss_fn_does_backward: bool = False,
    gradient_checkpointing: bool = False,
    measure_memory: bool = False,
) -> History:
    """Train ``model`` for ``steps`` optimizer steps of ``grad_accum`` micro-batches each.

    ``data`` yields micro-batches (see `batches`, an endless stream); it must hold at least
    ``steps * grad_accum`` of them: a shorter list is refused before training, an iterator that runs
    dry stops the run with ``ValueError`` (the weights are those of the last whole step).
    ``loss_fn(model, batch)`` returns the loss of one micro-batch. The loss is divided by
    ``grad_accum`` so accumulated gradients average over micro-batches. ``eval_fn(model)`` runs
    every ``eval_every`` steps and at the end. ``gradient_checkpointing`` turns on a transformers
    model's activation checkpointing (recompute each layer in backward instead of keeping its
    activations) for the run, off again after it. ``measure_memory`` measures the first optimizer
    step (`course_lib.memory.measure_step`: parameters, gradients, optimizer state, peak saved
    activations) into ``history.step_memory``: the memory of a step of this very run, without a
    separate step to measure it (the first step is left out of ``seconds_per_step`` anyway).
    A NaN or infinite loss stops the run with ``ValueError`` before its optimizer step, so the
    weights are those after the last good step. Whether the run ends or fails, checkpointing is
    switched back; a finished run leaves the model in eval mode, a failed one in the train/eval
    mode it had before.

    ``seed`` seeds Python's and torch's generators when the run starts (`seed_everything`): it
    covers what happens inside the loop (dropout masks, any sampling in ``loss_fn``), not the
    adapters' initialisation, which happened when they were injected, before ``train`` was
    called. To reproduce that too, call ``seed_everything(seed)`` just before injecting (as
    `course_lib.peft_methods.run_method` does). The order of ``data`` is the data's own business
    (`batches` takes its own ``seed``).

    With ``loss_fn_does_backward`` the loss function back-propagates itself (GradCache, whose
    backward runs chunk by chunk): it is called as ``loss_fn(model, batch, loss_scale)``, must add
    ``loss_scale`` × its gradients to ``.grad`` and returns the (unscaled) loss value; it handles
    its own mixed precision, so no autocast or gradient scaler is applied around it.

    Under ``accelerate launch`` with N processes, ``data`` must yield the same global micro-batches
    in every process (a seeded `batches` does); each process trains on its `shard` of each, and
    the recorded loss is the mean over processes. ``eval_fn`` runs in every process on identical
    weights.
    """
    check_schedule(steps, grad_accum, warmup_steps)
    needed = steps * grad_accum
    cure = "pass an endless stream such as train.batches(rows, batch_size), more data, or fewer steps"
    if hasattr(data, "__len__") and len(data) < needed:
        raise ValueError(f"data holds {len(data)} micro-batches, but steps={steps} x "
                         f"grad_accum={grad_accum} = {needed} are needed: {cure}")
    stream = iter(data)
    device = next(model.parameters()).device
    accelerator = make_accelerator(device)
    rank, world = accelerator.process_index, accelerator.num_processes
    if world > 1 and loss_fn_does_backward:
        raise ValueError("loss_fn_does_backward (GradCache) runs in one process only")
    seed_everything(seed)
    params = trainable_parameters(model)
    optimizer = optimizer or torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, steps, warmup_steps))
    autocast, scaler = nullcontext, None
    if device.type == "cuda":
        dtype = cuda_half_dtype()
        autocast = lambda: torch.autocast("cuda", dtype=dtype)
        scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    if loss_fn_does_backward:   # it runs its own precision and backward
        autocast, scaler = nullcontext, None
    switch_checkpointing = gradient_checkpointing and not gradient_checkpointing_enabled(model)
    was_training = model.training
    history = History()
    try:  # whatever happens (an error, a NaN loss, Ctrl-C), the model leaves in the modes it came in
        if switch_checkpointing:
            set_gradient_checkpointing(model, True)
        # several processes: DistributedDataParallel averages gradients in backward; one: no wrapper
        wrapped = accelerator.prepare_model(model, device_placement=False) if world > 1 else model
        model.train()
        bar = _progress(range(steps), desc, disable=not progress or not accelerator.is_local_main_process)

        def one_step(step: int) -> float:
            """The micro-batches' forward and backward passes, clipping and the optimizer step:
            the mean loss (the gradients stay, for the caller to measure and then drop)."""
            total = 0.0
            for micro in range(grad_accum):
                try:
                    batch = shard(next(stream), rank, world)
                except StopIteration:
                    optimizer.zero_grad(set_to_none=True)   # no half-accumulated gradients left behind
                    raise ValueError(f"data ran out after {step * grad_accum + micro} micro-batches, but "
                                     f"steps={steps} x grad_accum={grad_accum} = {needed} are needed (the weights "
                                     f"are those after step {step}): {cure}") from None
                if loss_fn_does_backward:
                    total += float(loss_fn(model, batch, 1.0 / grad_accum)) / grad_accum
                    continue
                # gradients are all-reduced once per optimizer step, in the last micro-batch's backward
                with accelerator.no_sync(wrapped) if micro < grad_accum - 1 else nullcontext():
                    with autocast():
                        loss = loss_fn(wrapped, batch) / grad_accum
                    accelerator.backward(scaler.scale(loss) if scaler else loss)
                total += loss.item()
            if world > 1:
                total = accelerator.reduce(torch.tensor(total, device=accelerator.device), reduction="mean").item()
            if not math.isfinite(total):
                optimizer.zero_grad(set_to_none=True)
                raise ValueError(f"the loss is {total} at step {step + 1}: training diverged, so this step was not "
                                 f"taken (the weights are those after step {step}). Lower lr, or check the data")
            if scaler:
                scaler.unscale_(optimizer)
            if max_grad_norm:
                accelerator.clip_grad_norm_(params, max_grad_norm)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            return total

        first_loss: list[float] = []   # filled by the measured first step
        for step in bar:
            start = time.perf_counter()
            if measure_memory and step == 0:
                history.step_memory = measure_step(lambda: first_loss.append(one_step(0)), model, optimizer)
                total = first_loss[0]
            else:
                total = one_step(step)
            optimizer.zero_grad(set_to_none=True)
            history.lr.append(scheduler.get_last_lr()[0])
            scheduler.step()
            history.loss.append(total)
            history.seconds.append(time.perf_counter() - start)
            bar.set_postfix(loss=f"{total:.3f}")
            if eval_fn and ((eval_every and (step + 1) % eval_every == 0) or step + 1 == steps):
                model.eval()
                history.evals.append((step + 1, eval_fn(model)))
                model.train()
    finally:
        try:
            if switch_checkpointing:
                set_gradient_checkpointing(model, False)
        finally:
            model.train(was_training)
    model.eval()  # a finished run hands the model back ready for evaluation
    return history
