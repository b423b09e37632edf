"""Memory budget of a fine-tuning run from a model's config alone: no weights, no GPU needed.

A training step holds five kinds of tensors, and `estimate` gives each a line:

* **weights**: the frozen or trained base weights, in ``weight_dtype``; with QLoRA the linear
  layers of the transformer blocks in 4 bits (NF4 codes plus their absmax constants, counted
  byte for byte as `course_lib.quant` and bitsandbytes store them);
* **LoRA parameters**: ``r · (in + out)`` per adapted linear layer, in ``lora_dtype``;
* **gradients**: one per trainable parameter, in the trainable parameters' dtype;
* **optimizer state**: AdamW's two moments (32-bit: 8 bytes per trainable parameter; 8-bit:
  about 2), or nothing for plain SGD;
* **activations**: the tensors autograd saves for backward, from the formula of
  `activation_parts` (per layer: the normalised inputs, the attention's inputs and output, the
  MLP's intermediates, the LoRA branches' inputs; then the loss's log-probabilities).

On several GPUs (``gpus``, ``sharding``, ``offload``) every line is one GPU's: ZeRO / FSDP divide
the first four as `course_lib.budget.sharding` says, a sixth line, ``sharding_buffers``, holds the
unsharded tensors of the units being gathered or reduced, and the activations stay those of one
GPU's micro-batch. ``master_weights`` adds the float32 master copy to the optimizer state.

Their sum is what `course_lib.memory.measure_step` counts on a real model: on SmolLM2 and MiniLM
(CPU, float32, full fine-tuning, LoRA and QLoRA, with and without checkpointing) the two agree
within 1%, and the tests hold them within 10%. `Budget.transient` adds the largest short-lived
buffer of the backward pass (the loss's gradient over the vocabulary), which no tensor count
sees but a GPU must have room for; ``Budget.peak`` is the sum of both. The CUDA context and
allocator fragmentation are left to `plan`'s headroom.

What a step is estimated for is a `Settings` (`course_lib.budget.settings`), checked when it is
built; `course_lib.budget.planner` searches those settings for the ones that fit a GPU.

GPU memory is sold in binary units (a "24 GB" card holds 24 GiB), so ``"24GB"`` means 24 · 2³⁰
bytes here, and figures are printed in MiB and GiB.
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, fields
from decimal import Decimal
from fractions import Fraction

from .configs import ModelConfig, get_config
from .settings import DTYPE_BYTES, OPTIMIZERS, Settings, lora_targets
from .sharding import ModelStates, describe, per_gpu

GiB, MiB = 2**30, 2**20


# ---------------------------------------------------------------------------------------------
# Sizes: 4-bit storage, LoRA, memory units
# ---------------------------------------------------------------------------------------------
def four_bit_storage_bytes(numel: int, double_quant: bool = True, blocksize: int = 64) -> int:
    """Bytes of one weight stored in 4 bits, as `course_lib.quant.quantize_blockwise` stores it.

    Two codes per byte, one absmax per block of ``blocksize`` values: float32 (4.5 bits per weight
    at blocksize 64) or, with double quantization, one uint8 code per block plus a float32 per 256
    blocks and one float32 offset (4 + 8/64 + 32/(64·256) ≈ 4.127 bits).
    """
    blocks = -(-numel // blocksize)
    if double_quant:
        return -(-numel // 2) + blocks + 4 * -(-blocks // 256) + 4
    return -(-numel // 2) + 4 * blocks


_UNITS = {"": GiB, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": MiB, "mb": MiB, "mib": MiB,
          "g": GiB, "gb": GiB, "gib": GiB, "t": 2**40, "tb": 2**40, "tib": 2**40}
MAX_MEMORY = 2**60
"""The most `parse_memory` accepts: 1 EiB (1,048,576 TiB), far above any GPU, and finite."""
_FORM = "write it like 24GB, 8GiB or 512MB (GB is read as GiB), or give a whole number of bytes"


def _shown(value) -> str:
    """``repr(value)``, cut short: an error message stays one readable line whatever was typed."""
    try:
        text = repr(value)
    except ValueError:  # an int past Python's 4300-digit str() limit
        return f"an integer of {value.bit_length()} bits"
    return text if len(text) <= 40 else f"{text[:30]}... ({len(text)} characters)"


def parse_memory(value: str | float) -> int:
    """Bytes from ``"24GB"``, ``"24 GiB"``, ``"512MB"`` or ``"24"`` (GiB); a number is taken as bytes.

    GB is read as GiB, as GPU memory is sold (see the module doc). Anything that is not between one
    byte and `MAX_MEMORY` (zero, negative, nan, infinite, ``"1e400GB"``) raises a one-line
    ``ValueError`` that says the accepted form.
    """
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        unit = "b"
        try:
            number = int(value) if isinstance(value, numbers.Integral) else float(value)  # an int stays exact
        except OverflowError:  # a Fraction or Decimal beyond float
            number = math.inf
    else:
        match = re.fullmatch(r"\s*([-+]?[0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        if not match or match.group(2).lower() not in _UNITS:
            raise ValueError(f"cannot read {_shown(value)} as an amount of memory; {_FORM}")
        number, unit = float(match.group(1)), match.group(2).lower()  # a long digit string is inf, not an error
    if not number > 0:  # also nan
        raise ValueError(f"memory must be positive, got {_shown(value)}; {_FORM}")
    if number > MAX_MEMORY / _UNITS[unit]:  # also inf
        raise ValueError(f"memory must be at most 1 EiB (2**60 bytes), got {_shown(value)}; {_FORM}")
    n = int(number * _UNITS[unit])
    if n < 1:
        raise ValueError(f"memory must be at least one byte, got {_shown(value)}; {_FORM}")
    return n


def format_bytes(n: float) -> str:
    """``3.52 GiB`` / ``26.0 MiB`` / ``512 B``: binary units, three significant figures.

    From a million TiB on, a power of ten: ``6.32e+17 TiB`` (exact for integers of any size).
    """
    if abs(n) >= 10**6 * 2**40:
        return f"{Decimal(n) / 2**40:.2e} TiB"
    for unit, size in (("TiB", 2**40), ("GiB", GiB), ("MiB", MiB), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}" if n / size < 1000 else f"{n / size:.0f} {unit}"
    return f"{n:.0f} B"


# ---------------------------------------------------------------------------------------------
# The estimate
# ---------------------------------------------------------------------------------------------
LINES = ("weights", "lora_parameters", "gradients", "optimizer_state", "activations", "sharding_buffers")


@dataclass
class Budget:
    """An estimate in bytes, one field per line of the breakdown, plus what it was computed for.

    ``total`` is what the step holds (the six lines); ``transient`` the largest short-lived buffer
    of the backward pass; ``peak = total + transient``. On several GPUs every figure is one GPU's
    (``sharding_buffers`` is 0 without sharding); ``model_states`` is ZeRO's "model states", the
    weights, LoRA parameters, gradients and optimizer state. ``activation_parts`` splits the activations
    by where they come from (per-layer parts already multiplied by the number of layers).
    """

    weights: int
    lora_parameters: int
    gradients: int
    optimizer_state: int
    activations: int
    sharding_buffers: int
    transient: int
    parameters: int
    trainable_parameters: int
    activation_parts: dict[str, int]
    settings: Settings

    @property
    def total(self) -> int:
        return sum(getattr(self, line) for line in LINES)

    @property
    def peak(self) -> int:
        return self.total + self.transient

    @property
    def model_states(self) -> int:
        return self.weights + self.lora_parameters + self.gradients + self.optimizer_state

    def to_dict(self) -> dict:
        """Plain numbers (bytes) and settings, for ``json.dumps``."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out.update(activation_parts=dict(self.activation_parts), settings=self.settings.to_dict(),
                   total=self.total, peak=self.peak)
        return out

    def table(self, gpu_memory: int | None = None) -> str:
        """The breakdown as an aligned text table (what ``course-lib budget`` prints)."""
        s = self.settings
        head = (f"{s.model}  {s.method}"
                + (f" r={s.r} on {_names(s.target_modules)}" if s.method != "full" else "")
                + f"  {s.weight_dtype}  {s.optimizer}  batch {s.batch_size} x {s.seq_len} tokens"
                + (f"  GradCache chunks of {s.chunk_size}" if s.chunk_size else "")
                + (f"  accumulation {s.gradient_accumulation_steps}" if s.gradient_accumulation_steps > 1 else "")
                + ("  checkpointing" if s.gradient_checkpointing else "")
                + ("  fp32 master weights" if s.master_weights else ""))
        rows = [("weights", self.weights), ("LoRA parameters", self.lora_parameters), ("gradients", self.gradients),
                ("optimizer state", self.optimizer_state), ("activations", self.activations)]
        if s.shards != "none":
            rows.append(("sharding buffers", self.sharding_buffers))
        rows += [("total", self.total), ("+ transient in backward", self.transient), ("peak", self.peak)]
        lines = [head] + ([describe(s)] if describe(s) else [])
        lines += [f"parameters {self.parameters:,}, trainable {self.trainable_parameters:,}"]
        lines += [f"  {name:<24}{format_bytes(value):>12}" for name, value in rows]
        if gpu_memory is not None:
            spare = gpu_memory - self.peak
            verdict = "fits" if spare >= 0 else "does not fit"
            lines.append(f"{verdict} in {format_bytes(gpu_memory)}: "
                         + (f"{format_bytes(spare)} to spare" if spare >= 0 else f"{format_bytes(-spare)} short"))
        return "\n".join(lines)


