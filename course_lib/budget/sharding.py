"""Per-GPU memory of data parallelism with ZeRO / FSDP sharding: what each strategy divides by N.

With ``gpus = N`` each GPU runs its own micro-batch, so the activations and the backward's buffers
are per GPU and never divided. What sharding divides are the *model states* (ZeRO's word:
parameters, gradients, optimizer state), each GPU keeping a 1/N shard (rounded up) of:

==========================  ==========  ===========  =========  ==========================
``sharding``                 optimizer   gradients    weights    ZeRO paper (Figure 1)
==========================  ==========  ===========  =========  ==========================
"none" (DDP)                 —           —            —          (2 + 2 + K)·Ψ
"optimizer" (ZeRO-1)         ÷ N         —            —          2Ψ + 2Ψ + K·Ψ/N
"optimizer+gradients" (2)    ÷ N         ÷ N          —          2Ψ + (2 + K)·Ψ/N
"full" (ZeRO-3, FSDP)        ÷ N         ÷ N          ÷ N        (2 + 2 + K)·Ψ/N
==========================  ==========  ===========  =========  ==========================

(K = 12 for mixed-precision Adam: the float32 master weights and the two moments, which this
estimate keeps in the optimizer-state line; see `Settings` ``master_weights``.) With LoRA or QLoRA
the trained parameters are the adapters: ZeRO-1 and -2 split only their (small) state, and only
"full" splits the frozen base, the 4-bit one too when it is stored as FSDP needs (`Settings`
``quant_storage``). ``offload`` moves the optimizer state, and under "full" the weight shards, to
CPU memory: they leave the GPU (the CPU memory they need is not estimated). Left out, as the paper
leaves them out: DDP's gradient buckets (views of the gradients with
``gradient_as_bucket_view=True``), and gradients moved to CPU by offload (so the estimate is an
upper bound there).

What the paper's figure does not show, and a GPU must still hold, is ``sharding_buffers``: the
unsharded tensors of the FSDP units being worked on, with transformers' usual wrapping (one unit
per transformer block; the root unit holds the rest: embeddings, final norm, output layer). Under
"optimizer+gradients" the gradients of the root and of one block before they are reduce-scattered;
under "full" also the gathered weights of the root (FSDP does not reshard the root after forward)
and of two blocks (the one computing and the one prefetched, FSDP's default ``BACKWARD_PRE``).
"""

from __future__ import annotations

from dataclasses import dataclass

from .settings import Settings

STAGES = {"none": 0, "optimizer": 1, "optimizer+gradients": 2, "full": 3}
"""ZeRO's stage of each ``sharding`` strategy."""


@dataclass(frozen=True)
class ModelStates:
    """One GPU's model states without sharding (bytes), and the sizes of the units FSDP gathers.

    ``block_*`` is one transformer block (its weights as stored, with its LoRA adapters; its
    gradients), ``root_*`` everything outside the blocks; ``layers`` the number of blocks."""

    weights: int
    lora_parameters: int
    gradients: int
    optimizer_state: int
    block_weights: int
    root_weights: int
    block_gradients: int
    root_gradients: int
    layers: int


def shard(nbytes: int, gpus: int) -> int:
    """One GPU's share of ``nbytes`` split over ``gpus``: rounded up, as a padded flat shard is."""
    return -(-nbytes // gpus)


def per_gpu(states: ModelStates, settings: Settings) -> dict[str, int]:
    """The model-state lines of one GPU, and its ``sharding_buffers``, under ``settings``' strategy.

    ``settings.shards`` is the strategy in effect ("none" on one GPU). ``offload`` takes the
    optimizer state off the GPU whatever the GPU count (ZeRO-Offload runs on one GPU too), and the
    weight shards under "full" sharding over several GPUs."""
    n, stage = settings.gpus, STAGES[settings.shards]
    out = {"weights": states.weights, "lora_parameters": states.lora_parameters,
           "gradients": states.gradients, "optimizer_state": states.optimizer_state, "sharding_buffers": 0}
    if settings.offload:
        out["optimizer_state"] = 0
    elif stage >= 1:
        out["optimizer_state"] = shard(states.optimizer_state, n)
    if stage >= 2:
        out["gradients"] = shard(states.gradients, n)
        out["sharding_buffers"] = states.root_gradients + states.block_gradients
    if stage >= 3:
        for line in ("weights", "lora_parameters"):
            out[line] = 0 if settings.offload else shard(getattr(states, line), n)
        gathered = states.root_weights + min(2, states.layers) * states.block_weights
        out["sharding_buffers"] += gathered
    return out


def describe(settings: Settings) -> str:
    """``8 GPUs, full sharding (ZeRO-3), offload to CPU`` for a table's head; empty for one GPU without offload."""
    if settings.gpus == 1:
        return "optimizer state offloaded to CPU" if settings.offload else ""
    stage = STAGES[settings.shards]
    words = f"{settings.gpus} GPUs, " + (f"sharding {settings.shards} (ZeRO-{stage})" if stage else "DDP (no sharding)")
    offloaded = "optimizer state and weights" if stage == 3 else "optimizer state"
    return words + (f", {offloaded} offloaded to CPU" if settings.offload else "") + ", memory per GPU"
