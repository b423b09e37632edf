"""course_lib.export, gguf_export and generation: merged == base + adapter, ONNX == PyTorch,
INT8 keeps retrieval quality, GGUF round trips, generation with and without the KV cache.

Expected values come from the PyTorch models themselves (the reference runtime), from peft and
transformers (merge, GGUF reading, ``model.generate``), from the course's shipped llama.cpp-made
GGUF file, or from hand arithmetic; never from numbers this code printed earlier. The real
models are exported once per module; SmolLM2 with its first two decoder layers only (the whole
model takes ~50 s to export, and chapter 06 exports it).
"""

import copy
import os

import numpy as np
import onnx
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from course_lib import data, export, gguf_export, instruct, lora, retrieval
from course_lib.generation import cache_bytes, generate, kv_cache_bytes_per_token, returned_cache
from course_lib.models import quiet_gguf_conversion, smollm2_gguf_path, tiny_bert, tiny_llama

EXACT = {"rtol": 0, "atol": 0}
SAME = {"rtol": 1e-5, "atol": 1e-5}  # the same weights, summed in another order


def _randomise_b(model, seed=0):
    """B starts at zero; give it values so that the adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _llama64(seed=0):
    """A tiny Llama whose rows are multiples of 32, so every GGUF block type applies to every matrix."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                        max_position_embeddings=64, tie_word_embeddings=True)).eval()


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------------------------------------
# Merging: the merged plain model computes what base + adapter computed at runtime
# ---------------------------------------------------------------------------------------------
def test_course_lib_lora_merged_and_saved_equals_base_plus_adapter(tmp_path):
    model = lora.inject_lora(tiny_llama(), ["q_proj", "v_proj", "down_proj"], r=4, lora_alpha=8)
    _randomise_b(model)
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        with lora.disable_adapters(model):
            base = model(ids).logits
        runtime = model(ids).logits
    assert (runtime - base).abs().max() > 1e-2  # the adapter does change the output
    merged = export.merge_adapter(model)
    assert not lora.lora_layers(merged) and type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, runtime, **SAME)
    export.save_merged(merged, tmp_path / "merged")
    assert "model.safetensors" in _files(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, runtime, **SAME)


def test_peft_lora_merged_and_saved_equals_base_plus_adapter(tmp_path):
    model = get_peft_model(tiny_bert(), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    _randomise_b(model)
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        runtime = model(input_ids=ids).last_hidden_state
    merged = export.merge_adapter(model)
    assert type(merged).__name__ == "BertModel"
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).last_hidden_state, runtime, **SAME)
    export.save_merged(merged, tmp_path / "merged")
    reloaded = AutoModel.from_pretrained(str(tmp_path / "merged")).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).last_hidden_state, runtime, **SAME)


def test_merged_minilm_gives_the_adapters_embeddings(minilm):
    model, tokenizer = minilm
    adapted = lora.inject_lora(copy.deepcopy(model), ["query", "value"], r=8, lora_alpha=16)
    _randomise_b(adapted)
    texts = [r["query"] for r in data.load_code_search("test")[:16]]
    runtime = retrieval.embed(adapted, tokenizer, texts)
    assert (runtime - retrieval.embed(model, tokenizer, texts)).abs().max() > 1e-2
    torch.testing.assert_close(retrieval.embed(export.merge_adapter(adapted), tokenizer, texts), runtime, **SAME)


def test_already_merged_adapter_is_merged_once():
    model = lora.inject_lora(tiny_llama(), ["q_proj"], r=4, lora_alpha=8)
    _randomise_b(model)
    ids = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        runtime = model(ids).logits
    lora.merge(model)
    with torch.no_grad():
        torch.testing.assert_close(export.merge_adapter(model)(ids).logits, runtime, **SAME)