def _names(target_modules) -> str:
    return target_modules if isinstance(target_modules, str) else ",".join(target_modules)


def estimate(config, method: str = "lora", *, r: int | None = None, target_modules=None,
             weight_dtype: str = "bfloat16", lora_dtype: str = "float32", quant_type: str | None = None,
             double_quant: bool | None = None, optimizer: str = "adamw", gradient_checkpointing: bool = False,
             batch_size: int = 1, seq_len: int = 512, gradient_accumulation_steps: int = 1,
             chunk_size: int | None = None, attention: str = "sdpa", device: str = "cuda", gpus: int = 1,
             sharding: str = "none", offload: bool = False, master_weights: bool = False,
             quant_storage: str | None = None) -> Budget:
    """The memory of one training step of ``config`` with ``method`` ("full", "lora" or "qlora").

    * ``r``, ``target_modules`` (peft's names: ``["q_proj", "v_proj"]``, ``"all-linear"``...): LoRA
      and QLoRA only; defaults r=8 on the query and value projections.
    * ``weight_dtype``: the dtype of every weight that is not quantized, and of the activations
      (float32, bfloat16 or float16). Full fine-tuning in bfloat16 keeps no float32 master copy
      unless ``master_weights``.
    * ``lora_dtype``: the adapters' dtype; float32 by default, as peft and `course_lib.lora` keep them
      beside a half-precision or quantized base (each adapted layer then saves a float32 copy of its input).
    * ``quant_type`` ("nf4" or "fp4") and ``double_quant`` (default True): QLoRA only.
    * ``optimizer``: "adamw" (32-bit moments), "adamw16bit" (16-bit moments: torch's AdamW on bfloat16
      parameters), "adamw8bit" (bitsandbytes) or "sgd" (no momentum).
    * ``batch_size``, ``seq_len``: sequences per forward pass and tokens per sequence.
      ``gradient_accumulation_steps`` multiplies the effective batch at no memory cost (the
      gradients are held in full anyway). ``chunk_size``: GradCache for contrastive encoders,
      activations for ``chunk_size`` sequences at a time plus the cached embeddings.
    * ``attention``: "sdpa" (transformers' default) or "eager" (keeps the s×s probabilities).
      ``device``: "cuda" or "cpu", which decides the attention kernel and how dropout stores its mask.
    * ``master_weights``: mixed precision with a float32 master copy of the 16-bit trained weights
      (4 more bytes per trained parameter, in the optimizer state): full fine-tuning in bfloat16
      with AdamW then holds 2 + 2 + 12 = 16 bytes per parameter, as DeepSpeed's bf16 mode does.
    * ``gpus``, ``sharding`` ("none", "optimizer", "optimizer+gradients", "full": ZeRO stages
      0-3), ``offload``: data parallelism over ``gpus`` GPUs, each with a micro-batch of
      ``batch_size``; every figure is then one GPU's (`course_lib.budget.sharding`).
      ``quant_storage``: QLoRA's bnb_4bit_quant_storage, which must be ``weight_dtype`` to shard fully.
    """
    c = get_config(config)
    return estimate_settings(c, Settings.build(
        c, method, r=r, target_modules=target_modules, weight_dtype=weight_dtype, lora_dtype=lora_dtype,
        quant_type=quant_type, double_quant=double_quant, optimizer=optimizer,
        gradient_checkpointing=gradient_checkpointing, batch_size=batch_size, seq_len=seq_len,
        gradient_accumulation_steps=gradient_accumulation_steps, chunk_size=chunk_size, attention=attention,
        device=device, gpus=gpus, sharding=sharding, offload=offload, master_weights=master_weights,
        quant_storage=quant_storage))


