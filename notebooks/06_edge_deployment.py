# %% [markdown]
# # 06 · Edge deployment: merge, export, quantize, and measure on a CPU
#
# A fine-tuned adapter is not yet a deployable model. This chapter takes the course's two models
# through the whole road to a laptop or a phone, measuring what each step costs and saves:
#
# 1. **merge** the LoRA adapter into the base weights and save a plain transformers checkpoint
#    (`course_lib.export.merge_adapter`, `save_merged`), and check the merged model computes what
#    base + adapter computed;
# 2. **export to ONNX** with `torch.onnx.export` (the seeds' `transformers.onnx.export` no longer
#    exists) and run it with **onnxruntime**; then **INT8** with onnxruntime's dynamic quantization;
# 3. **export to GGUF**, llama.cpp's format, with the `gguf` package, in float16, 8-bit (Q8_0)
#    and 4-bit (Q4_0, Q4_1), and read it back with transformers;
# 4. **generate** with and without the **KV cache**, and count the cache's bytes per token.
#
# For MiniLM the task metric is recall@10 on the code-search test split (chapter 00); for SmolLM2
# the answer perplexity on test instructions (chapter 01) and whether the greedy answers stay the
# same. Every speed here is measured on the machine that runs the notebook and varies from run to
# run (with the machine and its load), so those outputs are not checked and no claim rests on them.
#
# **Time:** about 4 minutes on 2 CPU cores, 5 to 6 on a CPU without AVX-512 (SmolLM2's ONNX export
# alone takes most of a minute).

# %%
import copy
import importlib.util
import logging
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from IPython.display import Markdown, display
from transformers import AutoModel, AutoModelForCausalLM

from course_lib import (
    budget,
    data,
    export,
    generation,
    gguf_export,
    instruct,
    lora,
    lora_io,
    models,
    retrieval,
    stats,
    train,
)
from course_lib.tooling.source import show

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)   # peft (used to merge) imports bitsandbytes, which notes a missing optional CPU kernel

SEED = 0
DEVICE = "cpu"           # deployment on a CPU is the point of this chapter
MINILM_STEPS, MINILM_BATCH = 6, 32    # LoRA fine-tuning of MiniLM before deployment
SMOL_STEPS, SMOL_BATCH = 3, 8         # LoRA fine-tuning of SmolLM2
N_INSTRUCT = 16          # test instructions scored by answer perplexity
N_GREEDY = 3             # of which greedy answers are generated and compared
NEW_TOKENS = (16, 32, 64)             # KV-cache study (add 128, 256 or 512 to watch the gap grow)
THREADS = torch.get_num_threads()   # onnxruntime gets as many (printed in the plots' titles only: it differs between machines)
OUT = Path(tempfile.mkdtemp(prefix="course06-"))   # every exported file goes here (removed at the end)
_ = torch.manual_seed(SEED)
mb = lambda path: sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 1e6 if Path(path).is_dir() else Path(path).stat().st_size / 1e6

# %% [markdown]
# ## MiniLM: fine-tune, merge, export
#
# First a model worth deploying: MiniLM with LoRA r = 8 on the query and value projections, a few
# contrastive steps on the code-search pairs as in chapter 01. The adapter is saved on its own (what a
# runtime-LoRA deployment ships beside the base model); then the merged copy is saved as an
# ordinary checkpoint, exported to ONNX, and quantized to INT8.

# %%
minilm, tok = models.load_minilm(DEVICE)
lora.inject_lora(minilm, target_modules=["query", "value"], r=8, lora_alpha=16)
optimizer = torch.optim.AdamW([p for p in minilm.parameters() if p.requires_grad], lr=1e-3)
history = train.train(minilm, lambda m, batch: retrieval.code_search_loss(m, tok, batch),
                      train.batches(data.load_code_search("train"), MINILM_BATCH, seed=SEED), steps=MINILM_STEPS,
                      optimizer=optimizer, warmup_steps=2, seed=SEED, desc="MiniLM LoRA", progress=False)
minilm.eval()
lora_io.save_adapter(minilm, OUT / "minilm-adapter")
merged = export.merge_adapter(copy.deepcopy(minilm))
export.save_merged(merged, OUT / "minilm-merged", tokenizer=tok)
export.export_onnx_encoder(merged, OUT / "minilm.onnx", tokenizer=tok)
export.quantize_onnx_int8(OUT / "minilm.onnx", OUT / "minilm-int8.onnx")
print(f"loss {history.loss[0]:.3f} -> {history.loss[-1]:.3f}")

# %% [markdown]
# <a id="claim-06-minilm"></a>
#
# The merged model must compute what base + adapter computed. On a batch of test queries, the
# embeddings of the runtime-LoRA model, the merged model, and the ONNX file agree to float32
# rounding; the INT8 file does not, by design:

