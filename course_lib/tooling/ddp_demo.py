"""Data parallelism with the course's training loop: the same code, N processes.

    accelerate launch --multi_gpu --num_processes 2 -m course_lib.tooling.ddp_demo --out runs/ddp

starts two processes (``torch.distributed.run`` underneath; on a machine without GPUs they talk
over gloo on the CPU; with GPUs, set ``ACCELERATE_USE_CPU=1`` to keep them on the CPU). Each
trains a tiny Llama with `course_lib.train.train` on its half of every global batch, once with
AdamW and once with plain SGD, and writes its final weights to ``OUT/{optimizer}-rank{i}.safetensors``
and its loss curve to ``OUT/{optimizer}-rank{i}.json``. ``python -m course_lib.tooling.ddp_demo --out DIR``
is the one-process run of the same global batches, for comparison. Nothing in the loop changes
between the two: `train.train` asks accelerate how many processes there are and which one it is.

``accelerate launch --cpu --num_processes 2`` is *not* the way on CPU: accelerate 1.x's ``--cpu``
path starts one Python process (several CPU processes need ``mpirun`` and ``--mpirun_hostfile``).
Several GPUs on one machine: ``accelerate launch --multi_gpu --num_processes 8 ...``; several
machines: the same on each, plus ``--num_machines 2 --machine_rank {0,1} --main_process_ip HOST
--main_process_port PORT`` (``--num_processes`` counts processes over all machines).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from .. import models, train

SEQUENCE_LENGTH = 16


def token_rows(n: int = 64, length: int = SEQUENCE_LENGTH, vocab_size: int = 128, seed: int = 0) -> list[torch.Tensor]:
    """``n`` random token sequences of equal length: every row weighs the same in the mean loss."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (length,), generator=g) for _ in range(n)]


def lm_loss(model: nn.Module, rows: list[torch.Tensor]) -> torch.Tensor:
    """Next-token cross-entropy over every token of the rows (labels = inputs)."""
    ids = torch.stack(rows)
    return model(input_ids=ids, labels=ids).loss


OPTIMIZERS = {   # name -> (learning rate, gradient clipping)
    "adamw": (1e-2, 1.0),   # the course's default: AdamW with clipping at norm 1
    "sgd": (0.5, None),     # plain SGD, unclipped: every weight moves by lr × the averaged gradient
}


def run(optimizer: str = "adamw", steps: int = 4, batch_size: int = 8, grad_accum: int = 2, seed: int = 0):
    """Train `models.tiny_llama` on global micro-batches of ``batch_size`` rows (each process takes
    its share), ``grad_accum`` micro-batches per step, with one of `OPTIMIZERS`; returns
    ``(model, history)``."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; known: {', '.join(OPTIMIZERS)}")
    lr, clip = OPTIMIZERS[optimizer]
    model = models.tiny_llama(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr) if optimizer == "sgd" else None
    history = train.train(model, lm_loss, train.batches(token_rows(seed=seed), batch_size, seed=seed),
                          steps=steps, lr=lr, warmup_steps=1, grad_accum=grad_accum, max_grad_norm=clip,
                          optimizer=opt, seed=seed, progress=False, desc="ddp demo")
    return model, history


def state_dict_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every entry of the state dict as its own contiguous tensor (safetensors refuses the tied
    embedding / lm_head pair, which share one storage)."""
    return {name: value.detach().clone().contiguous() for name, value in model.state_dict().items()}


def main(argv: list[str] | None = None) -> int:
    from accelerate import PartialState
    from safetensors.torch import save_file

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True,
                        help="folder for {optimizer}-rank{i}.safetensors and {optimizer}-rank{i}.json")
    parser.add_argument("--optimizers", nargs="+", choices=sorted(OPTIMIZERS), default=list(OPTIMIZERS))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8, help="rows per global micro-batch")
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for optimizer in args.optimizers:
        model, history = run(optimizer, args.steps, args.batch_size, args.grad_accum, args.seed)
        state = PartialState()    # initialised by train.train's Accelerator
        stem = args.out / f"{optimizer}-rank{state.process_index}"
        save_file(state_dict_for_saving(model), f"{stem}.safetensors")
        Path(f"{stem}.json").write_text(json.dumps(
            {"rank": state.process_index, "processes": state.num_processes, "backend": state.backend,
             "loss": history.loss, "lr": history.lr}, indent=1))
    state.wait_for_everyone()
    if state.use_distributed:
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