def estimate_settings(config, settings: Settings) -> Budget:
    """`estimate` for settings already built (`Settings.build`): what the planner calls."""
    c, s = get_config(config), settings
    if s.model != c.name:
        raise ValueError(f"these settings were built for {s.model}, not {c.name}")
    a, ell = DTYPE_BYTES[s.weight_dtype], DTYPE_BYTES[s.lora_dtype]
    parameters = c.parameters()
    targets = lora_targets(c, s.target_modules) if s.method != "full" else []
    lora_params = sum(s.r * (i + o) for _, i, o, _ in targets)
    if s.method == "qlora":
        quantized = sum(i * o for _, i, o, _ in c.linears())
        four_bit = sum(four_bit_storage_bytes(i * o, s.double_quant) for _, i, o, _ in c.linears())
        weights = four_bit + (parameters - quantized) * a
    else:
        weights = parameters * a
    trainable = parameters if s.method == "full" else lora_params
    grad_bytes = a if s.method == "full" else ell
    optimizer_state = _optimizer_bytes(trainable, s.optimizer) + (4 * trainable if s.master_weights else 0)
    states = _model_states(c, s, targets, weights, lora_params * ell, trainable * grad_bytes, optimizer_state)
    parts = activation_parts(c, s, targets)
    return Budget(**per_gpu(states, s), activations=sum(parts.values()), transient=_transient(c, s),
                  parameters=parameters + lora_params, trainable_parameters=trainable, activation_parts=parts,
                  settings=s)