# %% tags=["nbval-ignore-output"]
# The differences' exact sizes depend on the CPU's kernels (AVX2 or AVX-512), so only the asserted
# bounds, not the printed digits, are what a re-run must reproduce.
test_pairs = data.load_code_search("test")
queries = [p["query"] for p in test_pairs[:64]]
onnx_fp32 = export.OnnxEncoder(OUT / "minilm.onnx", num_threads=THREADS)
onnx_int8 = export.OnnxEncoder(OUT / "minilm-int8.onnx", num_threads=THREADS)
with torch.no_grad():
    emb = {name: retrieval.encode_batch(m, tok, queries, retrieval.QUERY_MAX_TOKENS)
           for name, m in [("runtime LoRA", minilm), ("merged", merged), ("ONNX fp32", onnx_fp32), ("ONNX int8", onnx_int8)]}
diff = {name: (e - emb["runtime LoRA"]).abs().max().item() for name, e in emb.items() if name != "runtime LoRA"}
cos_int8 = torch.nn.functional.cosine_similarity(emb["ONNX int8"], emb["runtime LoRA"]).min().item()
print({k: f"{v:.0e}" if v < 1e-3 else f"{v:.2f}" for k, v in diff.items()}, f"| INT8 lowest cosine {cos_int8:.2f}")

# %%
# The bounds a re-run must reproduce on every CPU:
assert diff["merged"] < 1e-5 and diff["ONNX fp32"] < 1e-4 and diff["ONNX int8"] > 1e-3 and cos_int8 > 0.95


# %% tags=["nbval-ignore-output"]
def time_load(fn, repeats=1):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        obj = fn()
        best = min(best, time.perf_counter() - start)
    return obj, best

def runtime_lora_minilm():
    base, _ = models.load_minilm(DEVICE)
    return lora_io.load_adapter(base, OUT / "minilm-adapter")

encoders = {
    "PyTorch fp32, runtime LoRA": (runtime_lora_minilm, mb(models.minilm_path()) + mb(OUT / "minilm-adapter")),
    "PyTorch merged": (lambda: AutoModel.from_pretrained(OUT / "minilm-merged").eval(), mb(OUT / "minilm-merged")),
    "ONNX fp32": (lambda: export.OnnxEncoder(OUT / "minilm.onnx", num_threads=THREADS), mb(OUT / "minilm.onnx")),
    "ONNX int8": (lambda: export.OnnxEncoder(OUT / "minilm-int8.onnx", num_threads=THREADS), mb(OUT / "minilm-int8.onnx")),
}
minilm_rows, minilm_ranks = {}, {}
for name, (load, size) in encoders.items():
    model, load_s = time_load(load)
    with torch.no_grad():
        lat = []
        for q in queries[:10]:
            start = time.perf_counter()
            retrieval.encode_batch(model, tok, [q], retrieval.QUERY_MAX_TOKENS)
            lat.append(time.perf_counter() - start)
    start = time.perf_counter()
    with torch.no_grad():
        q_emb, d_emb = retrieval.embed_code_search(model, tok, test_pairs)
    scores = retrieval.retrieval_metrics(q_emb, d_emb, list(range(len(test_pairs))))
    minilm_ranks[name] = retrieval.relevant_ranks(q_emb, d_emb, list(range(len(test_pairs))))   # per query
    minilm_rows[name] = {"MB": size, "load_s": load_s, "query_ms": 1000 * statistics.median(lat),
                         "eval_s": time.perf_counter() - start, **scores}
display(Markdown(f"| MiniLM | MB on disk | load (s) | latency per query (ms) | recall@10 ({len(test_pairs)} queries) | MRR |\n|---|---|---|---|---|---|\n"
                 + "\n".join(f"| {n} | {r['MB']:.1f} | {r['load_s']:.2f} | {r['query_ms']:.1f} | {r['recall@10']:.3f} | {r['mrr']:.3f} |"
                             for n, r in minilm_rows.items())))
recall_diff = stats.paired_bootstrap((minilm_ranks["ONNX fp32"] <= 10).float(), (minilm_ranks["ONNX int8"] <= 10).float())
print(f"recall@10, ONNX int8 minus ONNX fp32 on the same {len(test_pairs)} queries: {recall_diff}  ({recall_diff.verdict()})")

# %% [markdown]
# The speeds above vary from run to run, and the INT8 results with the CPU's integer kernels, so
# that table is not checked; the sizes and the float32 recall do not vary, and are checked here:

# %%
for name, r in minilm_rows.items():
    print(f"{name:<28} {r['MB']:4.0f} MB" + ("" if "int8" in name else f"   recall@10 {r['recall@10']:.3f}"))
m = minilm_rows
assert m["PyTorch merged"]["recall@10"] == m["PyTorch fp32, runtime LoRA"]["recall@10"] == m["ONNX fp32"]["recall@10"]
assert abs(m["ONNX int8"]["recall@10"] - m["ONNX fp32"]["recall@10"]) <= 0.02        # within 2 points
assert m["ONNX int8"]["MB"] < 0.3 * m["ONNX fp32"]["MB"]
assert mb(OUT / "minilm-adapter") < 1.0                                                # the adapter: well under 1 MB

