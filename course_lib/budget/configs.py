"""The transformer configs the memory estimator works from, written down from published numbers.

`ModelConfig` holds what `course_lib.budget.estimate` needs of a model, in transformers' config
names; `MODELS` are the models the seeds and the papers discuss (no downloads: each entry cites its
source, and the tests hold every parameter count within 1% of the published one); `get_config`
takes a name, a `ModelConfig` or a transformers config.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..checks import positive_int

ARCHITECTURES = ("llama", "bert", "gpt")


@dataclass(frozen=True)
class ModelConfig:
    """What the estimator needs of a transformer, in transformers' config names.

    ``architecture`` is the family that fixes the block's layout: ``"llama"`` (pre-norm RMSNorm,
    rotary positions, grouped-query attention, gated SiLU MLP: LLaMA, Qwen2, SmolLM2), ``"bert"``
    (post-norm LayerNorm, learned positions and token types, GELU MLP, a pooler) or ``"gpt"``
    (pre-norm LayerNorm, learned positions, GELU MLP, tied output layer: GPT-2/GPT-3).
    ``qkv_bias`` puts biases on q, k and v only (Qwen2); BERT and GPT have biases everywhere.
    ``dropout`` is the hidden and attention-probability dropout used in training (BERT: 0.1).
    ``max_position_embeddings`` is the context length: BERT's and GPT's learned positions, the
    longest sequence a rotary model was configured for; `Settings.build` refuses a longer ``seq_len``.
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
            positive_int(f"{self.name}: {name}", getattr(self, name))
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"{self.name}: num_attention_heads ({self.num_attention_heads}) must be a multiple "
                             f"of num_key_value_heads ({self.num_key_value_heads})")
        if isinstance(self.max_position_embeddings, bool) or not isinstance(self.max_position_embeddings, int) \
                or self.max_position_embeddings < 1:
            raise ValueError(f"{self.name}: give max_position_embeddings, the context length in tokens (its config's "
                             f"max_position_embeddings), got {self.max_position_embeddings!r}")

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


def _llama(name, h, layers, heads, kv, i, vocab, tied, context, published, source, **extra) -> ModelConfig:
    return ModelConfig(name, "llama", h, layers, heads, kv, i, vocab, tied, max_position_embeddings=context,
                       published_parameters=published, source=source, **extra)


# _llama(name, hidden, layers, heads, KV heads, intermediate, vocab, tied, context, published count, source).
# The context is each published config's max_position_embeddings (LLaMA 1 was trained at 2048 tokens; the
# SmolLM2-135M-Instruct GGUF's llama.context_length agrees); BERT's and GPT-3's are their learned positions.
MODELS: dict[str, ModelConfig] = {c.name: c for c in (
    _llama("llama-7b", 4096, 32, 32, 32, 11008, 32000, False, 2048, 6_740_000_000, "Touvron et al. 2023, Table 2"),
    _llama("llama-13b", 5120, 40, 40, 40, 13824, 32000, False, 2048, 13_020_000_000, "Touvron et al. 2023, Table 2"),
    _llama("llama-33b", 6656, 60, 52, 52, 17920, 32000, False, 2048, 32_530_000_000, "Touvron et al. 2023, Table 2"),
    _llama("llama-65b", 8192, 80, 64, 64, 22016, 32000, False, 2048, 65_290_000_000, "Touvron et al. 2023, Table 2"),
    _llama("llama-2-70b", 8192, 80, 64, 8, 28672, 32000, False, 4096, 68_980_000_000, "meta-llama/Llama-2-70b-hf config"),
    _llama("llama-3-8b", 4096, 32, 32, 8, 14336, 128256, False, 8192, 8_030_000_000, "meta-llama/Meta-Llama-3-8B config"),
    _llama("llama-3-70b", 8192, 80, 64, 8, 28672, 128256, False, 8192, 70_550_000_000, "meta-llama/Meta-Llama-3-70B config"),
    _llama("qwen2.5-7b", 3584, 28, 28, 4, 18944, 152064, False, 131072, 7_620_000_000, "Qwen/Qwen2.5-7B config",
           qkv_bias=True),
    _llama("smollm2-135m", 576, 30, 9, 3, 1536, 49152, True, 8192, 134_515_008, "HuggingFaceTB/SmolLM2-135M config"),
    ModelConfig("minilm", "bert", 384, 6, 12, 12, 1536, 30522, True, max_position_embeddings=512,
                type_vocab_size=2, dropout=0.1, published_parameters=22_700_000,
                source="sentence-transformers/all-MiniLM-L6-v2 config (a BERT encoder)"),
    _llama("smollm2-1.7b", 2048, 24, 32, 32, 8192, 49152, True, 8192, 1_700_000_000,
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
                           qkv_bias=kind == "qwen2", max_position_embeddings=c.get("max_position_embeddings", 0),
                           dropout=c.get("attention_dropout", 0.0))
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
