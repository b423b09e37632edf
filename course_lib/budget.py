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

Their sum is what `course_lib.memory.measure_step` counts on a real model: on SmolLM2 and MiniLM
(CPU, float32, full fine-tuning, LoRA and QLoRA, with and without checkpointing) the two agree
within 1%, and the tests hold them within 10%. `Budget.transient` adds the largest short-lived
buffer of the backward pass (the loss's gradient over the vocabulary), which no tensor count
sees but a GPU must have room for; ``Budget.peak`` is the sum of both. The CUDA context and
allocator fragmentation are left to `plan`'s headroom.

`plan` turns the seeds' decision tree (seed 000: LoRA r=32 / 16 / 16 + GradCache / 8 + GradCache
by VRAM, full fine-tuning optional from 24 GB; seeds 001 and 003: QLoRA with NF4, double
quantization and gradient checkpointing when the 16-bit weights do not fit) into settings that
the estimate says fit, or says why nothing does.

GPU memory is sold in binary units (a "24 GB" card holds 24 GiB), so ``"24GB"`` means 24 · 2³⁰
bytes here, and figures are printed in MiB and GiB.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
METHODS = ("full", "lora", "qlora")
OPTIMIZERS = {"adamw": 8.0, "adamw8bit": 2 + 2 * 4 / 2048, "sgd": 0.0}
"""Optimizer state in bytes per trainable parameter: AdamW keeps two float32 moments; bitsandbytes'
8-bit AdamW two uint8 moments plus one float32 absmax per block of 2048 values for each (tensors
under 4096 values stay 32-bit there, which is not modelled); SGD without momentum keeps nothing.
torch's AdamW on bfloat16 parameters keeps bfloat16 moments (4 bytes): that is not "adamw" here."""
ATTENTION = ("sdpa", "eager")
ARCHITECTURES = ("llama", "bert", "gpt")
GiB, MiB = 2**30, 2**20