# %% [markdown]
# ## SmolLM2: fine-tune, merge, export to ONNX and GGUF
#
# The same road for the causal LM. SmolLM2 gets a LoRA adapter from a few instruction steps
# (chapter 01), is merged, and goes three ways: ONNX (with its KV cache as inputs and outputs, so
# one file serves generation with and without it), ONNX INT8, and GGUF in float16, Q8_0 (8 bits
# plus a float16 scale per block of 32: 8.5 bits per weight), Q4_0 (4.5 bits) and Q4_1 (a float16
# scale and a float16 minimum per block of 32, $w \approx \text{scale}\cdot q + \min$: 5 bits).

# %%
smol, smol_tok = models.load_smollm2(DEVICE)
lora.inject_lora(smol, target_modules=["q_proj", "v_proj"], r=8, lora_alpha=16)
optimizer = torch.optim.AdamW([p for p in smol.parameters() if p.requires_grad], lr=2e-3)
smol_history = train.train(smol, lambda m, batch: instruct.answer_loss(m, smol_tok, batch),
                           train.batches(data.load_instruct("train"), SMOL_BATCH, seed=SEED), steps=SMOL_STEPS,
                           optimizer=optimizer, warmup_steps=1, seed=SEED, desc="SmolLM2 LoRA", progress=False)
smol.eval()
lora_io.save_adapter(smol, OUT / "smollm2-adapter")
smol_merged = export.merge_adapter(copy.deepcopy(smol))
export.save_merged(smol_merged, OUT / "smollm2-merged", tokenizer=smol_tok)
start = time.perf_counter()
export.export_onnx_causal_lm(smol_merged, OUT / "smollm2.onnx")
onnx_export_s = time.perf_counter() - start
export.quantize_onnx_int8(OUT / "smollm2.onnx", OUT / "smollm2-int8.onnx")
for dtype in ("f16", "q8_0", "q4_0", "q4_1"):
    gguf_export.export_gguf(smol_merged, OUT / f"smollm2-{dtype}.gguf", tokenizer=smol_tok, dtype=dtype)
print(f"loss {smol_history.loss[0]:.2f} -> {smol_history.loss[-1]:.2f}")

# %% tags=["nbval-ignore-output"]
print(f"ONNX export of SmolLM2: {onnx_export_s:.0f} s")

# %% [markdown]
# The GGUF file must read back as what was written. gguf-py's own reader gives the tensors with the
# same names and shapes; float16 values equal PyTorch's float16 rounding exactly, and the 8-bit and
# 4-bit ones are within their blocks' quantization steps. transformers loads the file too
# (`from_pretrained(..., gguf_file=...)`), which is what a learner without llama.cpp can use:

# %%
with models.quiet_gguf_conversion():   # each file parsed once for all the reads below; no progress bar
    start = time.perf_counter()        # (transformers' load first, so its time includes the parsing)
    gguf_model = AutoModelForCausalLM.from_pretrained(OUT, gguf_file="smollm2-q8_0.gguf", dtype=torch.float32).eval()
    gguf_load_s = time.perf_counter() - start
    back = {d: gguf_export.gguf_state_dict(OUT / f"smollm2-{d}.gguf") for d in ("f16", "q8_0", "q4_0", "q4_1")}
    types = {d: gguf_export.gguf_tensor_types(OUT / f"smollm2-{d}.gguf") for d in back}
reference = {k: v for k, v in smol_merged.state_dict().items() if k != "lm_head.weight"}
assert set(back["f16"]) == set(reference) and all(back["f16"][k].shape == v.shape for k, v in reference.items())
print("GGUF tensor types:", types)
errors = {d: max((back[d][k] - v).abs().max().item() / v.abs().max().item() for k, v in reference.items()) for d in back}
print("largest error relative to a tensor's largest value:", {d: f"{e:.1e}" for d, e in errors.items()})
w = reference["model.layers.0.self_attn.q_proj.weight"]
assert torch.equal(back["f16"]["model.layers.0.self_attn.q_proj.weight"], w.half().float())
assert errors["f16"] < 1e-3 < errors["q8_0"] < 0.01 < errors["q4_0"] < 0.2 and errors["q4_1"] < errors["q4_0"]
same = all(torch.allclose(gguf_model.state_dict()[k], v, atol=1e-6) for k, v in back["q8_0"].items())
print("transformers reads the Q8_0 file back with the values gguf-py reads:", same)
assert same

# %% [markdown]
# <a id="claim-06-q4-1-grid"></a>
#
# **A caution about Q4_1 and this SmolLM2.** The course installs SmolLM2 as a Q4_1 GGUF file and
# dequantizes it to float32 on loading, so its weights already sit on a Q4_1 grid: each block of 32
# holds at most 16 values $\text{scale}\cdot q + \min$. Only the layers the adapter changed
# (q_proj and v_proj, merged) left that grid. Exporting to Q4_1 again can then give back the very
# same values, which makes Q4_1 look lossless here for a reason that has nothing to do with the
# format's merits. How many weights each 4-bit export reproduces exactly:

# %%
adapted = lambda name: name.endswith(("q_proj.weight", "v_proj.weight"))
exact_share = {}
for d in ("q4_0", "q4_1"):
    for group, keep in (("adapted q/v", adapted), ("other linear", lambda n: not adapted(n))):
        names = [k for k, v in reference.items() if v.dim() == 2 and "embed" not in k and keep(k)]
        same_values = sum((back[d][k] == reference[k]).sum().item() for k in names)
        exact_share[d, group] = same_values / sum(reference[k].numel() for k in names)
