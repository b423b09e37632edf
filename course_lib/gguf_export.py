"""Edge deployment, part 2: write a merged Llama-architecture model (SmolLM2) as a GGUF file.

GGUF is llama.cpp's single-file format: a header of key-value metadata (architecture, sizes,
tokenizer) followed by the tensors, each in its own storage type. We write it with the ``gguf``
package (llama.cpp's own Python writer), as llama.cpp's ``convert_hf_to_gguf.py`` does for a
Llama model:

* tensor names follow GGUF's convention (``model.layers.3.self_attn.q_proj.weight`` becomes
  ``blk.3.attn_q.weight``; ``gguf.get_tensor_name_map`` holds the table);
* the query and key projections are *permuted*: transformers computes rotary embeddings on the
  two halves of each head, llama.cpp on interleaved pairs, so the rows of ``q_proj`` / ``k_proj``
  are reordered (`permute_rows`) and readers undo it;
* 1-D tensors (the RMSNorm weights) stay float32, 2-D ones take the chosen type. The quantized
  types store blocks of 32 numbers with one float16 scale (``q8_0``: 8-bit, 8.5 bits per number;
  ``q4_0``: 4.5), so a row whose length is not a multiple of 32 falls back to float16, and with a
  4- or 5-bit type the embedding (also the output layer, when tied) is kept at ``q8_0``, as in
  the course's shipped Q4_1 file;
* a tied ``lm_head`` is not written: readers tie it to ``token_embd`` when ``output.weight`` is
  absent.

transformers reads such a file back with ``from_pretrained(folder, gguf_file=name)``.
`read_gguf_tensors` and `gguf_state_dict` read it without transformers, for checking.

Running it with llama.cpp: ``llama-cpp-python`` publishes no binary wheel on PyPI (only a
source archive that compiles llama.cpp, minutes of C++ build), so this package does not depend
on it. On their own machine a learner installs a prebuilt CPU wheel with
``pip install llama-cpp-python --extra-index-url https://abetlen.github.io/llama-cpp-python/whl/cpu``
and runs ``llama_cpp.Llama(model_path="smollm2.q8_0.gguf").create_completion(prompt, max_tokens=32)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from .atomic_files import atomic_output
from .export import check_plain

# the types gguf-py can quantize to by itself (the K- and I-quants need llama.cpp's quantizer)
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
LOW_BIT = ("q5_1", "q5_0", "q4_1", "q4_0")  # with these the embedding stays q8_0


def _qtype(name: str):
    import gguf

    return gguf.GGMLQuantizationType[name.upper()]


def permute_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder a q/k projection's rows from transformers' rotary layout (two halves per head) to
    llama.cpp's (interleaved pairs), as ``convert_hf_to_gguf.py`` does."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def unpermute_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo `permute_rows`."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def gguf_names(num_layers: int) -> dict[str, str]:
    """transformers' Llama parameter names → GGUF tensor names, for a model of ``num_layers``."""
    import gguf

    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, num_layers)
    hf = ["model.embed_tokens", "model.norm", "lm_head"] + [
        f"model.layers.{i}.{part}" for i in range(num_layers) for part in (
            "input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
            "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    return {f"{name}.weight": f"{table.get_name(name)}.weight" for name in hf}


def _check_llama(model: nn.Module, dtype: str) -> None:
    if dtype not in GGUF_TYPES:
        raise ValueError(f"unsupported GGUF type {dtype!r}; gguf-py can write {list(GGUF_TYPES)} (the K-quants such "
                         "as q4_k_m need llama.cpp's llama-quantize, run on the f16 file)")
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) != "llama":
        raise ValueError(f"export_gguf writes Llama-architecture causal LMs (SmolLM2), got model_type "
                         f"{getattr(config, 'model_type', None)!r}; use llama.cpp's convert_hf_to_gguf.py for others")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ValueError("this exporter writes Llama models without bias terms; the model has attention_bias or "
                         "mlp_bias set: use llama.cpp's convert_hf_to_gguf.py")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope scaling {rope.get('rope_type')!r} is not written by this exporter; "
                         "use llama.cpp's convert_hf_to_gguf.py")


def _storage_type(gguf_name: str, tensor: torch.Tensor, dtype: str) -> str:
    import gguf

    if tensor.dim() == 1:
        return "f32"
    if dtype in LOW_BIT and gguf_name == "token_embd.weight":
        dtype = "q8_0"
    block = gguf.GGML_QUANT_SIZES[_qtype(dtype)][0]
    return dtype if tensor.shape[-1] % block == 0 else "f16"


