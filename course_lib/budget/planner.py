"""The planner: the seeds' decision tree for a GPU's memory, checked by the estimate.

`plan(model, gpu_memory)` returns the first configuration (method, r, micro-batch or GradCache
chunk, checkpointing, quantization) whose `course_lib.budget.estimate` peak fits, or says why
nothing does; `seed_recipe` is seed 000's tree itself. `course-lib plan` prints it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from ..checks import fraction, optional_positive_int
from .configs import get_config
from .estimate import Budget, GiB, _names, estimate_settings, format_bytes, parse_memory
from .settings import Settings

MAX_PLAN_BATCH = 10**12
"""The largest effective batch `plan` takes: it finds the batch's divisors in about √batch steps."""


@dataclass
class Plan:
    """What `plan` chose: ``settings`` (a `Settings`, every default filled in) and ``budget``, their estimate.

    When nothing fits, ``fits`` is False, ``settings`` and ``budget`` describe the smallest
    configuration tried, and ``reason`` says what is too big. ``tried`` has one line per method and
    checkpointing choice that did not fit, ``seed_recipe`` what seed 000's tree says for this GPU.
    """

    fits: bool
    model: str
    gpu_memory: int
    usable: int
    seed_recipe: str
    settings: Settings
    budget: Budget
    tried: list[str] = field(default_factory=list)
    reason: str = ""
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """Human-readable: the verdict, the settings, the estimate's table, what was tried."""
        s = self.settings
        lines = [f"{self.model} on {format_bytes(self.gpu_memory)} ({format_bytes(self.usable)} usable after headroom)",
                 f"seed 000's tree for this GPU: {self.seed_recipe}"]
        lines += [f"  tried: {t}" for t in self.tried]
        if self.fits:
            recipe = s.method + ("" if s.method == "full" else f" r={s.r} on {_names(s.target_modules)}")
            if s.method == "qlora":
                recipe += f" ({s.quant_type}{', double quantization' if s.double_quant else ''})"
            split = (f"GradCache chunks of {s.chunk_size}" if s.chunk_size
                     else f"gradient accumulation {s.gradient_accumulation_steps}"
                     if s.gradient_accumulation_steps > 1 else "the whole batch at once")
            lines.append(f"plan: {recipe}, batch {s.batch_size} x {s.seq_len} tokens, {split}, "
                         f"checkpointing {'on' if s.gradient_checkpointing else 'off'}, "
                         f"estimated peak {format_bytes(self.budget.peak)}")
        else:
            lines.append(f"nothing fits: {self.reason}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines + ["", self.budget.table()])

    def to_dict(self) -> dict:
        return {"fits": self.fits, "model": self.model, "gpu_memory": self.gpu_memory, "usable": self.usable,
                "seed_recipe": self.seed_recipe, "settings": self.settings.to_dict(), "budget": self.budget.to_dict(),
                "tried": self.tried, "reason": self.reason, "notes": self.notes}


def divisors_descending(n: int) -> list[int]:
    """Every divisor of ``n``, largest first: the ways `plan` can split a batch of ``n`` sequences.

    Found in pairs (d, n // d) with d up to √n, so a batch of 10^12 takes a million steps, not 10^12.
    """
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return [n // d for d in small if n // d != d] + small[::-1]


def seed_recipe(gpu_memory: int) -> tuple[str, list[str], int, int | None]:
    """Seed 000's decision tree: (its words, methods, r, GradCache chunk) for a GPU of ``gpu_memory`` bytes."""
    gib = gpu_memory / GiB
    if gib >= 24:
        return "full fine-tuning (optional) or LoRA r=32 + MRL", ["full", "lora"], 32, None
    if gib >= 12:
        return "LoRA r=16 + MRL", ["lora"], 16, None
    if gib >= 8:
        return "LoRA r=16 + GradCache (chunk 32) + MRL", ["lora"], 16, 32
    return "LoRA r=8 + GradCache (chunk 16), MRL off", ["lora"], 8, 16


def plan(model, gpu_memory, *, batch_size: int | None = None, seq_len: int = 512, headroom: float = 0.1,
         weight_dtype: str = "bfloat16", optimizer: str = "adamw", target_modules=None) -> Plan:
    """The settings the estimate says fit ``gpu_memory`` (bytes, or a string like ``"24GB"``).

    Start from seed 000's tree for the GPU (`seed_recipe`), add QLoRA (NF4 with double
    quantization, seeds 001 and 003) as the next method, then follow the seed's out-of-memory
    ladder: for each method, without and then with gradient checkpointing, split the batch into
    ever smaller pieces (GradCache chunks for an encoder, whose contrastive loss needs the whole
    batch; gradient accumulation for a causal LM), starting at the tree's chunk size; last, lower r.
    The first configuration whose `Budget.peak` is at most ``(1 - headroom) · gpu_memory`` wins;
    the headroom is for the CUDA context, fragmentation and kernels' workspace.

    ``batch_size`` is the effective batch (default 64 sequences for an encoder, seed 000's
    configuration B, and 4 for a causal LM, seed 001's 70B recipe); it is kept whole, and at most
    `MAX_PLAN_BATCH`. The LoRA targets default to the attention projections (q, k, v, o; query,
    key, value for BERT); given ones are checked against the model even where full fine-tuning fits.
    """
    c = get_config(model)
    gpu = parse_memory(gpu_memory)
    fraction("headroom", headroom, "the share of the GPU memory kept free")
    encoder = c.architecture == "bert"
    batch = optional_positive_int("batch_size", batch_size)
    batch = batch if batch is not None else (64 if encoder else 4)
    if batch > MAX_PLAN_BATCH:
        raise ValueError(f"batch_size must be at most {MAX_PLAN_BATCH:,} for plan, which tries the batch's divisors "
                         f"as micro-batches; got {batch:,}: plan a smaller batch, or estimate this one with budget")
    usable = int(gpu * (1 - headroom))
    words, methods, r_tree, chunk_tree = seed_recipe(gpu)
    if target_modules is None:
        targets = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj"], "bert": ["query", "key", "value"],
                   "gpt": ["q_proj", "k_proj", "v_proj", "out_proj"]}[c.architecture]
    else:  # checked here, once: the first rung may be full fine-tuning, which has no targets to check
        targets = target_modules
        Settings.build(c, "lora", target_modules=targets, seq_len=seq_len)
    pieces = divisors_descending(batch)
    if chunk_tree is not None:
        pieces = [d for d in pieces if d <= chunk_tree] or [1]
    mrl = ("MRL adds a loss over a few truncations of the same embedding: no memory worth modelling "
           "(the seed's '+5-10%' is not reproduced here)")
    notes = [mrl] if encoder else []

    def rung(method: str, r: int, checkpointing: bool, piece: int) -> Settings:
        """One rung of the ladder: ``piece`` sequences per forward pass, as GradCache chunks or micro-batches."""
        lora = {} if method == "full" else {"r": r, "target_modules": targets}
        split = ({"batch_size": batch, "chunk_size": piece if piece < batch else None} if encoder
                 else {"batch_size": piece, "gradient_accumulation_steps": batch // piece})
        return Settings.build(c, method, weight_dtype=weight_dtype, optimizer=optimizer, seq_len=seq_len,
                              gradient_checkpointing=checkpointing, **lora, **split)

    def largest_fitting(method: str, r: int, checkpointing: bool) -> tuple[Settings, Budget, bool]:
        """The first of ``pieces`` (largest first) whose peak fits, or the smallest piece and False.

        The peak grows with the piece (every activation and backward buffer is proportional to the
        tokens in one forward pass), so a bisection finds what trying each piece in turn would, in
        about log2(divisors) estimates; an encoder's whole batch (no GradCache) is tried on its own."""
        def fits(piece: int) -> tuple[Settings, Budget, bool]:
            s = rung(method, r, checkpointing, piece)
            b = estimate_settings(c, s)
            return s, b, b.peak <= usable

        chunked = pieces
        if encoder and pieces[0] == batch:
            whole = fits(batch)
            if whole[2] or len(pieces) == 1:
                return whole
            chunked = pieces[1:]
        low, high = 0, len(chunked) - 1  # find the first index that fits, in a list whose later pieces fit more
        found = None
        while low <= high:
            middle = (low + high) // 2
            attempt = fits(chunked[middle])
            if attempt[2]:
                found, high = attempt, middle - 1
            else:
                low = middle + 1
        return found or fits(chunked[-1])

    tried, smallest = [], None
    ladder = [(m, r_tree, ck) for m in [*methods, "qlora"] for ck in (False, True)]
    ladder += [("qlora", r, True) for r in (8, 4) if r < r_tree]
    for method, r, checkpointing in ladder:
        s, b, fit = largest_fitting(method, r, checkpointing)
        piece = s.chunk_size or s.batch_size
        if fit:
            if s.chunk_size:
                whole = estimate_settings(c, replace(s, chunk_size=None))
                if whole.peak <= usable:
                    notes.append(f"the tree's GradCache is not needed here: the whole batch fits "
                                 f"(peak {format_bytes(whole.peak)}); chunks only cost a second forward pass")
            return Plan(True, c.name, gpu, usable, words, s, b, tried, notes=notes)
        smallest = (s, b)
        tried.append(f"{method}" + ("" if method == "full" else f" r={r}")
                     + f", checkpointing {'on' if checkpointing else 'off'}: even at "
                     + (f"chunk {piece}" if encoder else f"micro-batch {piece}")
                     + f" the peak is {format_bytes(b.peak)} > {format_bytes(usable)}")
    s, b = smallest
    held = b.weights + b.lora_parameters + b.optimizer_state
    if held > usable:
        reason = (f"the 4-bit weights alone take {format_bytes(b.weights)}, more than the {format_bytes(usable)} "
                  f"usable on this GPU; a larger GPU, several GPUs, or a smaller model")
    else:
        reason = (f"with QLoRA r={s.r}, checkpointing and one sequence of {seq_len} tokens per step the peak is "
                  f"{format_bytes(b.peak)} (activations {format_bytes(b.activations)}, backward buffers "
                  f"{format_bytes(b.transient)}) > {format_bytes(usable)}; shorten the sequences")
    return Plan(False, c.name, gpu, usable, words, s, b, tried, reason, notes)