for (d, group), share in exact_share.items():
    print(f"{d.upper()} export, {group:13s} layers: {share:7.2%} of the weights reproduced exactly")
assert exact_share["q4_1", "other linear"] > 0.99 and exact_share["q4_1", "adapted q/v"] < 0.1
assert exact_share["q4_0", "other linear"] < 0.5

# %% [markdown]
# <a id="claim-06-smollm2"></a>
#
# Now the table. Each SmolLM2 variant is scored on the same test instructions: answer perplexity
# (lower is better), how many of the greedy answers equal the merged PyTorch model's, and the speed
# of generating 32 tokens with the KV cache. The GGUF rows run as PyTorch models with the
# dequantized weights (for accuracy); their speed is llama.cpp's business, which this machine cannot
# install (below).

# %% tags=["nbval-ignore-output"]
test_rows = data.load_instruct("test")[:N_INSTRUCT]
instructions, answers = [r["instruction"] for r in test_rows], [r["answer"] for r in test_rows]
prompts = [instruct.chat_prompt(smol_tok, x) for x in instructions[:N_GREEDY]]

def runtime_lora_smol():
    base, _ = models.load_smollm2(DEVICE)
    return lora_io.load_adapter(base, OUT / "smollm2-adapter")

def from_gguf_weights(dtype):
    model = copy.deepcopy(smol_merged)
    model.load_state_dict(back[dtype], strict=False)   # lm_head is tied to the embedding
    return model.eval()

variants = {
    "PyTorch fp32, runtime LoRA": (runtime_lora_smol, mb(OUT / "smollm2-adapter") + mb(models.smollm2_checkpoint() / "model.safetensors")),
    "PyTorch merged": (lambda: AutoModelForCausalLM.from_pretrained(OUT / "smollm2-merged").eval(), mb(OUT / "smollm2-merged")),
    "ONNX fp32": (lambda: export.OnnxCausalLM(OUT / "smollm2.onnx", num_threads=THREADS), mb(OUT / "smollm2.onnx")),
    "ONNX int8": (lambda: export.OnnxCausalLM(OUT / "smollm2-int8.onnx", num_threads=THREADS), mb(OUT / "smollm2-int8.onnx")),
    "GGUF f16": (lambda: from_gguf_weights("f16"), mb(OUT / "smollm2-f16.gguf")),
    "GGUF Q8_0": (lambda: from_gguf_weights("q8_0"), mb(OUT / "smollm2-q8_0.gguf")),
    "GGUF Q4_0": (lambda: from_gguf_weights("q4_0"), mb(OUT / "smollm2-q4_0.gguf")),
    "GGUF Q4_1": (lambda: from_gguf_weights("q4_1"), mb(OUT / "smollm2-q4_1.gguf")),
}
smol_rows, greedy, answer_rows = {}, {}, {}
for name, (load, size) in variants.items():
    model, load_s = time_load(load, repeats=1)
    answer_rows[name] = instruct.answer_nll(model, smol_tok, instructions, answers)   # per answer: [summed NLL, tokens]
    ppl = stats.corpus_perplexity(answer_rows[name].numpy()).item()
    greedy[name] = [generation.generate(model, smol_tok, p, max_new_tokens=10).token_ids for p in prompts]
    tps = None if name.startswith("GGUF") else generation.generate(model, smol_tok, prompts[0], max_new_tokens=32, stop_at_eos=False).tokens_per_second
    smol_rows[name] = {"MB": size, "load_s": gguf_load_s if name == "GGUF Q8_0" else load_s, "tokens_per_s": tps, "perplexity": ppl}
    del model
for name, r in smol_rows.items():
    r["same_answers"] = sum(a == b for a, b in zip(greedy[name], greedy["PyTorch merged"]))
display(Markdown(f"| SmolLM2 | MB on disk | load (s) | tokens/s (32 new, KV cache) | answer perplexity ({N_INSTRUCT}) | greedy answers = merged ({N_GREEDY}) |\n|---|---|---|---|---|---|\n"
                 + "\n".join(f"| {n} | {r['MB']:.0f} | {r['load_s']:.1f} | {'-' if n.startswith('GGUF') else format(r['tokens_per_s'], '.0f')} | {r['perplexity']:.2f} | {r['same_answers']} |"
                             for n, r in smol_rows.items())))
int8_diff = stats.paired_bootstrap(answer_rows["PyTorch merged"], answer_rows["ONNX int8"], stats.corpus_perplexity)
print(f"answer perplexity, ONNX int8 minus PyTorch merged: {int8_diff}  ({int8_diff.verdict(higher_is_better=False)})")

# %%
for name, r in smol_rows.items():  # (ONNX INT8's figures depend on the CPU's integer kernels: in the table above)
    print(f"{name:<28} {r['MB']:5.0f} MB" + ("" if "int8" in name else
          f"   perplexity {r['perplexity']:.3g}   greedy answers as merged {r['same_answers']}/{N_GREEDY}"))