def export_gguf(model: nn.Module, path, tokenizer=None, dtype: str = "f16", overwrite: bool = False,
                pre_tokenizer: str = "smollm") -> Path:
    """Write a merged Llama model (and its tokenizer) as one GGUF file; returns the path.

    ``dtype`` is one of `GGUF_TYPES` (``"f32"``, ``"f16"``, ``"bf16"``, ``"q8_0"``, ``"q5_1"``,
    ``"q5_0"``, ``"q4_1"``, ``"q4_0"``) for the 2-D weights; see the module docstring for which
    tensors keep another type. With ``tokenizer`` (a byte-level BPE tokenizer like SmolLM2's) the
    vocabulary, merges, special tokens and chat template are written too, so llama.cpp can run
    the file alone; ``pre_tokenizer`` is llama.cpp's name for the tokenizer's splitting rule
    (``"smollm"`` for SmolLM2). Without a tokenizer the file holds the weights only, which is
    enough for transformers to load the model.
    """
    import gguf

    _check_llama(model, dtype)
    check_plain(model)
    config = model.config
    layers, heads, kv_heads = config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    names = gguf_names(layers)
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    unknown = sorted(set(state) - set(names))
    if unknown:
        raise ValueError(f"tensors with no GGUF name: {unknown[:5]}; is this a plain LlamaForCausalLM?")
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    path = Path(path)
    with atomic_output(path, overwrite) as tmp:
        writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(str(getattr(config, "_name_or_path", "") or "model").rstrip("/").split("/")[-1])
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(heads)
        writer.add_head_count_kv(kv_heads)
        writer.add_rope_dimension_count(head_dim)
        if head_dim != config.hidden_size // heads:
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)
        writer.add_rope_freq_base(float(theta))
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_vocab_size(config.vocab_size)
        file_type = "ALL_F32" if dtype == "f32" else f"MOSTLY_{dtype.upper()}"
        writer.add_file_type(gguf.LlamaFileType[file_type])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if tokenizer is not None:
            _add_tokenizer(writer, tokenizer, config.vocab_size, pre_tokenizer)
        for hf_name, tensor in state.items():
            name = names[hf_name]
            tensor = tensor.detach().float().cpu()
            if ".attn_q." in name:
                tensor = permute_rows(tensor, heads)
            elif ".attn_k." in name:
                tensor = permute_rows(tensor, kv_heads)
            kind = _storage_type(name, tensor, dtype)
            data = gguf.quants.quantize(tensor.numpy(), _qtype(kind))
            writer.add_tensor(name, data, raw_dtype=_qtype(kind))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


def _add_tokenizer(writer, tokenizer, vocab_size: int, pre_tokenizer: str) -> None:
    """A byte-level BPE vocabulary in llama.cpp's ``gpt2`` tokenizer format."""
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str()) if hasattr(tokenizer, "backend_tokenizer") else {}
    if spec.get("model", {}).get("type") != "BPE":
        raise ValueError("only byte-level BPE tokenizers (SmolLM2's, GPT-2's) are written; pass tokenizer=None "
                         "to write the weights alone, or use llama.cpp's convert_hf_to_gguf.py")
    if len(tokenizer) > vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model only {vocab_size} embeddings: "
                         "they do not belong together")
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    types = [gguf.TokenType.NORMAL] * len(tokens)
    for token_id, added in tokenizer.added_tokens_decoder.items():
        types[token_id] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    for i in range(len(tokens), vocab_size):  # embeddings without a token, as llama.cpp pads them
        tokens.append(f"[PAD{i}]")
        types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    ids = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(bool(ids) and ids[0] == tokenizer.bos_token_id)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


# ---------------------------------------------------------------------------------------------
# Reading back without transformers
# ---------------------------------------------------------------------------------------------
class StoredTensor(NamedTuple):
    """One tensor of a GGUF file: its storage type and its values dequantized to float32, in
    PyTorch's layout (rows = output features)."""

    type: str
    tensor: torch.Tensor


def _stored(reader) -> dict[str, StoredTensor]:
    from gguf import dequantize

    return {t.name: StoredTensor(t.tensor_type.name.lower(),
                                 torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)))
            for t in reader.tensors}


def read_gguf_tensors(path) -> dict[str, StoredTensor]:
    """Every tensor of a GGUF file by its GGUF name, dequantized to float32 with ``gguf.dequantize``."""
    from gguf import GGUFReader

    return _stored(GGUFReader(str(path)))


def gguf_tensor_types(path) -> dict[str, int]:
    """How many tensors of each storage type a GGUF file holds (``{"q8_0": 210, "f32": 61}``),
    read from the header without dequantizing anything."""
    from gguf import GGUFReader

    counts: dict[str, int] = {}
    for t in GGUFReader(str(path)).tensors:
        counts[t.tensor_type.name.lower()] = counts.get(t.tensor_type.name.lower(), 0) + 1
    return dict(sorted(counts.items()))


def gguf_state_dict(path) -> dict[str, torch.Tensor]:
    """A GGUF file written by `export_gguf` as a transformers state dict (names mapped back, q/k
    rows un-permuted), read with gguf-py alone: an independent check of transformers' reader.
    Only the four header fields it needs are decoded (the vocabulary's are slow to read)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    field = lambda key: reader.fields[key].contents()
    arch = field("general.architecture")
    heads, kv_heads = field(f"{arch}.attention.head_count"), field(f"{arch}.attention.head_count_kv")
    back = {g: h for h, g in gguf_names(field(f"{arch}.block_count")).items()}
    state = {}
    for name, stored in _stored(reader).items():
        tensor = stored.tensor
        if ".attn_q." in name:
            tensor = unpermute_rows(tensor, heads)
        elif ".attn_k." in name:
            tensor = unpermute_rows(tensor, kv_heads)
        state[back[name]] = tensor
    return state