def test_merge_refuses_what_would_not_equal_the_running_model():
    with pytest.raises(ValueError, match="nothing to merge"):
        export.merge_adapter(tiny_llama())
    model = lora.inject_lora(tiny_llama(), ["q_proj"], adapter_name="a")
    lora.inject_lora(model, ["q_proj"], adapter_name="b")
    lora.set_adapter(model, ["a", "b"])
    with pytest.raises(ValueError, match=r"several adapters are active \(\['a', 'b'\]"):
        export.merge_adapter(model)
    lora.set_adapter(model, "a")
    next(iter(lora.lora_layers(model).values())).active_adapters = ["b"]
    with pytest.raises(ValueError, match=r"mismatched adapters: .* \['a', 'b'\]"):
        export.merge_adapter(model)
    lora.set_adapter(model, "a")
    lora.merge(model)
    lora.set_adapter(model, "b")
    with pytest.raises(ValueError, match=r"\['a'\] is merged .* active adapter is 'b'.*unmerge"):
        export.merge_adapter(model)
    with pytest.raises(ValueError, match="unknown adapter 'c'"):
        export.merge_adapter(model, adapter_name="c")
    assert lora.lora_layers(model)  # nothing was unloaded by the refusals


def test_merge_refuses_two_active_peft_adapters_and_merges_a_named_one():
    model = get_peft_model(tiny_bert(), LoraConfig(r=4, target_modules=["query"]), adapter_name="one")
    model.add_adapter("two", LoraConfig(r=4, target_modules=["query"]))
    model.base_model.set_adapter(["one", "two"])
    with pytest.raises(ValueError, match=r"several adapters are active \(\['one', 'two'\]\)"):
        export.merge_adapter(model)
    assert type(export.merge_adapter(model, adapter_name="two")).__name__ == "BertModel"