def _model_states(c: ModelConfig, s: Settings, targets: list, weights: int, lora_bytes: int, gradients: int,
                  optimizer_state: int) -> ModelStates:
    """The whole model's states and the sizes of its FSDP units: one transformer block, and the rest (the root)."""
    a, ell = DTYPE_BYTES[s.weight_dtype], DTYPE_BYTES[s.lora_dtype]
    linears = c.block_linears().values()
    norms = (2 if c.architecture == "llama" else 4) * c.hidden_size  # RMSNorm: a weight; LayerNorm: and a bias
    block_params = sum(i * o + (o if b else 0) for i, o, b in linears) + norms
    if s.method == "qlora":
        block_stored = sum(four_bit_storage_bytes(i * o, s.double_quant) + (o if b else 0) * a for i, o, b in linears)
        block_stored += norms * a
    else:
        block_stored = block_params * a
    block_lora = sum(s.r * (i + o) for n, i, o, _ in targets if n.startswith("layers.0."))
    block_trained = block_params if s.method == "full" else block_lora
    L = c.num_hidden_layers
    grad_bytes = a if s.method == "full" else ell
    return ModelStates(weights, lora_bytes, gradients, optimizer_state,
                       block_weights=block_stored + block_lora * ell, root_weights=weights + lora_bytes
                       - L * (block_stored + block_lora * ell), block_gradients=block_trained * grad_bytes,
                       root_gradients=gradients - L * block_trained * grad_bytes, layers=L)


def _optimizer_bytes(trainable: int, optimizer: str) -> int:
    """``ceil(trainable · bytes per parameter)``, exactly: a float product overflows for absurd ranks."""
    return math.ceil(Fraction(OPTIMIZERS[optimizer]) * trainable)


