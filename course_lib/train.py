"""One small training loop shared by the chapters.

AdamW (or any optimizer you pass), linear warm-up then cosine decay, gradient accumulation,
gradient clipping, a tqdm bar showing the loss, optional periodic evaluation, and a record of
every step (loss, learning rate, seconds). It is seeded and, on CPU, deterministic. On CUDA it
runs the forward pass under autocast in bfloat16 (float16 with loss scaling where bfloat16 is
not supported); on CPU it stays in float32, which is several times faster there than bfloat16.

What a step computes is up to the caller: ``loss_fn(model, batch)`` returns a scalar loss, so
the same loop trains MiniLM contrastively and SmolLM2 on next-token prediction.
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
from tqdm.auto import tqdm


def seed_everything(seed: int) -> None:
    """Seed Python's and torch's generators (CPU and every GPU)."""
    random.seed(seed)
    torch.manual_seed(seed)


def batches(rows: Sequence, batch_size: int, seed: int = 0, drop_last: bool = True) -> Iterator[list]:
    """Endless, reproducible mini-batches: each epoch is a fresh seeded shuffle of ``rows``."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
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


@dataclass
class History:
    """What happened during training, one entry per optimizer step."""

    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    evals: list[tuple[int, dict]] = field(default_factory=list)

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
) -> History:
    """Train ``model`` for ``steps`` optimizer steps of ``grad_accum`` micro-batches each.

    ``data`` yields micro-batches (see `batches`); ``loss_fn(model, batch)`` returns the loss of
    one micro-batch. The loss is divided by ``grad_accum`` so accumulated gradients average
    over micro-batches. ``eval_fn(model)`` runs every ``eval_every`` steps and at the end.

    With ``loss_fn_does_backward`` the loss function back-propagates itself (GradCache, whose
    backward runs chunk by chunk): it is called as ``loss_fn(model, batch, loss_scale)``, must add
    ``loss_scale`` × its gradients to ``.grad`` and returns the (unscaled) loss value; it handles
    its own mixed precision, so no autocast or gradient scaler is applied around it.
    """
    if steps <= 0 or grad_accum <= 0:
        raise ValueError(f"steps and grad_accum must be positive, got {steps} and {grad_accum}")
    seed_everything(seed)
    device = next(model.parameters()).device
    params = trainable_parameters(model)
    optimizer = optimizer or torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, steps, warmup_steps))
    autocast, scaler = nullcontext, None
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        autocast = lambda: torch.autocast("cuda", dtype=dtype)
        scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    if loss_fn_does_backward:   # it runs its own precision and backward
        autocast, scaler = nullcontext, None
    history = History()
    stream = iter(data)
    model.train()
    bar = tqdm(range(steps), desc=desc, disable=not progress)
    for step in bar:
        start = time.perf_counter()
        total = 0.0
        for _ in range(grad_accum):
            if loss_fn_does_backward:
                total += float(loss_fn(model, next(stream), 1.0 / grad_accum)) / grad_accum
                continue
            with autocast():
                loss = loss_fn(model, next(stream)) / grad_accum
            (scaler.scale(loss) if scaler else loss).backward()
            total += loss.item()
        if scaler:
            scaler.unscale_(optimizer)
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
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
    model.eval()
    return history