# ---------------------------------------------------------------------------------------------
# Model configs: transformers' numbers, written down from the published configs
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelConfig:
    """What the estimator needs of a transformer, in transformers' config names.

    ``architecture`` is the family that fixes the block's layout: ``"llama"`` (pre-norm RMSNorm,
    rotary positions, grouped-query attention, gated SiLU MLP: LLaMA, Qwen2, SmolLM2), ``"bert"``
    (post-norm LayerNorm, learned positions and token types, GELU MLP, a pooler) or ``"gpt"``
    (pre-norm LayerNorm, learned positions, GELU MLP, tied output layer: GPT-2/GPT-3).
    ``qkv_bias`` puts biases on q, k and v only (Qwen2); BERT and GPT have biases everywhere.
    ``dropout`` is the hidden and attention-probability dropout used in training (BERT: 0.1).
    """

    name: str
    architecture: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    head_dim: int | None = None
    qkv_bias: bool = False
    max_position_embeddings: int = 0
    type_vocab_size: int = 0
    dropout: float = 0.0
    published_parameters: int | None = None
    source: str = ""

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture {self.architecture!r} is not modelled; use one of {ARCHITECTURES}")
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "intermediate_size", "vocab_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{self.name}: {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"{self.name}: num_attention_heads ({self.num_attention_heads}) must be a multiple "
                             f"of num_key_value_heads ({self.num_key_value_heads})")
        if self.architecture != "llama" and self.max_position_embeddings <= 0:
            raise ValueError(f"{self.name}: a {self.architecture} model has learned positions; "
                             "give max_position_embeddings")

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def block_linears(self) -> dict[str, tuple[int, int, bool]]:
        """The linear layers of one transformer block: name → (in_features, out_features, bias)."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_size
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        if self.architecture == "llama":
            b = self.qkv_bias
            return {"self_attn.q_proj": (h, q, b), "self_attn.k_proj": (h, kv, b), "self_attn.v_proj": (h, kv, b),
                    "self_attn.o_proj": (q, h, False), "mlp.gate_proj": (h, i, False),
                    "mlp.up_proj": (h, i, False), "mlp.down_proj": (i, h, False)}
        if self.architecture == "bert":
            return {"attention.self.query": (h, q, True), "attention.self.key": (h, kv, True),
                    "attention.self.value": (h, kv, True), "attention.output.dense": (q, h, True),
                    "intermediate.dense": (h, i, True), "output.dense": (i, h, True)}
        return {"attn.q_proj": (h, q, True), "attn.k_proj": (h, kv, True), "attn.v_proj": (h, kv, True),
                "attn.out_proj": (q, h, True), "mlp.fc_in": (h, i, True), "mlp.fc_out": (i, h, True)}

    def other_linears(self) -> dict[str, tuple[int, int, bool]]:
        """Linear layers outside the blocks that QLoRA quantizes and LoRA may target (BERT's pooler)."""
        return {"pooler.dense": (self.hidden_size, self.hidden_size, True)} if self.architecture == "bert" else {}

    def linears(self) -> list[tuple[str, int, int, bool]]:
        """Every linear layer of the model except the output head: (name, in, out, bias)."""
        block = [(f"layers.{n}.{name}", *shape) for n in range(self.num_hidden_layers)
                 for name, shape in self.block_linears().items()]
        return block + [(name, *shape) for name, shape in self.other_linears().items()]

    def parameters(self) -> int:
        """Parameter count, each tied tensor once (``model.parameters()`` counts the same way)."""
        h = self.hidden_size
        linear = sum(i * o + (o if b else 0) for _, i, o, b in self.linears())
        embeddings = self.vocab_size * h
        if self.architecture == "llama":  # RMSNorm: a weight only; two per block and a final one
            norms = (2 * self.num_hidden_layers + 1) * h
            head = 0 if self.tie_word_embeddings else self.vocab_size * h
            return linear + embeddings + norms + head
        embeddings += (self.max_position_embeddings + self.type_vocab_size) * h
        norms = (2 * self.num_hidden_layers + 1) * 2 * h  # LayerNorm: weight and bias; BERT's is on the embeddings
        return linear + embeddings + norms


def _llama(name, h, layers, heads, kv, i, vocab, tied, published, source, **extra) -> ModelConfig:
    return ModelConfig(name, "llama", h, layers, heads, kv, i, vocab, tied, published_parameters=published,
                       source=source, **extra)


MODELS: dict[str, ModelConfig] = {c.name: c for c in (
    _llama("llama-7b", 4096, 32, 32, 32, 11008, 32000, False, 6_740_000_000, "Touvron et al. 2023, Table 2"),
    _llama("llama-13b", 5120, 40, 40, 40, 13824, 32000, False, 13_020_000_000, "Touvron et al. 2023, Table 2"),
    _llama("llama-33b", 6656, 60, 52, 52, 17920, 32000, False, 32_530_000_000, "Touvron et al. 2023, Table 2"),
    _llama("llama-65b", 8192, 80, 64, 64, 22016, 32000, False, 65_290_000_000, "Touvron et al. 2023, Table 2"),
    _llama("llama-2-70b", 8192, 80, 64, 8, 28672, 32000, False, 68_980_000_000, "meta-llama/Llama-2-70b-hf config"),
    _llama("llama-3-8b", 4096, 32, 32, 8, 14336, 128256, False, 8_030_000_000, "meta-llama/Meta-Llama-3-8B config"),
    _llama("llama-3-70b", 8192, 80, 64, 8, 28672, 128256, False, 70_550_000_000, "meta-llama/Meta-Llama-3-70B config"),
    _llama("qwen2.5-7b", 3584, 28, 28, 4, 18944, 152064, False, 7_620_000_000, "Qwen/Qwen2.5-7B config",
           qkv_bias=True),
    _llama("smollm2-135m", 576, 30, 9, 3, 1536, 49152, True, 134_515_008, "HuggingFaceTB/SmolLM2-135M config"),
    ModelConfig("minilm", "bert", 384, 6, 12, 12, 1536, 30522, True, max_position_embeddings=512,
                type_vocab_size=2, dropout=0.1, published_parameters=22_700_000,
                source="sentence-transformers/all-MiniLM-L6-v2 config (a BERT encoder)"),
    _llama("smollm2-1.7b", 2048, 24, 32, 32, 8192, 49152, True, 1_700_000_000,
           "HuggingFaceTB/SmolLM2-1.7B config (model card: 1.7B); seed 001's 1-2B edge-device case"),
    ModelConfig("bert-base", "bert", 768, 12, 12, 12, 3072, 30522, True, max_position_embeddings=512,
                type_vocab_size=2, dropout=0.1, published_parameters=110_000_000,
                source="Devlin et al. 2019 (BERT-base, 110M); seed 000's unnamed ~150M encoder is near it"),
    ModelConfig("gpt-3-175b", "gpt", 12288, 96, 96, 96, 4 * 12288, 50257, True, max_position_embeddings=2048,
                dropout=0.1, published_parameters=175_000_000_000, source="Brown et al. 2020, Table 2.1"),
)}
ALIASES = {"all-minilm-l6-v2": "minilm", "smollm2": "smollm2-135m", "smollm2-135m-instruct": "smollm2-135m",
           "gpt-3": "gpt-3-175b", "llama-2-70b-hf": "llama-2-70b", "meta-llama-3-8b": "llama-3-8b"}


def get_config(model: str | ModelConfig | object) -> ModelConfig:
    """A `ModelConfig` from a known name (see `MODELS`), a `ModelConfig`, or a transformers config.

    A transformers config (an object with ``model_type``, or its ``to_dict()``) of a Llama, Mistral,
    Qwen2, BERT or GPT-2 model is read with the names transformers uses.
    """
    if isinstance(model, ModelConfig):
        return model
    if isinstance(model, str):
        key = model.strip().lower()
        key = ALIASES.get(key, key)
        if key not in MODELS:
            raise ValueError(f"unknown model {model!r}; known models: {', '.join(MODELS)} "
                             "(or pass a ModelConfig or a transformers config)")
        return MODELS[key]
    config = model.to_dict() if hasattr(model, "to_dict") else model
    if not isinstance(config, dict) or "model_type" not in config:
        raise ValueError(f"cannot read a model config from {type(model).__name__}; pass a known model name, "
                         "a ModelConfig, or a transformers config (which has a model_type)")
    return _from_transformers(config)


def _from_transformers(c: dict) -> ModelConfig:
    kind = c["model_type"]
    name = c.get("_name_or_path") or kind
    if kind in ("llama", "mistral", "qwen2"):
        if c.get("attention_bias") or c.get("mlp_bias"):
            raise ValueError(f"{name}: attention_bias / mlp_bias on every projection is not modelled")
        return ModelConfig(name, "llama", c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"],
                           c.get("num_key_value_heads") or c["num_attention_heads"], c["intermediate_size"],
                           c["vocab_size"], bool(c.get("tie_word_embeddings", False)), head_dim=c.get("head_dim"),
                           qkv_bias=kind == "qwen2", dropout=c.get("attention_dropout", 0.0))
    if kind == "bert":
        return ModelConfig(name, "bert", c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"],
                           c["num_attention_heads"], c["intermediate_size"], c["vocab_size"], True,
                           max_position_embeddings=c["max_position_embeddings"],
                           type_vocab_size=c.get("type_vocab_size", 2), dropout=c.get("hidden_dropout_prob", 0.1))
    if kind == "gpt2":
        h = c["n_embd"]
        return ModelConfig(name, "gpt", h, c["n_layer"], c["n_head"], c["n_head"], c.get("n_inner") or 4 * h,
                           c["vocab_size"], True, max_position_embeddings=c["n_positions"],
                           dropout=c.get("resid_pdrop", 0.1))
    raise ValueError(f"model_type {kind!r} is not modelled; supported: llama, mistral, qwen2, bert, gpt2")


# ---------------------------------------------------------------------------------------------
# Sizes: 4-bit storage, LoRA, memory units
# ---------------------------------------------------------------------------------------------
def four_bit_bytes(numel: int, double_quant: bool = True, blocksize: int = 64) -> int:
    """Bytes of one weight stored in 4 bits, as `course_lib.quant.quantize_blockwise` stores it.

    Two codes per byte, one absmax per block of ``blocksize`` values: float32 (4.5 bits per weight
    at blocksize 64) or, with double quantization, one uint8 code per block plus a float32 per 256
    blocks and one float32 offset (4 + 8/64 + 32/(64·256) ≈ 4.127 bits).
    """
    blocks = -(-numel // blocksize)
    if double_quant:
        return -(-numel // 2) + blocks + 4 * -(-blocks // 256) + 4
    return -(-numel // 2) + 4 * blocks


def _targets(config: ModelConfig, target_modules) -> list[tuple[str, int, int, bool]]:
    """The linear layers LoRA wraps, matched as peft does: a name matches a target if it equals it or
    ends with ``"." + target``; ``"all-linear"`` is every linear layer except the output head."""
    linears = config.linears()
    if target_modules == "all-linear":
        return linears
    if isinstance(target_modules, str) or not all(isinstance(t, str) for t in target_modules):
        raise ValueError(f"target_modules must be a list of module names or 'all-linear', got {target_modules!r}")
    chosen = [lin for lin in linears if any(lin[0] == t or lin[0].endswith("." + t) for t in target_modules)]
    if not chosen:
        names = sorted({n.split(".")[-1] for n in [*config.block_linears(), *config.other_linears()]})
        raise ValueError(f"target_modules {list(target_modules)} match no linear layer of {config.name}; "
                         f"its linear layers are {names}")
    return chosen


def default_target_modules(config: ModelConfig) -> list[str]:
    """peft's defaults for the family: the query and value projections."""
    return {"llama": ["q_proj", "v_proj"], "bert": ["query", "value"], "gpt": ["q_proj", "v_proj"]}[config.architecture]


_UNITS = {"": GiB, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": MiB, "mb": MiB, "mib": MiB,
          "g": GiB, "gb": GiB, "gib": GiB, "t": 2**40, "tb": 2**40, "tib": 2**40}


def parse_memory(value: str | float) -> int:
    """Bytes from ``"24GB"``, ``"24 GiB"``, ``"512MB"`` or ``"24"`` (GiB); a number is taken as bytes.

    GB is read as GiB, as GPU memory is sold (see the module doc).
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number, unit = float(value), "b"
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        if not match or match.group(2).lower() not in _UNITS:
            raise ValueError(f"cannot read {value!r} as an amount of memory; write it like 24GB, 8GiB or 512MB")
        number, unit = float(match.group(1)), match.group(2).lower()
    if not number > 0:
        raise ValueError(f"memory must be positive, got {value!r}")
    return int(number * _UNITS[unit])


def format_bytes(n: float) -> str:
    """``3.52 GiB`` / ``26.0 MiB`` / ``512 B``: binary units, three significant figures."""
    for unit, size in (("TiB", 2**40), ("GiB", GiB), ("MiB", MiB), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}" if n / size < 1000 else f"{n / size:.0f} {unit}"
    return f"{n:.0f} B"


# ---------------------------------------------------------------------------------------------
# The estimate
# ---------------------------------------------------------------------------------------------
LINES = ("weights", "lora_parameters", "gradients", "optimizer_state", "activations")


@dataclass
class Budget:
    """An estimate in bytes, one field per line of the breakdown, plus what it was computed for.

    ``total`` is what the step holds (the five lines); ``transient`` the largest short-lived buffer
    of the backward pass; ``peak = total + transient``. ``activation_parts`` splits the activations
    by where they come from (per-layer parts already multiplied by the number of layers).
    """

    weights: int
    lora_parameters: int
    gradients: int
    optimizer_state: int
    activations: int
    transient: int
    parameters: int
    trainable_parameters: int
    activation_parts: dict[str, int]
    settings: dict

    @property
    def total(self) -> int:
        return sum(getattr(self, line) for line in LINES)

    @property
    def peak(self) -> int:
        return self.total + self.transient

    def to_dict(self) -> dict:
        """Plain numbers (bytes) and settings, for ``json.dumps``."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out.update(total=self.total, peak=self.peak)
        return out

    def table(self, gpu_memory: int | None = None) -> str:
        """The breakdown as an aligned text table (what ``course-lib budget`` prints)."""
        s = self.settings
        head = (f"{s['model']}  {s['method']}"
                + (f" r={s['r']} on {_names(s['target_modules'])}" if s["method"] != "full" else "")
                + f"  {s['weight_dtype']}  {s['optimizer']}  batch {s['batch_size']} x {s['seq_len']} tokens"
                + (f"  GradCache chunks of {s['chunk_size']}" if s["chunk_size"] else "")
                + (f"  accumulation {s['gradient_accumulation_steps']}" if s["gradient_accumulation_steps"] > 1 else "")
                + ("  checkpointing" if s["gradient_checkpointing"] else ""))
        rows = [("weights", self.weights), ("LoRA parameters", self.lora_parameters), ("gradients", self.gradients),
                ("optimizer state", self.optimizer_state), ("activations", self.activations),
                ("total", self.total), ("+ transient in backward", self.transient), ("peak", self.peak)]
        lines = [head, f"parameters {self.parameters:,}, trainable {self.trainable_parameters:,}"]
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
             chunk_size: int | None = None, attention: str = "sdpa", device: str = "cuda") -> Budget:
    """The memory of one training step of ``config`` with ``method`` ("full", "lora" or "qlora").

    * ``r``, ``target_modules`` (peft's names: ``["q_proj", "v_proj"]``, ``"all-linear"``...): LoRA
      and QLoRA only; defaults r=8 on the query and value projections.
    * ``weight_dtype``: the dtype of every weight that is not quantized, and of the activations
      (float32, bfloat16 or float16). Full fine-tuning in bfloat16 keeps no float32 master copy.
    * ``lora_dtype``: the adapters' dtype; float32 by default, as peft and `course_lib.lora` keep them
      beside a half-precision or quantized base (each adapted layer then saves a float32 copy of its input).
    * ``quant_type`` ("nf4" or "fp4") and ``double_quant`` (default True): QLoRA only.
    * ``optimizer``: "adamw" (32-bit moments), "adamw8bit" (bitsandbytes) or "sgd" (no momentum).
    * ``batch_size``, ``seq_len``: sequences per forward pass and tokens per sequence.
      ``gradient_accumulation_steps`` multiplies the effective batch at no memory cost (the
      gradients are held in full anyway). ``chunk_size``: GradCache for contrastive encoders,
      activations for ``chunk_size`` sequences at a time plus the cached embeddings.
    * ``attention``: "sdpa" (transformers' default) or "eager" (keeps the s×s probabilities).
      ``device``: "cuda" or "cpu", which decides the attention kernel and how dropout stores its mask.
    """
    c = get_config(config)
    s = _check_settings(c, method, r, target_modules, weight_dtype, lora_dtype, quant_type, double_quant,
                        optimizer, gradient_checkpointing, batch_size, seq_len, gradient_accumulation_steps,
                        chunk_size, attention, device)
    a, ell = DTYPE_BYTES[weight_dtype], DTYPE_BYTES[lora_dtype]
    parameters = c.parameters()
    targets = _targets(c, s["target_modules"]) if method != "full" else []
    lora_params = sum(s["r"] * (i + o) for _, i, o, _ in targets)
    if method == "qlora":
        quantized = sum(i * o for _, i, o, _ in c.linears())
        four_bit = sum(four_bit_bytes(i * o, s["double_quant"]) for _, i, o, _ in c.linears())
        weights = four_bit + (parameters - quantized) * a
    else:
        weights = parameters * a
    trainable = parameters if method == "full" else lora_params
    grad_bytes = a if method == "full" else ell
    parts = activation_parts(c, s, targets)
    return Budget(weights=weights, lora_parameters=lora_params * ell, gradients=trainable * grad_bytes,
                  optimizer_state=math.ceil(trainable * OPTIMIZERS[optimizer]), activations=sum(parts.values()),
                  transient=_transient(c, s), parameters=parameters + lora_params, trainable_parameters=trainable,
                  activation_parts=parts, settings=s)


def _check_settings(c, method, r, target_modules, weight_dtype, lora_dtype, quant_type, double_quant, optimizer,
                    gradient_checkpointing, batch_size, seq_len, gradient_accumulation_steps, chunk_size,
                    attention, device) -> dict:
    """Every setting checked, defaults filled in; the errors say which combination to use instead."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    for name, value, choices in (("weight_dtype", weight_dtype, DTYPE_BYTES), ("lora_dtype", lora_dtype, DTYPE_BYTES),
                                 ("optimizer", optimizer, OPTIMIZERS), ("attention", attention, ATTENTION),
                                 ("device", device, ("cuda", "cpu"))):
        if value not in choices:
            raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len),
                        ("gradient_accumulation_steps", gradient_accumulation_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if c.max_position_embeddings and seq_len > c.max_position_embeddings:
        raise ValueError(f"{c.name} has {c.max_position_embeddings} learned positions; seq_len must be at most that, "
                         f"got {seq_len}")
    if chunk_size is not None:
        if c.architecture != "bert":
            raise ValueError("chunk_size (GradCache) is for contrastive encoders; a causal LM's per-sequence loss "
                             "splits with gradient_accumulation_steps and a smaller batch_size instead")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or not 1 <= chunk_size <= batch_size:
            raise ValueError(f"chunk_size must be an integer from 1 to batch_size ({batch_size}), got {chunk_size!r}")
    if method == "full":
        given = [n for n, v in (("r", r), ("target_modules", target_modules), ("quant_type", quant_type),
                                ("double_quant", double_quant)) if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)} do not apply to full fine-tuning, which trains every weight in "
                             f"{weight_dtype}; drop them or choose method='lora' / 'qlora'")
    else:
        if r is None:
            r = 8
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"r must be a positive integer (LoRA's rank, e.g. 8 or 16), got {r!r}")
        target_modules = default_target_modules(c) if target_modules is None else target_modules
        target_modules = target_modules if isinstance(target_modules, str) else list(target_modules)
    if method != "qlora" and (quant_type is not None or double_quant is not None):
        raise ValueError("quant_type and double_quant describe a 4-bit base: use method='qlora', or drop them")
    if method == "qlora":
        quant_type = quant_type or "nf4"
        if quant_type not in ("nf4", "fp4"):
            raise ValueError(f"unknown quant_type {quant_type!r}; choose nf4 or fp4")
        double_quant = True if double_quant is None else bool(double_quant)
    return {"model": c.name, "method": method, "r": r, "target_modules": target_modules, "weight_dtype": weight_dtype,
            "lora_dtype": lora_dtype, "quant_type": quant_type, "double_quant": double_quant, "optimizer": optimizer,
            "gradient_checkpointing": bool(gradient_checkpointing), "batch_size": batch_size, "seq_len": seq_len,
            "gradient_accumulation_steps": gradient_accumulation_steps, "chunk_size": chunk_size,
            "attention": attention, "device": device}


# ---------------------------------------------------------------------------------------------
# Activations: what autograd saves for backward
# ---------------------------------------------------------------------------------------------
def activation_parts(config: ModelConfig, settings: dict, targets: list) -> dict[str, int]:
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
    a = DTYPE_BYTES[s["weight_dtype"]]
    tokens = (s["chunk_size"] or s["batch_size"]) * s["seq_len"]
    layer, shared_input = _layer_bytes(c, s, targets)
    L, h = c.num_hidden_layers, c.hidden_size
    full = s["method"] == "full"
    input_grads = full or s["gradient_checkpointing"]  # transformers makes the embeddings' output require grad
    parts = {}
    ids = 16 if c.architecture == "bert" else 8  # token ids (and BERT's token types) for the embeddings' backward
    before = (ids if full else 0) * tokens
    if c.architecture == "bert" and input_grads:
        before += tokens * (a * h + 8 + _mask_bytes(c, s) * h)  # embedding LayerNorm and dropout
    parts["embeddings"] = before
    after = _head_bytes(c, s, targets) * tokens
    if s["gradient_checkpointing"]:
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
        parts["rotary cos and sin"] = 2 * s["seq_len"] * c.head_size * a
    if s["chunk_size"]:
        parts["GradCache: cached embeddings and their gradients"] = 2 * s["batch_size"] * h * 4
    return {k: int(v) for k, v in parts.items()}


def _mask_bytes(c: ModelConfig, s: dict) -> int:
    return 0 if c.dropout == 0 else (1 if s["device"] == "cuda" else DTYPE_BYTES[s["weight_dtype"]])


def _layer_bytes(c: ModelConfig, s: dict, targets: list) -> tuple[dict[str, float], float]:
    """Bytes per token saved by one block, by part, and how much of it is the block's input storage."""
    a, ell, m = DTYPE_BYTES[s["weight_dtype"]], DTYPE_BYTES[s["lora_dtype"]], _mask_bytes(c, s)
    h, i, nh, seq = c.hidden_size, c.intermediate_size, c.num_attention_heads, s["seq_len"]
    hq, hkv = nh * c.head_size, c.num_key_value_heads * c.head_size
    full = s["method"] == "full"
    wrapped = {n.split(".", 2)[2] for n, *_ in targets if n.startswith("layers.0.")}
    linears = c.block_linears()

    def inputs(group: list[str], size: int, saved_anyway: bool = False) -> float:
        """A linear input shared by ``group``: kept once if a weight trains on it, or per LoRA copy."""
        lora = [n for n in group if n in wrapped]
        if full or (lora and ell == a):
            return 0 if saved_anyway else a * size
        return len(lora) * ell * size

    names = list(linears)
    parts = {"LoRA A outputs": len(wrapped) * s["r"] * ell if wrapped else 0}
    fused = s["attention"] == "sdpa" and (s["device"] == "cuda" or c.dropout == 0)
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


def _head_bytes(c: ModelConfig, s: dict, targets: list) -> float:
    """Bytes per token kept after the last block: final norm, output layer input, the loss's log-probabilities."""
    a = DTYPE_BYTES[s["weight_dtype"]]
    h, full = c.hidden_size, s["method"] == "full"
    if c.architecture == "bert":  # mean pooling keeps the mask; a trained pooler keeps the last hidden state
        pooler = full or any(n == "pooler.dense" for n, *_ in targets)
        return a + (a * h if pooler else 0)
    norm = 4 * h + 4 + (a * h if full else 0) if c.architecture == "llama" else a * h + 8
    return norm + (a * h if full else 0) + 4 * c.vocab_size + 8


def _transient(c: ModelConfig, s: dict) -> int:
    """The largest buffers that live only inside backward: the loss's float32 gradients with respect to
    the log-probabilities and the logits (2 · 4·V per token) for a causal LM; with QLoRA, also the
    largest weight dequantized for one matmul."""
    tokens = (s["chunk_size"] or s["batch_size"]) * s["seq_len"]
    loss = 8 * tokens * c.vocab_size if c.architecture != "bert" else 0
    dequantized = max(i * o for _, i, o, _ in c.linears()) * DTYPE_BYTES[s["weight_dtype"]]
    return loss + (dequantized if s["method"] == "qlora" else 0)


# ---------------------------------------------------------------------------------------------
# The planner: the seeds' decision tree, checked by the estimate
# ---------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """What `plan` chose: ``settings`` are `estimate`'s keyword arguments, ``budget`` their estimate.

    When nothing fits, ``fits`` is False, ``settings`` and ``budget`` describe the smallest
    configuration tried, and ``reason`` says what is too big. ``tried`` has one line per method and
    checkpointing choice that did not fit, ``seed_recipe`` what seed 000's tree says for this GPU.
    """

    fits: bool
    model: str
    gpu_memory: int
    usable: int
    seed_recipe: str
    settings: dict
    budget: Budget
    tried: list[str] = field(default_factory=list)
    reason: str = ""
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """Human-readable: the verdict, the settings, the estimate's table, what was tried."""
        s = self.budget.settings  # every setting, defaults filled in
        lines = [f"{self.model} on {format_bytes(self.gpu_memory)} ({format_bytes(self.usable)} usable after headroom)",
                 f"seed 000's tree for this GPU: {self.seed_recipe}"]
        lines += [f"  tried: {t}" for t in self.tried]
        if self.fits:
            recipe = s["method"] + ("" if s["method"] == "full" else f" r={s['r']} on {_names(s['target_modules'])}")
            if s["method"] == "qlora":
                recipe += f" ({s['quant_type']}{', double quantization' if s['double_quant'] else ''})"
            split = (f"GradCache chunks of {s['chunk_size']}" if s["chunk_size"]
                     else f"gradient accumulation {s['gradient_accumulation_steps']}"
                     if s["gradient_accumulation_steps"] > 1 else "the whole batch at once")
            lines.append(f"plan: {recipe}, batch {s['batch_size']} x {s['seq_len']} tokens, {split}, "
                         f"checkpointing {'on' if s['gradient_checkpointing'] else 'off'}, "
                         f"estimated peak {format_bytes(self.budget.peak)}")
        else:
            lines.append(f"nothing fits: {self.reason}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines + ["", self.budget.table()])

    def to_dict(self) -> dict:
        return {"fits": self.fits, "model": self.model, "gpu_memory": self.gpu_memory, "usable": self.usable,
                "seed_recipe": self.seed_recipe, "settings": self.settings, "budget": self.budget.to_dict(),
                "tried": self.tried, "reason": self.reason, "notes": self.notes}


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
    configuration B, and 4 for a causal LM, seed 001's 70B recipe); it is kept whole. The LoRA
    targets default to the attention projections (q, k, v, o; query, key, value for BERT).
    """
    c = get_config(model)
    gpu = parse_memory(gpu_memory)
    if not 0 <= headroom < 1:
        raise ValueError(f"headroom is a fraction of the GPU memory kept free, from 0 to 1; got {headroom!r}")
    encoder = c.architecture == "bert"
    batch = batch_size if batch_size is not None else (64 if encoder else 4)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch!r}")
    usable = int(gpu * (1 - headroom))
    words, methods, r_tree, chunk_tree = seed_recipe(gpu)
    targets = target_modules or {"llama": ["q_proj", "k_proj", "v_proj", "o_proj"], "bert": ["query", "key", "value"],
                                 "gpt": ["q_proj", "k_proj", "v_proj", "out_proj"]}[c.architecture]
    pieces = [d for d in range(batch, 0, -1) if batch % d == 0]
    if chunk_tree is not None:
        pieces = [d for d in pieces if d <= chunk_tree] or [1]
    common = {"weight_dtype": weight_dtype, "optimizer": optimizer, "seq_len": seq_len}
    mrl = ("MRL adds a loss over a few truncations of the same embedding: no memory worth modelling "
           "(the seed's '+5-10%' is not reproduced here)")
    notes = [mrl] if encoder else []

    def settings(method, r, checkpointing, piece):
        s = dict(common, method=method, gradient_checkpointing=checkpointing)
        if method != "full":
            s.update(r=r, target_modules=targets)
        if encoder:
            s.update(batch_size=batch, chunk_size=piece if piece < batch else None)
        else:
            s.update(batch_size=piece, gradient_accumulation_steps=batch // piece)
        return s

    tried, smallest = [], None
    ladder = [(m, r_tree, ck) for m in [*methods, "qlora"] for ck in (False, True)]
    ladder += [("qlora", r, True) for r in (8, 4) if r < r_tree]
    for method, r, checkpointing in ladder:
        for piece in pieces:
            s = settings(method, r, checkpointing, piece)
            b = estimate(c, **{k: v for k, v in s.items() if k != "method"}, method=method)
            if b.peak <= usable:
                if s.get("chunk_size"):
                    whole = estimate(c, **{k: v for k, v in s.items() if k not in ("method", "chunk_size")},
                                     method=method)
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
        reason = (f"with QLoRA r={s['r']}, checkpointing and one sequence of {seq_len} tokens per step the peak is "
                  f"{format_bytes(b.peak)} (activations {format_bytes(b.activations)}, backward buffers "
                  f"{format_bytes(b.transient)}) > {format_bytes(usable)}; shorten the sequences")
    return Plan(False, c.name, gpu, usable, words, s, b, tried, reason, notes)