# ---------------------------------------------------------------------------------------------
# Activations: what autograd saves for backward
# ---------------------------------------------------------------------------------------------
def activation_parts(config: ModelConfig, settings: Settings, targets: list) -> dict[str, int]:
    """Bytes autograd saves for backward in one step, by part (`estimate`'s ``activation_parts``).

    Derived from what each operation keeps for its gradient, and checked tensor by tensor against
    `course_lib.memory.SavedActivations` on SmolLM2 and MiniLM (within 1%: under LoRA the first
    layer's input needs no gradient, so it keeps a little less than the others). Notation: T tokens per forward pass (micro-batch ×
    seq_len, or GradCache chunk × seq_len), s = seq_len, h hidden, i intermediate, hq = heads ×
    head_dim, hkv = KV heads × head_dim, nh heads; a bytes per activation (``weight_dtype``), ℓ per
    LoRA value (``lora_dtype``), m per dropout-mask value (1 on CUDA, a bool mask; a on CPU, which
    keeps a float noise tensor). Per layer and token:

    * **norms**: RMSNorm keeps its float32 input and 1/rms, 4h + 4, plus the normalised a·h when its
      weight trains; LayerNorm its input a·h and mean and 1/std, 8.
    * **attention**: q, k, v, a·(hq + 2·hkv). transformers' ``sdpa`` runs a fused kernel
      (FlashAttention, or PyTorch's CPU flash kernel) that keeps its output a·hq and the float32
      log-sum-exp 4·nh, never the s × s scores. The ``eager`` path, and PyTorch's CPU math kernel,
      which ``sdpa`` falls back to for attention dropout, keep the probabilities instead: a·nh·s
      (Llama's eager softmax: 4·nh·s in float32, plus the a-copy in half precision), and with
      dropout its mask m·nh·s and the dropped probabilities a·nh·s; k and v are repeated to hq.
      On CUDA a grouped-query model in float32 gets that math kernel too (`_sdpa_is_fused`; on an
      H200, SmolLM2 in float32: within 0.4% of `SavedActivations`, 11-14% above the fused figure).
    * **MLP**: the activation's input a·i (Llama: gate output, its SiLU and the up output, 3a·i).
    * **dropout** (BERT, GPT, in training): a mask m·h after the attention and after the MLP.
    * **linear inputs**: the input of a layer whose weight trains is kept: a·(its size) once per
      input shared by several layers (q/k/v, gate/up). A LoRA layer keeps its own ℓ-copy when ℓ ≠ a
      (peft casts the input to the adapter's dtype) and r·ℓ for A's output. Frozen layers keep
      only their weight, which is not an activation; a 4-bit layer keeps nothing.

    Outside the layers: the final norm and the loss's float32 log-probabilities 4·V per token (causal
    LM); for an encoder, mean pooling's mask a, and the last hidden state a·h when BERT's pooler
    trains (it keeps a view of it); the token ids when the embeddings train.

    With gradient checkpointing each layer keeps only its input, a·h, and its activations come back
    one layer at a time during backward, after the loss's have been freed: the peak is
    L·a·h + max(loss and final norm, one recomputed layer). PyTorch's default non-reentrant
    checkpoint recomputes under its own hooks, so ``SavedActivations`` sees the kept inputs but not
    the recomputed layer (transformers' default; ``use_reentrant=True`` shows both).
    """
    c, s = config, settings
    a = DTYPE_BYTES[s.weight_dtype]
    tokens = s.tokens
    layer, shared_input = _layer_bytes(c, s, targets)
    L, h = c.num_hidden_layers, c.hidden_size
    full = s.method == "full"
    input_grads = full or s.gradient_checkpointing  # transformers makes the embeddings' output require grad
    parts = {}
    ids = 16 if c.architecture == "bert" else 8  # token ids (and BERT's token types) for the embeddings' backward
    before = (ids if full else 0) * tokens
    if c.architecture == "bert" and input_grads:
        before += tokens * (a * h + 8 + _mask_bytes(c, s) * h)  # embedding LayerNorm and dropout
    parts["embeddings"] = before
    after = _head_bytes(c, s, targets) * tokens
    if s.gradient_checkpointing:
        parts["layer inputs kept by checkpointing"] = L * tokens * h * a
        recompute = (sum(layer.values()) - shared_input) * tokens
        if recompute > after:
            parts["one layer recomputed in backward"] = recompute
        else:
            parts["final norm and loss (more than one recomputed layer)"] = after
    else:
        parts.update({f"layers: {k}": L * tokens * v for k, v in layer.items() if v})
        parts["final norm and loss" if c.architecture != "bert" else "pooling and loss"] = after
    if c.architecture == "llama":
        parts["rotary cos and sin"] = 2 * s.seq_len * c.head_size * a
    if s.chunk_size:
        parts["GradCache: cached embeddings and their gradients"] = 2 * s.batch_size * h * 4
    return {k: int(v) for k, v in parts.items()}


def _mask_bytes(c: ModelConfig, s: Settings) -> int:
    return 0 if c.dropout == 0 else (1 if s.device == "cuda" else DTYPE_BYTES[s.weight_dtype])