def test_unmerged_models_are_refused_by_every_writer(tmp_path):
    ours = lora.inject_lora(tiny_llama(), ["q_proj"])
    theirs = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    for model in (ours, theirs):
        for write in (lambda m: export.save_merged(m, tmp_path / "out"),
                      lambda m: export.export_onnx_causal_lm(m, tmp_path / "out.onnx"),
                      lambda m: gguf_export.export_gguf(m, tmp_path / "out.gguf")):
            with pytest.raises(ValueError, match=r"unmerged LoRA adapters .*merge_adapter\(model\) first"):
                write(model)
    assert _files(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# Writing: refuse an existing path, never leave a partial file
# ---------------------------------------------------------------------------------------------
def test_existing_output_is_refused_unless_overwrite(tmp_path):
    target = tmp_path / "model.gguf"
    target.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        gguf_export.export_gguf(tiny_llama(), target, dtype="f32")
    assert target.read_bytes() == b"keep me"
    gguf_export.export_gguf(tiny_llama(), target, dtype="f32", overwrite=True)
    assert target.stat().st_size > 1000 and _files(tmp_path) == ["model.gguf"]
    (tmp_path / "saved").mkdir()
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        export.save_merged(tiny_llama(), tmp_path / "saved")
    export.save_merged(tiny_llama(), tmp_path / "saved", overwrite=True)
    assert "config.json" in _files(tmp_path / "saved") and _files(tmp_path) == ["model.gguf", "saved"]


def test_failed_gguf_write_leaves_no_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    import gguf

    real, calls = gguf.quants.quantize, []

    def quantize_then_fail(data, qtype):  # the disk fills up on the fifth tensor
        calls.append(1)
        if len(calls) == 5:
            raise OSError("No space left on device")
        return real(data, qtype)

    monkeypatch.setattr(gguf.quants, "quantize", quantize_then_fail)
    with pytest.raises(OSError, match="No space"):
        gguf_export.export_gguf(tiny_llama(), tmp_path / "new.gguf")
    assert _files(tmp_path) == []
    (tmp_path / "old.gguf").write_bytes(b"previous export")
    calls.clear()
    with pytest.raises(OSError, match="No space"):
        gguf_export.export_gguf(tiny_llama(), tmp_path / "old.gguf", overwrite=True)
    assert _files(tmp_path) == ["old.gguf"] and (tmp_path / "old.gguf").read_bytes() == b"previous export"


def test_failed_onnx_export_and_save_leave_no_file(tmp_path, monkeypatch):
    class Broken(torch.nn.Module):
        config = tiny_bert().config

        def forward(self, input_ids, attention_mask):
            raise RuntimeError("this model cannot be traced")

    with pytest.raises(Exception, match="cannot be traced"):
        export.export_onnx_encoder(Broken(), tmp_path / "enc.onnx")
    model = tiny_bert()

    def save_half_then_fail(self, directory, **kwargs):
        with open(os.path.join(directory, "model.safetensors"), "wb") as f:
            f.write(b"half a file")
        raise OSError("No space left on device")

    monkeypatch.setattr(type(model), "save_pretrained", save_half_then_fail)
    with pytest.raises(OSError, match="No space"):
        export.save_merged(model, tmp_path / "saved")
    assert _files(tmp_path) == []


def test_unsupported_quantization_types_list_the_supported_ones(tmp_path):
    with pytest.raises(ValueError, match=r"unsupported GGUF type 'q4_k_m'.*'f16', 'bf16', 'q8_0'"):
        gguf_export.export_gguf(tiny_llama(), tmp_path / "m.gguf", dtype="q4_k_m")
    (tmp_path / "m.onnx").write_bytes(b"not read")
    with pytest.raises(ValueError, match=r"unsupported weight_type 'int4'.*\['int8', 'uint8'\]"):
        export.quantize_onnx_int8(tmp_path / "m.onnx", tmp_path / "m.int8.onnx", weight_type="int4")
    with pytest.raises(FileNotFoundError, match="export the model first"):
        export.quantize_onnx_int8(tmp_path / "missing.onnx", tmp_path / "q.onnx")
    with pytest.raises(ValueError, match="Llama-architecture"):
        gguf_export.export_gguf(tiny_bert(), tmp_path / "bert.gguf")
    with pytest.raises(ValueError, match=r"export a float32 model \(model.float\(\)\), got \['bfloat16'\]"):
        export.export_onnx_encoder(tiny_bert().to(torch.bfloat16), tmp_path / "bf16.onnx")
    assert _files(tmp_path) == ["m.onnx"]


# ---------------------------------------------------------------------------------------------
# ONNX: MiniLM embeddings and INT8 retrieval quality
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm_onnx(tmp_path_factory, minilm):
    model, tokenizer = minilm
    folder = tmp_path_factory.mktemp("minilm")
    fp32 = export.export_onnx_encoder(model, folder / "minilm.onnx", tokenizer)
    int8 = export.quantize_onnx_int8(fp32, folder / "minilm.int8.onnx")
    return fp32, int8


def test_onnx_minilm_embeddings_equal_pytorch(minilm, minilm_onnx):
    model, tokenizer = minilm
    rows = data.load_code_search("test")[:24]
    for texts, max_length in (([r["query"] for r in rows], 64), ([r["document"] for r in rows], 128)):
        expected = retrieval.embed(model, tokenizer, texts, batch_size=8, max_length=max_length)
        got = retrieval.embed(export.OnnxEncoder(minilm_onnx[0]), tokenizer, texts, batch_size=8,
                              max_length=max_length)
        assert got.shape == expected.shape == (24, 384)
        assert (got - expected).abs().max() < 1e-4


def test_int8_minilm_keeps_recall_at_10_within_2_points(minilm, minilm_onnx):
    """The first 256 code-search test queries against their 256 documents (a query that crosses
    rank 10 moves recall by 0.4 points). Chapter 06 checks the same bound on the whole split, 506
    queries, for its fine-tuned MiniLM, under nbval in make test; repeating the whole split here
    took 26 s."""
    _, tokenizer = minilm
    fp32, int8 = minilm_onnx
    assert int8.stat().st_size < 0.3 * fp32.stat().st_size  # ~23 MB against ~90 MB
    pairs = data.load_code_search("test")[:256]
    full = retrieval.evaluate_code_search(export.OnnxEncoder(fp32), tokenizer, pairs)
    quantized = retrieval.evaluate_code_search(export.OnnxEncoder(int8), tokenizer, pairs)
    assert full["n_docs"] == quantized["n_docs"] == len(pairs) == 256
    assert full["recall@10"] > 0.6  # the pretrained model's quality, not a broken export
    assert abs(quantized["recall@10"] - full["recall@10"]) <= 0.02


# ---------------------------------------------------------------------------------------------
# ONNX: SmolLM2 logits, the KV cache, generation
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_2_layers(smollm2):
    """SmolLM2's real weights and architecture cut to its first two decoder layers (the export
    traces the same layer code 30 times or twice): a tenth of the full export's ~50 s. Chapter 06
    exports the whole model and checks its generation under nbval."""
    model, tokenizer = smollm2
    short = copy.deepcopy(model)
    short.model.layers = torch.nn.ModuleList(short.model.layers[:2])
    short.config.num_hidden_layers = 2
    assert short.get_output_embeddings().weight is short.get_input_embeddings().weight  # still tied
    return short.eval(), tokenizer


@pytest.fixture(scope="module")
def smollm2_onnx_path(tmp_path_factory, smollm2_2_layers):
    return export.export_onnx_causal_lm(smollm2_2_layers[0], tmp_path_factory.mktemp("smollm2") / "smollm2.onnx")


@pytest.fixture(scope="module")
def smollm2_onnx(smollm2_onnx_path):
    return export.OnnxCausalLM(smollm2_onnx_path)


def test_folded_export_runs_as_the_full_onnxscript_optimizers(smollm2_2_layers, smollm2_onnx_path, tmp_path,
                                                              monkeypatch):
    """The export folds constants only (`export._fold_constants`); ``torch.onnx.export(...,
    optimize=True)`` runs onnxscript's whole optimizer, its pattern rewrites and fusions too (the
    reference here). onnxruntime gives bit-identical outputs from both files, with and without the
    KV cache, and INT8 quantization quantizes the same weights in both (the transposed weights that
    folding stores: an unfolded export keeps them float) and keeps the outputs bit-identical."""
    from onnxscript.optimizer import optimize_ir
    from onnxscript.rewriter import onnx_fusions

    model, tokenizer = smollm2_2_layers
    monkeypatch.setattr(export, "_fold_constants", lambda m: (optimize_ir(m), onnx_fusions.fuse(m)))
    full = export.export_onnx_causal_lm(model, tmp_path / "full.onnx")
    monkeypatch.undo()
    ours_int8 = export.quantize_onnx_int8(smollm2_onnx_path, tmp_path / "ours.int8.onnx")
    full_int8 = export.quantize_onnx_int8(full, tmp_path / "full.int8.onnx")
    int8_elements = [sum(np.prod(t.dims) for t in onnx.load(str(f)).graph.initializer
                         if t.data_type == onnx.TensorProto.INT8) for f in (ours_int8, full_int8)]
    linear_weights = sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    assert int8_elements[0] == int8_elements[1] >= linear_weights
    batch = tokenizer(["The capital of France is", "def add(a, b):\n    return a + b"], return_tensors="pt",
                      padding=True)  # left padding in row 0
    ids, mask = batch["input_ids"], batch["attention_mask"]
    for mine, reference in ((smollm2_onnx_path, full), (ours_int8, full_int8)):
        a, b = export.OnnxCausalLM(mine), export.OnnxCausalLM(reference)
        assert torch.equal(a(ids, mask, use_cache=False).logits, b(ids, mask, use_cache=False).logits)
        prefix_a, prefix_b = a(ids[:, :-1], mask[:, :-1]), b(ids[:, :-1], mask[:, :-1])
        assert torch.equal(a(ids[:, -1:], mask, cache=prefix_a.cache).logits,
                           b(ids[:, -1:], mask, cache=prefix_b.cache).logits)


def test_onnx_smollm2_logits_equal_pytorch(smollm2_2_layers, smollm2_onnx):
    model, tokenizer = smollm2_2_layers
    batch = tokenizer(["The capital of France is", "def add(a, b):\n    return a + b  # adds two numbers"],
                      return_tensors="pt", padding=True)  # left padding: row 0 starts with pads
    with torch.no_grad():
        expected = model(**batch).logits
    got = smollm2_onnx(batch["input_ids"], batch["attention_mask"], use_cache=False).logits
    real = batch["attention_mask"].bool()  # a pad position's logits mean nothing in either runtime
    assert got.shape == expected.shape and not real.all()
    assert (got - expected)[real].abs().max() < 1e-3


def test_onnx_kv_cache_gives_the_full_recomputation_and_its_size(smollm2_2_layers, smollm2_onnx):
    model, tokenizer = smollm2_2_layers
    ids = tokenizer(["Edge deployment means running the model on"], return_tensors="pt")["input_ids"]
    full = smollm2_onnx(ids, use_cache=False).logits[:, -1]
    prefix = smollm2_onnx(ids[:, :-1])
    step = smollm2_onnx(ids[:, -1:], cache=prefix.cache)
    assert (step.logits[:, -1] - full).abs().max() < 1e-3
    per_token = kv_cache_bytes_per_token(model.config)
    assert per_token == 2 * 2 * 3 * 64 * 4  # key and value, 2 layers, 3 kv heads of 64 dims, float32
    assert cache_bytes(step.cache) == ids.shape[1] * per_token


def test_kv_cache_formula_matches_the_cache_tensors(smollm2):
    model, _ = smollm2
    per_token = kv_cache_bytes_per_token(model.config)
    assert per_token == 2 * 30 * 3 * 64 * 4 == 46_080  # layers, kv heads, head dim, float32 bytes
    assert kv_cache_bytes_per_token(model.config, torch.bfloat16) == per_token // 2
    with torch.no_grad():
        out = model(torch.randint(0, 1000, (2, 10)), use_cache=True)
    assert cache_bytes(returned_cache(out)) == 2 * 10 * per_token
    tiny = tiny_llama()  # 2 layers, 2 kv heads of 8 dims
    with torch.no_grad():
        out = tiny(torch.randint(0, 128, (3, 5)), use_cache=True)
    assert cache_bytes(returned_cache(out)) == 3 * 5 * kv_cache_bytes_per_token(tiny.config) == 3 * 5 * 2 * 2 * 2 * 8 * 4


def test_generation_with_and_without_cache_picks_the_same_tokens(smollm2_2_layers, smollm2_onnx):
    model, tokenizer = smollm2_2_layers
    prompt = instruct.chat_prompt(tokenizer, "Name a Python function that returns the length of a list.")
    cached = generate(model, tokenizer, prompt, max_new_tokens=12, stop_at_eos=False)
    uncached = generate(model, tokenizer, prompt, max_new_tokens=12, use_cache=False, stop_at_eos=False)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        reference = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                   min_new_tokens=12, pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
    assert cached.token_ids == uncached.token_ids == reference and len(reference) == 12
    assert cached.cache_bytes == (ids.shape[1] + 11) * kv_cache_bytes_per_token(model.config)  # last token not fed
    assert uncached.cache_bytes == 0 and cached.tokens_per_second > 0 and cached.text
    onnx = generate(smollm2_onnx, tokenizer, prompt, max_new_tokens=12, stop_at_eos=False)
    onnx_uncached = generate(smollm2_onnx, tokenizer, prompt, max_new_tokens=12, use_cache=False, stop_at_eos=False)
    assert onnx.token_ids == onnx_uncached.token_ids == reference
    assert onnx.cache_bytes == cached.cache_bytes


def test_generate_rejects_bad_arguments():
    with pytest.raises(ValueError, match="positive"):
        generate(tiny_llama(), None, [1, 2], max_new_tokens=0)
    with pytest.raises(ValueError, match="needs the tokenizer"):
        generate(tiny_llama(), None, "text")
    with pytest.raises(ValueError, match="empty"):
        generate(tiny_llama(), None, [])


# ---------------------------------------------------------------------------------------------
# GGUF
# ---------------------------------------------------------------------------------------------
STEP = {"q8_0": 1 / 127, "q5_1": 2 / 31, "q5_0": 1 / 15, "q4_1": 2 / 15, "q4_0": 1 / 7}  # × block absmax


@pytest.mark.parametrize("dtype", gguf_export.GGUF_TYPES)
def test_gguf_round_trip_names_shapes_and_values(tmp_path, dtype):
    model = _llama64()
    path = gguf_export.export_gguf(model, tmp_path / f"m.{dtype}.gguf", dtype=dtype)
    stored = gguf_export.read_gguf_tensors(path)
    names = gguf_export.gguf_names(2)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied: not written
    assert set(stored) == {names[k] for k in state}
    back = gguf_export.gguf_state_dict(path)
    for hf_name, original in state.items():
        kind = stored[names[hf_name]].type
        if original.dim() == 1:
            assert kind == "f32"
        elif hf_name == "model.embed_tokens.weight" and dtype in gguf_export.LOW_BIT:
            assert kind == "q8_0"
        else:
            assert kind == dtype
        assert back[hf_name].shape == original.shape, hf_name
        if kind == "f32":
            torch.testing.assert_close(back[hf_name], original, **EXACT)
        elif kind in ("f16", "bf16"):
            rounded = original.to(torch.float16 if kind == "f16" else torch.bfloat16).float()
            torch.testing.assert_close(back[hf_name], rounded, **EXACT)
        else:  # blocks of 32 along a row: every error is under one quantization step of its block
            blocks = original.reshape(-1, 32)
            error = (back[hf_name].reshape(-1, 32) - blocks).abs().amax(1)
            assert (error <= STEP[kind] * blocks.abs().amax(1) * 1.01 + 1e-7).all(), hf_name
    counted = {}
    for tensor in stored.values():
        counted[tensor.type] = counted.get(tensor.type, 0) + 1
    assert gguf_export.gguf_tensor_types(path) == counted  # the header's count, without dequantizing


def test_gguf_rows_that_do_not_fill_a_block_fall_back_to_f16(tmp_path):
    path = gguf_export.export_gguf(tiny_llama(), tmp_path / "m.gguf", dtype="q8_0")  # hidden size 48
    types = {name: t.type for name, t in gguf_export.read_gguf_tensors(path).items()}
    assert types["blk.0.attn_q.weight"] == "f16"  # rows of 48
    assert types["blk.0.ffn_down.weight"] == "q8_0"  # rows of 96 = 3 blocks


def test_transformers_reads_our_f32_gguf_with_identical_logits(tmp_path):
    model = tiny_llama()
    gguf_export.export_gguf(model, tmp_path / "tiny.gguf", dtype="f32")
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf", dtype=torch.float32).eval()
    ids = torch.randint(0, 128, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, **EXACT)


def test_smollm2_q8_0_gguf_reads_back_in_transformers_and_matches_llama_cpps_header(tmp_path, smollm2):
    import gguf

    model, tokenizer = smollm2
    path = gguf_export.export_gguf(model, tmp_path / "smollm2.q8_0.gguf", tokenizer, dtype="q8_0")
    assert path.stat().st_size < 0.3 * 4 * sum(p.numel() for p in model.parameters())  # ~145 MB vs 538 MB
    # Inside the block the file is parsed once, for the header, transformers' model and tokenizer
    # and gguf_state_dict (each builds a GGUFReader of its own: ~4 s each on one CPU thread).
    with quiet_gguf_conversion():
        # the header llama.cpp's converter wrote for the same model and tokenizer (the shipped Q4_1 file)
        ours, shipped = gguf.GGUFReader(str(path)).fields, gguf.GGUFReader(str(smollm2_gguf_path())).fields
        keys = [k for k in shipped if k.startswith(("llama.", "tokenizer.")) and k != "tokenizer.ggml.add_space_prefix"]
        assert len(keys) > 15
        for key in keys:
            assert ours[key].contents() == shipped[key].contents(), key
        loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
        gguf_tokenizer = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
        state = gguf_export.gguf_state_dict(path)
    text = "def mean(values):\n    return sum(values) / len(values)  # the average"
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    assert gguf_tokenizer(text, return_tensors="pt")["input_ids"].tolist() == ids.tolist()
    # transformers' reader and ours (gguf-py alone) agree on every weight ...
    dequantized = copy.deepcopy(model)
    dequantized.load_state_dict(state, strict=False)  # lm_head stays tied
    with torch.no_grad():
        got, expected, original = loaded(ids).logits, dequantized(ids).logits, model(ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    # ... and 8-bit weights keep the model's predictions
    assert (got.argmax(-1) == original.argmax(-1)).float().mean() >= 0.95
    assert np.isclose(torch.softmax(got, -1).max(-1).values.mean(), torch.softmax(original, -1).max(-1).values.mean(),
                      atol=0.02)