print(f"\npaired differences in answer perplexity on the same {N_INSTRUCT} instructions (B minus A, 95% interval):")
ppl_diff = {}
for a, b in [("PyTorch merged", "GGUF Q8_0"), ("PyTorch merged", "GGUF Q4_0"), ("PyTorch merged", "GGUF Q4_1"),
             ("GGUF Q4_0", "GGUF Q4_1")]:
    ppl_diff[a, b] = stats.paired_bootstrap(answer_rows[a], answer_rows[b], stats.corpus_perplexity)
    print(f"  {a:>14s} -> {b:9s} {ppl_diff[a, b]}  ({ppl_diff[a, b].verdict(higher_is_better=False)})")
s = smol_rows
exact = ("PyTorch fp32, runtime LoRA", "PyTorch merged", "ONNX fp32", "GGUF f16")
assert all(abs(s[n]["perplexity"] / s["PyTorch merged"]["perplexity"] - 1) < 0.01 for n in exact)
assert all(s[n]["same_answers"] == N_GREEDY for n in exact)
assert abs(s["GGUF Q8_0"]["perplexity"] / s["PyTorch merged"]["perplexity"] - 1) < 0.03 and s["GGUF Q8_0"]["same_answers"] == N_GREEDY
assert s["ONNX int8"]["MB"] < 0.3 * s["ONNX fp32"]["MB"] and s["GGUF Q4_0"]["MB"] < 0.4 * s["GGUF f16"]["MB"]
assert ppl_diff["PyTorch merged", "GGUF Q4_0"].verdict(higher_is_better=False) == "loss"  # Q4_0: far worse
assert int8_diff.verdict(higher_is_better=False) == "loss"                                # activations in 8 bits hurt the LLM

# %%
fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
names = list(smol_rows)
axes[0].barh(names, [smol_rows[n]["MB"] for n in names], color="#4c72b0")
axes[0].set_xlabel("size on disk (MB)")
axes[0].set_title("size of each format")
axes[0].invert_yaxis()
points = {n: (smol_rows[n]["MB"], smol_rows[n]["perplexity"]) for n in names}
axes[1].scatter(*zip(*points.values()), color="#c44e52")
groups = []   # formats with (nearly) the same size and perplexity share one label instead of overprinting
for n, (size, ppl) in points.items():
    near = [g for g in groups if abs(points[g[0]][0] / size - 1) < 0.05 and abs(points[g[0]][1] / ppl - 1) < 0.05]
    if near:
        near[0].append(n)
    else:
        groups.append([n])
largest = max(size for size, _ in points.values())
for g in groups:
    size, ppl = points[g[0]]
    right_edge = size > 0.7 * largest   # labels near the right edge go to the left of their point
    axes[1].annotate("\n".join(n.replace("PyTorch fp32, ", "PyTorch ") for n in g), (size, ppl), fontsize=8,
                     textcoords="offset points", xytext=(-6, 6) if right_edge else (6, 6),
                     ha="right" if right_edge else "left", va="bottom")
axes[1].set_xlim(0, 1.1 * largest)
axes[1].set_yscale("log")   # INT8's perplexity can be orders of magnitude above the others' (see below)
axes[1].set_ylim(0.7 * min(ppl for _, ppl in points.values()), 10 * max(ppl for _, ppl in points.values()))
axes[1].set_xlabel("size on disk (MB)")
axes[1].set_ylabel(f"answer perplexity, {N_INSTRUCT} test instructions (log scale)")
axes[1].set_title("size against answer perplexity (lower is better)")
fig.suptitle("SmolLM2 after LoRA: the deployment formats compared")
plt.tight_layout()
plt.show()

# %% [markdown]
# <a id="claim-06-kv-cache"></a>
#
# ## Generation with and without the KV cache
#
# Greedy decoding appends, step after step, the most likely next token given all the tokens so far.
# Without a cache, generating token $t$ runs all $t$ tokens before it through the model again; with
# it, each attention layer keeps the keys and values it computed for earlier positions, and a step
# feeds only the newest token. Here is the whole loop with the cache, on the merged SmolLM2:

# %%
@torch.no_grad()
def greedy_kv(model, input_ids, max_new_tokens):
    cache_arg = generation.cache_keyword(model)        # "cache" in this transformers, "past_key_values" in older ones
    out = model(input_ids=input_ids, use_cache=True)    # prefill: the whole prompt in one pass fills the cache
    token = out.logits[:, -1:].argmax(-1)               # greedy: the most likely next token, shape (1, 1)
    new = [token]
    while len(new) < max_new_tokens:
        cache = generation.returned_cache(out)           # per layer: keys and values of every position so far
        out = model(input_ids=token, use_cache=True, **{cache_arg: cache})   # decode: one token in, one position added
        token = out.logits[:, -1:].argmax(-1)
        new.append(token)
    return torch.cat(new, dim=1)[0]                      # the new token ids, 1-D


