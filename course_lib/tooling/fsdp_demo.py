"""SmolLM2 and MiniLM trained over N processes, for chapter 08 and `benchmarks.fsdp_memory`.

Each function here is a *worker*: `course_lib.distributed.launch` runs it as ``fn(rank, world,
...)`` in N processes (each process imports it by name, which is why it lives in a module and not
in a notebook cell). With ``world == 1`` it is the single-process reference on the same global
batches, so the parent can compare the two runs number by number.

    from course_lib import distributed
    from course_lib.tooling import fsdp_demo
    one = distributed.launch(fsdp_demo.train_smollm2, 1, "lora", "full")
    two = distributed.launch(fsdp_demo.train_smollm2, 2, "lora", "full")
"""

from __future__ import annotations

import time

import torch

from .. import data, distributed, instruct, lora, models


def packed_rows(tokenizer, n_rows: int, seq_len: int) -> torch.Tensor:
    """``n_rows`` rows of exactly ``seq_len`` tokens: the instruction task's training examples
    (chat prompt, answer, end of turn) tokenised one after the other and cut into blocks. Every
    row has the same number of target tokens, so the mean loss of a global batch is the mean of
    the processes' mean losses, with no padding to weigh."""
    stream: list[int] = []
    for row in data.load_instruct("train"):
        stream += tokenizer(instruct.chat_prompt(tokenizer, row["instruction"]) + row["answer"] + tokenizer.eos_token,
                            add_special_tokens=False)["input_ids"]
        if len(stream) >= n_rows * seq_len:
            break
    if len(stream) < n_rows * seq_len:
        raise ValueError(f"the training split holds {len(stream)} tokens, fewer than {n_rows} rows x {seq_len}")
    return torch.tensor(stream[:n_rows * seq_len]).view(n_rows, seq_len)


def _quiet() -> None:
    """No loading progress bars from transformers in the worker processes: they would land in
    the notebook's output as stderr text."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    ids = ids.to(distributed.current_device())
    return model(input_ids=ids, labels=ids).loss


def train_smollm2(rank: int, world: int, method: str = "lora", strategy: str = "full", steps: int = 2,
                  batch_size: int = 4, seq_len: int = 64, lr: float = 1e-4, r: int = 8, seed: int = 0) -> dict:
    """Train SmolLM2 (``method`` "full" or "lora": r=``r`` on every linear layer) for ``steps``
    AdamW steps on global batches of ``batch_size`` packed rows, this rank's share of each, with
    ``distributed.shard(model, strategy)`` when ``world > 1``. Returns the losses of the global
    batches, the seconds of each step on this rank, what this rank held after the last step
    (`distributed.state_bytes`) and, from rank
    0 only, every trainable parameter whole (for the comparison with one process)."""
    if method not in ("full", "lora"):
        raise ValueError(f"method must be 'full' or 'lora', got {method!r}")
    _quiet()
    torch.manual_seed(seed)
    model, tok = models.load_smollm2("cpu", dtype=torch.float32)
    model.to(distributed.current_device()).train()   # its GPU under NCCL (one process too), else the CPU
    model.config.use_cache = False
    if method == "lora":
        lora.inject_lora(model, "all-linear", r=r, lora_alpha=2 * r)
    rows = packed_rows(tok, steps * batch_size, seq_len)
    if world > 1:
        distributed.shard(model, strategy)
    optimizer = distributed.make_optimizer(model, lr=lr)
    losses, seconds = [], []
    for step in range(steps):
        batch = rows[step * batch_size:(step + 1) * batch_size]
        start = time.perf_counter()
        losses.append(distributed.train_step(model, optimizer, _lm_loss, distributed.local_rows(batch, rank, world)))
        seconds.append(time.perf_counter() - start)
    held = distributed.state_bytes(model, optimizer)
    trainable = {n for n, p in (model.module if hasattr(model, "module") else model).named_parameters()
                 if p.requires_grad}
    whole = distributed.full_parameters(model)   # a collective under FSDP: every rank takes part
    return {"rank": rank, "world": world, "losses": losses, "step_seconds": seconds, "bytes": held,
            "trainable": {n: t for n, t in whole.items() if n in trainable} if rank == 0 else None}


MINILM_MODES = ("per_process", "gathered", "gathered_gradcache")


def minilm_gradient(rank: int, world: int, mode: str = "gathered", batch_size: int = 16, chunk_size: int = 4,
                    scale: float = 20.0) -> dict:
    """The gradient of MiniLM's in-batch-negatives loss on the first ``batch_size`` training pairs
    of the code-search task, the batch split over ``world`` processes and averaged as DDP does.

    ``mode``: ``"per_process"`` (each rank's queries see only its own documents: ``B/N - 1``
    negatives), ``"gathered"`` (documents all-gathered with their gradient: ``B - 1``) or
    ``"gathered_gradcache"`` (the same loss, each rank embedding its pairs ``chunk_size`` at a
    time with GradCache). Dropout is off (eval mode), so that the processes and the single run
    see the same network. Returns the global loss and, from rank 0, every parameter's gradient
    flattened into one vector."""
    from functools import partial

    from .. import retrieval

    if mode not in MINILM_MODES:
        raise ValueError(f"mode must be one of {', '.join(MINILM_MODES)}, got {mode!r}")
    _quiet()
    model, tok = models.load_minilm("cpu")
    model.to(distributed.current_device()).eval()   # NCCL gathers GPU tensors only
    pairs = distributed.local_rows(data.load_code_search("train")[:batch_size], rank, world)
    queries, documents = [p["query"] for p in pairs], [p["document"] for p in pairs]
    encode_q = partial(retrieval.encode_batch, model, tok, max_length=retrieval.QUERY_MAX_TOKENS)
    encode_d = partial(retrieval.encode_batch, model, tok, max_length=retrieval.DOC_MAX_TOKENS)
    if mode == "gathered_gradcache":
        loss = distributed.gradcache_step_across_processes(encode_q, queries, documents, chunk_size,
                                                           doc_encoder=encode_d, scale=scale).loss
    else:
        value = distributed.contrastive_loss_across_processes(encode_q(queries), encode_d(documents), scale=scale,
                                                              gather=mode != "per_process")
        value.backward()
        loss = value.item()
    distributed.average_gradients(model)
    grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return {"rank": rank, "loss": distributed.mean_over_processes(loss), "negatives_per_query":
            (batch_size if mode != "per_process" else batch_size // world) - 1,
            "gradient": grad if rank == 0 else None}


def accelerate_probe() -> dict:
    """What `accelerate.Accelerator.prepare` made of a tiny Llama in this process: the process's
    index and count as accelerate sees them, its distributed type, the class of the prepared
    model, and whether its parameters were sharded (``DTensor``). Run under ``accelerate launch``
    by ``python -m course_lib.tooling.fsdp_demo``, which prints it as one JSON line per process."""
    from accelerate import Accelerator
    from torch.distributed.tensor import DTensor

    accelerator = Accelerator()
    prepared = accelerator.prepare(models.tiny_llama(0))
    return {"process_index": accelerator.process_index, "num_processes": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type).split(".")[-1],
            "prepared_model": type(prepared).__name__,
            "sharded": any(isinstance(p, DTensor) for p in prepared.parameters())}


if __name__ == "__main__":
    import json
    import os

    # one write of one line: two processes printing into one pipe cannot interleave inside it
    os.write(1, (json.dumps(accelerate_probe()) + "\n").encode())