def _layer_bytes(c: ModelConfig, s: Settings, targets: list) -> tuple[dict[str, float], float]:
    """Bytes per token saved by one block, by part, and how much of it is the block's input storage."""
    a, ell, m = DTYPE_BYTES[s.weight_dtype], DTYPE_BYTES[s.lora_dtype], _mask_bytes(c, s)
    h, i, nh, seq = c.hidden_size, c.intermediate_size, c.num_attention_heads, s.seq_len
    hq, hkv = nh * c.head_size, c.num_key_value_heads * c.head_size
    full = s.method == "full"
    wrapped = {n.split(".", 2)[2] for n, *_ in targets if n.startswith("layers.0.")}
    linears = c.block_linears()

    def inputs(group: list[str], size: int, saved_anyway: bool = False) -> float:
        """A linear input shared by ``group``: kept once if a weight trains on it, or per LoRA copy."""
        lora = [n for n in group if n in wrapped]
        if full or (lora and ell == a):
            return 0 if saved_anyway else a * size
        return len(lora) * ell * size

    names = list(linears)
    parts = {"LoRA A outputs": len(wrapped) * s.r * ell if wrapped else 0}
    fused = s.attention == "sdpa" and _sdpa_is_fused(c, s)
    if fused:
        attention = a * (hq + 2 * hkv) + a * hq + 4 * nh
    else:
        kv = max(hq, hkv)  # eager and math repeat k and v to every query head
        probs = (4 + (a if a != 4 else 0)) * nh * seq if c.architecture == "llama" else a * nh * seq
        if c.dropout:
            probs += (m + a) * nh * seq
        attention = a * (hq + 2 * kv) + probs
    parts["attention"] = attention
    if c.architecture == "llama":
        norm = 4 * h + 4 + (a * h if full else 0)
        parts["norms"] = 2 * norm
        parts["MLP: gate, SiLU, up"] = 3 * a * i
        parts["linear inputs"] = (inputs(names[0:3], h) + inputs(names[3:4], hq, saved_anyway=fused)
                                  + inputs(names[4:6], h) + inputs(names[6:7], i))
        shared = 4 * h if a == 4 else 0  # in float32 the norm keeps the layer's input itself
    else:  # bert (post-norm) and gpt (pre-norm): LayerNorm, GELU, dropout after attention and MLP
        parts["norms"] = 2 * (a * h + 8)
        parts["dropout masks"] = 2 * m * h
        parts["MLP: GELU input"] = a * i
        parts["linear inputs"] = (inputs(names[0:3], h) + inputs(names[3:4], hq, saved_anyway=fused)
                                  + inputs(names[4:5], h) + inputs(names[5:6], i))
        # BERT's block input feeds q, k, v; GPT's feeds its first LayerNorm, which keeps it
        shared = (a * h if c.architecture == "gpt" else (inputs(names[0:3], h) if full or ell == a else 0))
    return parts, shared


def _sdpa_is_fused(c: ModelConfig, s: Settings) -> bool:
    """Whether PyTorch's ``scaled_dot_product_attention`` picks a kernel that keeps no s × s
    probabilities: on CPU its flash kernel, unless attention dropout sends it to the math kernel;
    on CUDA FlashAttention (16-bit only) or the memory-efficient kernel (no grouped-query mode), so
    a grouped-query model in float32 falls back to the math kernel."""
    if s.device == "cpu":
        return c.dropout == 0
    grouped_query = c.num_key_value_heads < c.num_attention_heads
    return not (grouped_query and s.weight_dtype == "float32")


def _head_bytes(c: ModelConfig, s: Settings, targets: list) -> float:
    """Bytes per token kept after the last block: final norm, output layer input, the loss's log-probabilities."""
    a = DTYPE_BYTES[s.weight_dtype]
    h, full = c.hidden_size, s.method == "full"
    if c.architecture == "bert":  # mean pooling keeps the mask; a trained pooler keeps the last hidden state
        pooler = full or any(n == "pooler.dense" for n, *_ in targets)
        return a + (a * h if pooler else 0)
    norm = 4 * h + 4 + (a * h if full else 0) if c.architecture == "llama" else a * h + 8
    return norm + (a * h if full else 0) + 4 * c.vocab_size + 8


def _transient(c: ModelConfig, s: Settings) -> int:
    """The largest buffers that live only inside backward: the loss's float32 gradients with respect to
    the log-probabilities and the logits (2 · 4·V per token) for a causal LM; with QLoRA, also the
    largest weight dequantized for one matmul."""
    tokens = s.tokens
    loss = 8 * tokens * c.vocab_size if c.architecture != "bert" else 0
    dequantized = max(i * o for _, i, o, _ in c.linears()) * DTYPE_BYTES[s.weight_dtype]
    return loss + (dequantized if s.method == "qlora" else 0)