prompt_ids = smol_tok("def fibonacci(n):", add_special_tokens=False)["input_ids"]   # a short prompt: the study is the new tokens
ids = torch.tensor([prompt_ids])
by_hand = greedy_kv(smol_merged, ids, 8)
by_transformers = smol_merged.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                       max_new_tokens=8, eos_token_id=None)[0, ids.shape[1]:]
by_course_lib = generation.generate(smol_merged, smol_tok, prompt_ids, max_new_tokens=8, stop_at_eos=False).token_ids
print(f"{len(prompt_ids)}-token prompt {smol_tok.decode(prompt_ids)!r} -> {smol_tok.decode(by_hand)!r}")
print("new token ids:", by_hand.tolist())
assert by_hand.tolist() == by_transformers.tolist() == by_course_lib
with torch.no_grad():
    prefill_cache = generation.returned_cache(smol_merged(input_ids=ids, use_cache=True))
keys = prefill_cache.layers[0].keys
print(f"cache after the prompt: {len(prefill_cache.layers)} layers, each a key and a value tensor of shape {tuple(keys.shape)}")
assert tuple(keys.shape) == (1, smol_merged.config.num_key_value_heads, len(prompt_ids), smol_merged.config.head_dim)

# %% [markdown]
# **What just happened.** The first forward pass ran the 6-token prompt and returned, besides the
# logits, the cache: for each of the 30 layers a key tensor and a value tensor of shape
# (batch, KV heads, positions, head dim). Each later pass fed a single token; its query attended to
# the cached keys and values plus its own, and the pass appended its key and value, so the cache
# grew by one position per layer per step. Taking the argmax of the last position's logits is all
# greedy decoding is. The eight tokens equal transformers' `model.generate(do_sample=False)` and
# `course_lib.generation.generate` (the same loop, with a mode that recomputes everything instead
# and a timer), token for token.
#
# The price is memory. Per token of one sequence the cache holds a key and a value vector for every
# KV head of every layer:
#
# $$\text{bytes/token} = 2\cdot L\cdot h_{kv}\cdot d_{head}\cdot b$$
#
# with $L$ layers, $h_{kv}$ key/value heads (fewer than the query heads under grouped-query
# attention), $d_{head}$ numbers per head and $b$ bytes per number (4 in float32, 2 in bfloat16).
# `generation.kv_cache_bytes_per_token` computes it from a transformers config:

# %%
show(generation.kv_cache_bytes_per_token, generation.cache_shape)

# %% [markdown]
# For SmolLM2 in float32 that is $2 \cdot 30 \cdot 3 \cdot 64 \cdot 4 = 46{,}080$ bytes (45 KiB) per
# token, checked here against the size of the cache tensors after a generation:

# %%
config = smol_merged.config
per_token = generation.kv_cache_bytes_per_token(config, torch.float32)
run = generation.generate(smol_merged, smol_tok, prompt_ids, max_new_tokens=32, stop_at_eos=False)
held = len(prompt_ids) + len(run.token_ids) - 1      # the last new token has not been fed yet
print(f"SmolLM2: {per_token:,} bytes per token (2 x {config.num_hidden_layers} layers x {config.num_key_value_heads} KV heads x "
      f"{config.head_dim} dims x 4 bytes); after {held} tokens the cache holds {run.cache_bytes:,} bytes = {held} x {run.cache_bytes // held:,}")
assert run.cache_bytes == held * per_token
for name in ("llama-3-8b", "llama-3-70b"):
    c = budget.get_config(name)
    b = generation.kv_cache_bytes_per_token(c, torch.bfloat16)
    print(f"{name} in bfloat16: {b / 2**10:.0f} KiB per token, {b * 8192 / 2**30:.2f} GiB for one 8,192-token sequence")

# %% tags=["nbval-ignore-output"]
onnx_lm = export.OnnxCausalLM(OUT / "smollm2.onnx", num_threads=THREADS)
kv = {}
for n in NEW_TOKENS:
    with_cache = generation.generate(onnx_lm, smol_tok, prompt_ids, max_new_tokens=n, stop_at_eos=False)
    without = generation.generate(onnx_lm, smol_tok, prompt_ids, max_new_tokens=n, stop_at_eos=False, use_cache=False)
    kv[n] = {"with": with_cache.tokens_per_second, "without": without.tokens_per_second,
             "same_tokens": with_cache.token_ids == without.token_ids, "cache_MB": with_cache.cache_bytes / 1e6}
    print(f"{n:4d} new tokens: {kv[n]['with']:5.1f} tokens/s with the cache, {kv[n]['without']:5.1f} without "
          f"({kv[n]['with'] / kv[n]['without']:.1f}x); cache {kv[n]['cache_MB']:.1f} MB")
fig, ax = plt.subplots(figsize=(7, 4))
ax.plot(NEW_TOKENS, [kv[n]["with"] for n in NEW_TOKENS], "o-", label="with the KV cache (one token per step)")
ax.plot(NEW_TOKENS, [kv[n]["without"] for n in NEW_TOKENS], "s-", label="without (the whole sequence every step)")
ax.set_xticks(NEW_TOKENS)
ax.set_ylim(0, None)
ax.set_xlabel(f"new tokens generated (after a {len(prompt_ids)}-token prompt)")
ax.set_ylabel("new tokens per second")
ax.set_title(f"SmolLM2 on onnxruntime, {THREADS} CPU threads: greedy generation speed")
ax.legend()
plt.tight_layout()
plt.show()

