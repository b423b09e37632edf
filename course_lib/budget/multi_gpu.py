"""How many GPUs of a given memory a fine-tuning run needs, and with which sharding strategy.

`plan_gpus(model, gpu_memory, method)` finds the smallest number of GPUs N (up to `MAX_GPUS`) on
which one GPU's `course_lib.budget.estimate` peak fits the usable memory, and at that N the
cheapest strategy that fits, in the order of `STRATEGIES`: DDP, then ZeRO-1 and ZeRO-2 (which
the ZeRO paper shows move no more data than DDP's all-reduce), then full sharding (ZeRO-3 / FSDP,
1.5 times the traffic: the weights are gathered in forward and again in backward), and last, when
``offload`` is allowed, the same with the optimizer state (and under full sharding the weights)
in CPU memory, which is the slowest. `course-lib plan` prints it for full fine-tuning, LoRA and
QLoRA.

The per-GPU peak never grows with N (each strategy divides some states by N and keeps the rest),
so for each strategy a bisection over N finds the smallest that fits.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..checks import boolean, fraction, one_of, positive_int
from .configs import get_config
from .estimate import Budget, estimate_settings, format_bytes, parse_memory
from .settings import DTYPE_BYTES, METHODS, Settings

MAX_GPUS = 1024
"""The most GPUs `plan_gpus` considers by default: a large cluster's data-parallel group."""
STRATEGIES = ("none", "optimizer", "optimizer+gradients", "full")
"""The sharding strategies, cheapest first (see the module doc)."""
METHOD_WORDS = {"full": "full fine-tuning", "lora": "LoRA", "qlora": "QLoRA"}


@dataclass
class GpuPlan:
    """What `plan_gpus` found: ``gpus`` GPUs with ``sharding`` (and ``offload``), or ``fits`` False
    and ``reason``, which says what to change. ``settings`` and ``budget`` are the chosen ones, or,
    when nothing fits, full sharding over the most GPUs allowed."""

    fits: bool
    model: str
    method: str
    gpu_memory: int
    usable: int
    gpus: int
    sharding: str
    offload: bool
    settings: Settings
    budget: Budget
    reason: str = ""

    def line(self) -> str:
        """One line: ``full fine-tuning: 8 GPUs, sharding full (ZeRO-3), peak 23.9 GiB per GPU``."""
        what = METHOD_WORDS[self.method]
        if not self.fits:
            return f"{what}: does not fit: {self.reason}"
        stage = STRATEGIES.index(self.sharding)
        strategy = "DDP (no sharding)" if stage == 0 else f"sharding {self.sharding} (ZeRO-{stage})"
        count = "1 GPU" if self.gpus == 1 else f"{self.gpus} GPUs"
        if self.gpus == 1 and self.sharding == "none":
            strategy = "no sharding"
        return (f"{what}: {count}, {strategy}" + (", offload to CPU" if self.offload else "")
                + f", peak {format_bytes(self.budget.peak)} per GPU")

    def to_dict(self) -> dict:
        return {"fits": self.fits, "model": self.model, "method": self.method, "gpu_memory": self.gpu_memory,
                "usable": self.usable, "gpus": self.gpus, "sharding": self.sharding, "offload": self.offload,
                "settings": self.settings.to_dict(), "budget": self.budget.to_dict(), "reason": self.reason}


def plan_gpus(model, gpu_memory, method: str = "full", *, seq_len: int = 512, batch_size: int = 1,
              gradient_checkpointing: bool = True, headroom: float = 0.1, weight_dtype: str = "bfloat16",
              optimizer: str = "adamw", master_weights: bool | None = None, r: int | None = None,
              target_modules=None, offload: bool = False, max_gpus: int = MAX_GPUS) -> GpuPlan:
    """The fewest GPUs of ``gpu_memory`` each (bytes or ``"80GB"``) that fine-tune ``model`` with ``method``.

    Each GPU runs a micro-batch of ``batch_size`` sequences of ``seq_len`` tokens (default: one, as
    seed 001's recipe, with gradient checkpointing); its peak must be at most ``(1 - headroom) ·
    gpu_memory``. Full fine-tuning defaults to mixed precision with float32 master weights (16
    bytes per parameter with AdamW) when ``weight_dtype`` is 16-bit; LoRA and QLoRA keep float32
    adapters. ``offload`` lets the search move states to CPU memory too (not estimated: with offload
    the CPUs must hold the optimizer state, 12 bytes per trained parameter with mixed-precision Adam).
    """
    c = get_config(model)
    gpu = parse_memory(gpu_memory)
    one_of("method", method, METHODS)
    fraction("headroom", headroom, "the share of the GPU memory kept free")
    positive_int("max_gpus", max_gpus, "the most GPUs to consider, e.g. 1024")
    boolean("offload", offload)
    usable = int(gpu * (1 - headroom))
    if master_weights is None:
        master_weights = method == "full" and DTYPE_BYTES[weight_dtype] == 2

    def settings(gpus: int, sharding: str, offloaded: bool) -> Settings:
        lora = {} if method == "full" else {"r": r, "target_modules": target_modules}
        return Settings.build(c, method, weight_dtype=weight_dtype, optimizer=optimizer, seq_len=seq_len,
                              batch_size=batch_size, gradient_checkpointing=gradient_checkpointing, gpus=gpus,
                              sharding=sharding, offload=offloaded, master_weights=master_weights, **lora)

    def peak(gpus: int, sharding: str, offloaded: bool) -> tuple[Settings, Budget]:
        s = settings(gpus, sharding, offloaded)
        return s, estimate_settings(c, s)

    candidates = [(s, False) for s in STRATEGIES] + ([(s, True) for s in STRATEGIES[1:]] if offload else [])
    best = None
    for sharding, offloaded in candidates:
        if peak(max_gpus, sharding, offloaded)[1].peak > usable:
            continue
        low, high = 1, max_gpus  # the smallest N that fits: fits(high) holds throughout
        while low < high:
            middle = (low + high) // 2
            if peak(middle, sharding, offloaded)[1].peak <= usable:
                high = middle
            else:
                low = middle + 1
        if best is None or low < best[0]:
            best = (low, sharding, offloaded)
    if best is not None:
        gpus, sharding, offloaded = best
        if gpus == 1 and not offloaded:
            sharding = "none"  # on one GPU every strategy is DDP's
        s, b = peak(gpus, sharding, offloaded)
        return GpuPlan(True, c.name, method, gpu, usable, gpus, sharding, offloaded, s, b)
    s, b = peak(max_gpus, "full", offload)
    unsplit = b.activations + b.transient + b.sharding_buffers
    if unsplit > usable:
        reason = (f"even fully sharded over {max_gpus} GPUs, what sharding cannot divide takes {format_bytes(unsplit)} "
                  f"per GPU (activations {format_bytes(b.activations)}, backward buffers {format_bytes(b.transient)}, "
                  f"gathered layers {format_bytes(b.sharding_buffers)}) > {format_bytes(usable)} usable; "
                  + ("turn on gradient checkpointing, " if not gradient_checkpointing else "")
                  + "shorten the sequences, or use GPUs with more memory")
    else:
        reason = (f"fully sharded over {max_gpus} GPUs the peak is still {format_bytes(b.peak)} per GPU "
                  f"> {format_bytes(usable)} usable; allow more GPUs (max_gpus, --max-gpus) or offload to the CPU")
    return GpuPlan(False, c.name, method, gpu, usable, max_gpus, "full", offload, s, b, reason)
