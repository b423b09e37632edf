"""The settings of one training step, checked once, when they are built.

`Settings` holds every choice the estimate depends on (method, LoRA rank and targets, dtypes,
quantization, optimizer, checkpointing, batch shape, attention kernel, device) as a frozen
dataclass: a typo fails where the settings are made, with a message that names the setting and
the value to use instead, and nothing downstream has to check again. `Settings.build` fills in
the defaults that depend on the model (LoRA's targets, QLoRA's NF4 with double quantization) and
checks what only the model can say (its context length, its linear layers' names).

Several GPUs (chapter 08): ``gpus`` data-parallel GPUs, each with its own micro-batch of
``batch_size`` sequences, and a ``sharding`` strategy from `SHARDING`, ZeRO's stages 0-3:
``"none"`` (DDP: every GPU holds everything), ``"optimizer"`` (ZeRO-1: the optimizer state is
split over the GPUs), ``"optimizer+gradients"`` (ZeRO-2, FSDP's SHARD_GRAD_OP), ``"full"``
(ZeRO-3, FSDP's FULL_SHARD: the parameters too). With one GPU there is nothing to split: every
strategy is then "none" (FSDP itself switches to NO_SHARD at world size 1), so ``sharding`` other
than "none" with ``gpus=1`` is allowed and gives the same estimate. ``offload`` moves the optimizer
state (and with "full", the parameter shards) to CPU memory, as DeepSpeed's ``offload_optimizer`` /
``offload_param`` and FSDP's ``CPUOffload`` do; it needs a sharding strategy (DeepSpeed offloads
only under ZeRO), and is the one switch that still changes the estimate on one GPU (ZeRO-Offload).
``master_weights`` is classic mixed precision (apex's ``master_weights``, DeepSpeed's bf16/fp16
modes): 16-bit trainable weights and gradients, plus a float32 copy of the weights kept with the
optimizer state, 2 + 2 + 4 + 8 = 16 bytes per parameter with AdamW (the ZeRO paper's K = 12).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..checks import boolean, one_of, optional_positive_int, positive_int
from .configs import ModelConfig, get_config

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
METHODS = ("full", "lora", "qlora")
OPTIMIZERS = {"adamw": 8.0, "adamw16bit": 4.0, "adamw8bit": 2 + 2 * 4 / 2048, "sgd": 0.0}
"""Optimizer state in bytes per trainable parameter: AdamW keeps two float32 moments; "adamw16bit"
two 16-bit moments, which is what ``torch.optim.AdamW`` keeps for bfloat16 or float16 parameters (its
moments take the parameter's dtype), so full fine-tuning in bfloat16 with it holds 2 + 2 + 4 bytes per
parameter; bitsandbytes' 8-bit AdamW two uint8 moments plus one float32 absmax per block of 2048
values for each (tensors under 4096 values stay 32-bit there, which is not modelled); SGD without
momentum keeps nothing. ``master_weights`` adds the float32 copy on top of any of them."""
ATTENTION = ("sdpa", "eager")
SHARDING = ("none", "optimizer", "optimizer+gradients", "full")
"""ZeRO's stages 0, 1, 2, 3, cheapest first: DDP, ZeRO-1, ZeRO-2 (FSDP SHARD_GRAD_OP), ZeRO-3 (FSDP FULL_SHARD)."""
QUANT_STORAGE = ("uint8", "bfloat16", "float16", "float32")
"""The dtype bitsandbytes packs the 4-bit codes into (``bnb_4bit_quant_storage``): the bytes are the same."""
DEVICES = ("cuda", "cpu")
QUANT_TYPES = ("nf4", "fp4")


@dataclass(frozen=True)
class Settings:
    """One training step's settings, every default filled in (see `course_lib.budget.estimate`).

    Build them with `Settings.build(model, method, ...)`, which fills the defaults the model
    decides; constructing one directly checks the same things except those. ``model`` is the
    config's name. ``r`` and ``target_modules`` are None for full fine-tuning, ``quant_type`` and
    ``double_quant`` None unless the method is QLoRA, ``chunk_size`` None without GradCache.
    ``target_modules`` is a tuple of module names or ``"all-linear"``.
    """

    model: str
    method: str
    r: int | None
    target_modules: tuple[str, ...] | str | None
    weight_dtype: str = "bfloat16"
    lora_dtype: str = "float32"
    quant_type: str | None = None
    double_quant: bool | None = None
    optimizer: str = "adamw"
    gradient_checkpointing: bool = False
    batch_size: int = 1
    seq_len: int = 512
    gradient_accumulation_steps: int = 1
    chunk_size: int | None = None
    attention: str = "sdpa"
    device: str = "cuda"
    gpus: int = 1
    sharding: str = "none"
    offload: bool = False
    master_weights: bool = False
    quant_storage: str | None = None

    def __post_init__(self) -> None:
        """The checks that need no model; the errors say which combination to use instead."""
        one_of("method", self.method, METHODS)
        for name, choices in (("weight_dtype", DTYPE_BYTES), ("lora_dtype", DTYPE_BYTES),
                              ("optimizer", OPTIMIZERS), ("attention", ATTENTION), ("device", DEVICES)):
            one_of(name, getattr(self, name), choices)
        for name in ("batch_size", "seq_len", "gradient_accumulation_steps"):
            positive_int(name, getattr(self, name))
        if optional_positive_int("chunk_size", self.chunk_size) and self.chunk_size > self.batch_size:
            raise ValueError(f"chunk_size must be an integer from 1 to batch_size ({self.batch_size}), "
                             f"got {self.chunk_size!r}")
        if self.method == "full":
            given = [n for n in ("r", "target_modules", "quant_type", "double_quant") if getattr(self, n) is not None]
            if given:
                raise ValueError(f"{', '.join(given)} do not apply to full fine-tuning, which trains every weight in "
                                 f"{self.weight_dtype}; drop them or choose method='lora' / 'qlora'")
        else:
            positive_int("r", self.r, "LoRA's rank, e.g. 8 or 16")
            _check_target_names(self.target_modules)
        if self.method != "qlora" and (self.quant_type is not None or self.double_quant is not None):
            raise ValueError("quant_type and double_quant describe a 4-bit base: use method='qlora', or drop them")
        if self.method == "qlora":
            one_of("quant_type", self.quant_type, QUANT_TYPES)
            if not isinstance(self.double_quant, bool):
                raise ValueError(f"double_quant must be True or False for QLoRA, got {self.double_quant!r}")
        self._check_gpus()

    def _check_gpus(self) -> None:
        """The settings for several GPUs, mixed precision and the 4-bit storage dtype."""
        positive_int("gpus", self.gpus, "the number of data-parallel GPUs, 1 or more")
        one_of("sharding", self.sharding, SHARDING, "ZeRO stage 0, 1, 2 or 3")
        for name in ("offload", "master_weights"):
            boolean(name, getattr(self, name))
        if self.offload and self.sharding == "none":
            raise ValueError("offload moves the optimizer state (and with sharding='full' the parameters) to the CPU, "
                             "which DeepSpeed and FSDP do only for a sharded model: choose sharding='optimizer' or "
                             "higher, or drop offload")
        trained = self.weight_dtype if self.method == "full" else self.lora_dtype
        if self.master_weights and trained == "float32":
            which = "weight_dtype" if self.method == "full" else "lora_dtype"
            raise ValueError(f"master_weights keeps a float32 copy of 16-bit trained weights, but {which} is already "
                             f"float32; set {which}='bfloat16' (mixed precision) or drop master_weights")
        if self.method != "qlora":
            if self.quant_storage is not None:
                raise ValueError("quant_storage is the dtype of QLoRA's packed 4-bit weights: use method='qlora', "
                                 "or drop it")
            return
        one_of("quant_storage", self.quant_storage, QUANT_STORAGE, "bitsandbytes' bnb_4bit_quant_storage")
        if self.gpus > 1 and self.sharding == "full" and self.quant_storage != self.weight_dtype:
            raise ValueError(f"FSDP shards the 4-bit weights only when they are stored in the dtype of the other "
                             f"weights ({self.weight_dtype}), not {self.quant_storage}: set quant_storage="
                             f"'{self.weight_dtype}' (bnb_4bit_quant_storage=torch.{self.weight_dtype}), or shard "
                             "less (sharding='optimizer+gradients')")

    @property
    def shards(self) -> str:
        """The strategy in effect: ``sharding``, or "none" on one GPU, where there is nothing to split."""
        return self.sharding if self.gpus > 1 else "none"

    @classmethod
    def build(cls, model, method: str = "lora", *, r: int | None = None, target_modules=None,
              weight_dtype: str = "bfloat16", lora_dtype: str = "float32", quant_type: str | None = None,
              double_quant: bool | None = None, optimizer: str = "adamw", gradient_checkpointing: bool = False,
              batch_size: int = 1, seq_len: int = 512, gradient_accumulation_steps: int = 1,
              chunk_size: int | None = None, attention: str = "sdpa", device: str = "cuda", gpus: int = 1,
              sharding: str = "none", offload: bool = False, master_weights: bool = False,
              quant_storage: str | None = None) -> Settings:
        """The settings for ``model`` (a name, a `ModelConfig` or a transformers config), checked.

        Defaults: LoRA and QLoRA r=8 on peft's targets for the family (`default_target_modules`);
        QLoRA in NF4 with double quantization, its 4-bit codes stored as bitsandbytes does by default
        (uint8), or in ``weight_dtype`` under full sharding, the only storage FSDP can shard. The model decides the rest: ``seq_len`` at most its
        context (``max_position_embeddings``), GradCache (``chunk_size``) only for an encoder, each of
        LoRA's targets among its linear layers.
        """
        c = get_config(model)
        one_of("method", method, METHODS)
        if method != "full":
            r = 8 if r is None else r
            target_modules = default_target_modules(c) if target_modules is None else target_modules
            _check_target_names(target_modules)
            target_modules = target_modules if isinstance(target_modules, str) else tuple(target_modules)
        if method == "qlora":
            quant_type = "nf4" if quant_type is None else quant_type
            double_quant = True if double_quant is None else bool(double_quant)
            if quant_storage is None:
                quant_storage = weight_dtype if sharding == "full" else "uint8"
        if chunk_size is not None and c.architecture != "bert":
            raise ValueError("chunk_size (GradCache) is for contrastive encoders; a causal LM's per-sequence loss "
                             "splits with gradient_accumulation_steps and a smaller batch_size instead")
        settings = cls(c.name, method, r, target_modules, weight_dtype, lora_dtype, quant_type, double_quant,
                       optimizer, bool(gradient_checkpointing), batch_size, seq_len, gradient_accumulation_steps,
                       chunk_size, attention, device, gpus, sharding, offload, master_weights, quant_storage)
        if seq_len > c.max_position_embeddings:
            context = (f"{c.max_position_embeddings} learned positions" if c.architecture != "llama"
                       else f"a context of {c.max_position_embeddings} tokens (max_position_embeddings)")
            raise ValueError(f"{c.name} has {context}; seq_len must be at most {c.max_position_embeddings}, "
                             f"got {seq_len}")
        if method != "full":
            lora_targets(c, target_modules)  # raises if they match no linear layer of this model
        return settings

    @property
    def tokens(self) -> int:
        """Tokens in one forward pass: the micro-batch (or GradCache chunk) times ``seq_len``."""
        return (self.chunk_size or self.batch_size) * self.seq_len

    def to_dict(self) -> dict:
        """A plain dict (``target_modules`` as a list), for ``json.dumps``."""
        out = asdict(self)
        if isinstance(self.target_modules, tuple):
            out["target_modules"] = list(self.target_modules)
        return out


def _check_target_names(target_modules) -> None:
    if (isinstance(target_modules, str) and target_modules != "all-linear") or not isinstance(
            target_modules, (str, list, tuple)) or not all(isinstance(t, str) and t for t in target_modules):
        raise ValueError(f"target_modules must be a list of module names or 'all-linear', got {target_modules!r}")
    if not target_modules:
        raise ValueError("target_modules is empty: name the layers LoRA adapts, e.g. ['q_proj', 'v_proj'], "
                         "or give 'all-linear'")


def default_target_modules(config: ModelConfig) -> list[str]:
    """peft's defaults for the family: the query and value projections."""
    return {"llama": ["q_proj", "v_proj"], "bert": ["query", "value"], "gpt": ["q_proj", "v_proj"]}[config.architecture]


def lora_targets(config: ModelConfig, target_modules) -> list[tuple[str, int, int, bool]]:
    """The linear layers LoRA wraps, matched as peft does: a name matches a target if it equals it or
    ends with ``"." + target``; ``"all-linear"`` is every linear layer except the output head.

    Every target must match some layer: a misspelt name among good ones would otherwise leave its
    layers out of the estimate without a word."""
    linears = config.linears()
    if target_modules == "all-linear":
        return linears

    def matches(name: str, target: str) -> bool:
        return name == target or name.endswith("." + target)

    unmatched = [t for t in target_modules if not any(matches(lin[0], t) for lin in linears)]
    if unmatched:
        names = sorted({n.split(".")[-1] for n in [*config.block_linears(), *config.other_linears()]})
        raise ValueError(f"target_modules {unmatched} match no linear layer of {config.name}; "
                         f"its linear layers are {names}")
    return [lin for lin in linears if any(matches(lin[0], t) for t in target_modules)]