# %%
print({n: r["same_tokens"] for n, r in kv.items()}, {n: f"{r['cache_MB']:.1f} MB" for n, r in kv.items()})
assert all(r["same_tokens"] for r in kv.values())                       # the cache changes the time, not the answer
longest, shortest = max(NEW_TOKENS), min(NEW_TOKENS)
assert kv[longest]["with"] > 2 * kv[longest]["without"]                  # generous: the gap grows with the length
assert kv[longest]["with"] / kv[longest]["without"] > kv[shortest]["with"] / kv[shortest]["without"]

# %% [markdown]
# <a id="claim-06-llama-cpp"></a>
#
# The cache turns generation from quadratic into linear work: the longer the answer, the larger
# the gap (1.5x at 16 new tokens, 2.9x at 64 in the run above), while its memory grows by 45 KiB per
# token for SmolLM2 (in float32), 128 KiB for LLaMA-3-8B in bfloat16. For one long sequence on a small device the cache, not the weights, can
# become the limit.
#
# ## llama.cpp
#
# `llama-cpp-python` has no binary wheel on PyPI for this machine (only a source archive that
# compiles llama.cpp, which this course does not do in CI), so the GGUF files are not run with
# llama.cpp here:

# %%
print("llama_cpp importable here:", importlib.util.find_spec("llama_cpp") is not None)

# %% [markdown]
# On your own machine, with the `smollm2-q8_0.gguf` this chapter writes (set `OUT` to a folder you
# keep, and skip the clean-up cell):
#
# ```bash
# pip install llama-cpp-python --extra-index-url https://abetlen.github.io/llama-cpp-python/whl/cpu
# python -c "from llama_cpp import Llama; print(Llama(model_path='smollm2-q8_0.gguf').create_completion('def add(a, b):', max_tokens=32)['choices'][0]['text'])"
# ```
#
# or with llama.cpp's own command-line tool: `llama-cli -m smollm2-q8_0.gguf -p "..." -n 32`.
#
# ## Where the seeds' claims stand
#
# * **`transformers.onnx.export`** (seed 001): the module no longer exists in transformers 5
#   (chapter 05 checks the import); `torch.onnx.export(..., dynamo=True)`, which
#   `course_lib.export` uses, is current, and its float32 output equals PyTorch's (embeddings to
#   1e-4, logits to 1e-3 in the tests).
# * **"INT8/INT4 on the edge keeps the accuracy"**: it depends on the model and on *what* is
#   quantized. MiniLM's INT8 ONNX keeps recall@10 within 2 points of float32 (table above; the tests
#   hold it). For SmolLM2, weight-only 8-bit (GGUF Q8_0, 145 MB) keeps the answer perplexity within
#   noise of the merged model's and every greedy answer, but 4-bit Q4_0 (92 MB) multiplies it
#   several times and changes the answers, and so does onnxruntime's dynamic INT8 (140 MB), which
#   also quantizes the *activations* with one scale per tensor. How much it loses depends on the
#   CPU: without VNNI instructions (an AVX2-only CPU), onnxruntime's 8-bit kernel adds pairs of
#   products in 16 bits, which can saturate, and the INT8 file's perplexity grows by orders of
#   magnitude more; `quantize_dynamic(..., reduce_range=True)` (7-bit weights) is onnxruntime's
#   remedy for such CPUs, at some cost in precision. The Q4_1 row cannot settle which
#   4-bit format is better: SmolLM2's weights were Q4_1 values before we exported them, so
#   re-exporting to Q4_1 gave every weight the adapter did not touch back exactly (see above),
#   while Q4_0 rounded them a second time, onto a different grid (chapter 02 measured the same
#   second rounding with NF4); and on the merged q/v layers Q4_1 rounds the adapter's small update
#   back towards that same grid. To choose a 4-bit
#   format, compare them on a model whose weights were never on a 4-bit grid; for this SmolLM2,
#   Q8_0 is the safe weight-only choice, and any 4-bit export must be checked on the task.
# * **"ONNX makes CPU inference 30-200% faster"; "INT8 20-40% faster"** (seed 001): not settled
#   here. The tables above time each format once, on whatever else the machine was doing: on an idle
#   2-core CPU onnxruntime generated SmolLM2's tokens more than twice as fast as PyTorch eager and
#   INT8 encoded MiniLM queries faster than float32, while INT8 generated SmolLM2's tokens at about
#   float32 onnxruntime's speed, one run a little faster, another slower. Single timings on a
#   shared machine move by more than these differences, so the course asserts none of them; "INT8
#   is faster" depends on the model, the CPU and its load.
# * **"A merged model has the same speed as the base model"** (seeds 003, 004): it *is* the base
#   architecture; the runtime-LoRA and merged rows above differ only by the adapter branch
#   (chapter 01 measured 1.4% for it).

# %% [markdown]
# ## What we measured
#
# The figures are in the tables above; this run's sizes (an ONNX export's size moves by about
# 0.1 MB from run to run, so this table is not checked; the checks above round to whole MB):

# %% tags=["nbval-ignore-output"]
summary = {**{f"MiniLM {k}": v["MB"] for k, v in minilm_rows.items()}, **{f"SmolLM2 {k}": v["MB"] for k, v in smol_rows.items()}}
display(Markdown("| file | MB |\n|---|---|\n" + "\n".join(f"| {k} | {v:.1f} |" for k, v in summary.items())))


# %% [markdown]
# ## Exercises
#
# Each exercise has a check cell right after it; the solution is in the cell between
# `BEGIN SOLUTION` and `END SOLUTION` (on the site it is on the Solutions page).
#
# **Exercise 1: greedy decoding with the KV cache (build it).** Write
# `greedy_with_cache(model, input_ids, max_new_tokens)`:
#
# * `model` is a transformers causal LM in eval mode, `input_ids` a LongTensor of shape
#   `(1, prompt_length)`;
# * it returns a 1-D LongTensor of exactly `max_new_tokens` token ids: the new tokens only, not the
#   prompt, and no stop at the end-of-sequence token;
# * each new token is the argmax of the model's logits at the last position (greedy decoding);
# * it uses the KV cache: one forward pass on the whole prompt with `use_cache=True`, then one pass
#   per new token that feeds only that token, with the cache the previous pass returned (`out.cache`,
#   passed back as `cache=`; `generation.cache_keyword(model)` and `generation.returned_cache(out)`
#   give the names for any transformers version).
#
# The check compares your tokens with `model.generate(do_sample=False)` and records every forward
# pass your function makes: after the first, each must feed one token and a cache. It may not call
# transformers' `model.generate` or `course_lib.generation.generate`. Try to write it without looking
# at `greedy_kv` above.

# %% tags=["solution"]
@torch.no_grad()
def greedy_with_cache(model, input_ids, max_new_tokens):
    # BEGIN SOLUTION
    cache_arg = generation.cache_keyword(model)
    out = model(input_ids=input_ids, use_cache=True)
    new = [out.logits[0, -1].argmax()]
    for _ in range(max_new_tokens - 1):
        step = new[-1].view(1, 1)
        out = model(input_ids=step, use_cache=True, **{cache_arg: generation.returned_cache(out)})
        new.append(out.logits[0, -1].argmax())
    return torch.stack(new)
    # END SOLUTION

# %%
from course_lib.tooling.exercises.kv_cache import check_greedy_with_cache

check_greedy_with_cache(greedy_with_cache, smol_merged, torch.tensor([prompt_ids]), max_new_tokens=6)

# %% [markdown]
# **Exercise 2: the KV cache's size by hand.** Write `cache_bytes(layers, kv_heads, head_dim, tokens,
# bytes_per_number)` and check it against `generation.kv_cache_bytes_per_token` for LLaMA-3-70B.

# %% tags=["solution"]
def cache_bytes(layers, kv_heads, head_dim, tokens, bytes_per_number):
    # BEGIN SOLUTION
    return 2 * layers * kv_heads * head_dim * tokens * bytes_per_number
    # END SOLUTION

print(cache_bytes(30, 3, 64, 1, 4))

# %%
c = budget.get_config("llama-3-70b")
assert cache_bytes(c.num_hidden_layers, c.num_key_value_heads, c.head_size, 1000, 2) == 1000 * generation.kv_cache_bytes_per_token(c, torch.bfloat16)
assert cache_bytes(30, 3, 64, 1, 4) == generation.kv_cache_bytes_per_token(smol_merged.config, torch.float32)


# %% [markdown]
# **Exercise 3: merge by hand.** Fold one LoRA layer into a plain `nn.Linear`: write `fold(layer)`
# returning an `nn.Linear` whose output equals the LoRA layer's (`W0 + scaling · B A`).

# %% tags=["solution"]
def fold(layer):
    # BEGIN SOLUTION
    plain = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.base_layer.bias is not None)
    with torch.no_grad():
        plain.weight.copy_(layer.base_layer.weight + lora.delta_weight(layer, "default"))
        if plain.bias is not None:
            plain.bias.copy_(layer.base_layer.bias)
    return plain
    # END SOLUTION

layer = lora.lora_layers(smol)["model.layers.0.self_attn.q_proj"]
print(type(fold(layer)).__name__)

# %%
x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    assert torch.allclose(fold(layer)(x), layer(x), atol=1e-5)

# %% [markdown]
# **Exercise 4 (open).** Export SmolLM2 to GGUF as Q5_0 and Q5_1 as well (`gguf_export.GGUF_TYPES`)
# and add them to the size-against-perplexity plot. The Q4_1 export reproduced most of this
# SmolLM2 exactly because it already was a Q4_1 model: to compare the 4-bit and 5-bit types fairly, measure them
# on weights that were never on a 4-bit grid too, for instance the relative error of each type on
# MiniLM's linear layers (chapter 02 did this for NF4, FP4 and INT4). Where would you stop on a
# phone with 2 GB of free memory, counting the KV cache of a 2,048-token conversation?

# %%
shutil.rmtree(OUT)   # the exported files were only needed for the measurements
