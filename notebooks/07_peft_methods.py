# %% [markdown]
# # 07 · The other parameter-efficient methods, and training beyond one process
#
# LoRA is one answer to "train a large model with few parameters". The seed tutorials this course
# grew from survey the others: **prompt tuning** (learn a few input embeddings put before every
# prompt), **prefix tuning** (learn keys and values that every attention layer sees first),
# **bottleneck adapters** (small down-project / nonlinearity / up-project modules inserted after
# sublayers), and peft adds **IA³** (learn a scale for some activations) and **DoRA** (LoRA on a
# weight's direction, plus a learned magnitude). This chapter runs all of them, and full
# fine-tuning, on the same task (SmolLM2 on the course's instruction task: name the Python
# function from its summary) with the same steps, and measures what each costs and gives. Then it runs the course's training loop in
# two processes with `accelerate` and shows that nothing in the code changes.
#
# peft provides prompt tuning, prefix tuning, IA³, LoRA and DoRA; it has no bottleneck-adapter
# config (the seed's `peft.AdapterConfig` does not exist), so `course_lib.adapters` builds it.
# `course_lib.peft_methods.make_method` puts all seven behind one call.
#
# **Time:** about 2 minutes on 2 CPU cores for a short comparison (3 steps each); the comparison at
# 24 steps comes from `benchmarks/peft_methods.py`, whose committed result is shown labelled.

# %%
import copy
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from IPython.display import Markdown, display
from safetensors.torch import load_file

from course_lib import adapters, data, instruct, models, peft_methods, stats, train
from course_lib.tooling import ddp_demo
from course_lib.tooling.results import benchmark_result
from course_lib.tooling.source import show

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)   # peft imports bitsandbytes, which notes a missing optional CPU kernel
import peft

# Two deprecation notices from inside the libraries, harmless here: peft's get_peft_model asks
# transformers `is_gradient_checkpointing` (renamed in transformers 5), and peft's prefix tuning
# passes its prefix to the model as `past_key_values` (renamed `cache`). The course's code uses
# neither name, and the old name still works: the prefix reaches every attention layer and trains.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
warnings.filterwarnings("ignore", message="`past_key_values` is deprecated", category=FutureWarning)

SEED = 0
LIVE_STEPS, LIVE_BATCH = 3, 4     # the live comparison: every method, same batches
N_TEST = 12                       # test instructions scored live (the benchmark scores 64)
_ = torch.manual_seed(SEED)
base, tok = models.load_smollm2("cpu")
train_rows, test_rows = data.load_instruct("train"), data.load_instruct("test")[:N_TEST]
print("methods:", ", ".join(peft_methods.METHODS))

# %% [markdown]
# ## The course's own adapter layer, and its parameter count
#
# A bottleneck adapter maps a sublayer's output $z \in \mathbb{R}^h$ to
# $z + W_{up}\,\sigma(W_{down} z + b_{down}) + b_{up}$ with $W_{down} \in \mathbb{R}^{m \times h}$,
# $W_{up} \in \mathbb{R}^{h \times m}$: $2hm + m + h$ parameters. Houlsby et al. put one after the
# attention and one after the MLP of every block (2 per block), Pfeiffer et al. only after the MLP.
# Here is all of the forward pass, as `course_lib.adapters` runs it (`down` holds $W_{down}, b_{down}$,
# `up` holds $W_{up}, b_{up}$, `act` is $\sigma$, ReLU by default):

# %%
show(adapters.BottleneckAdapter.forward, adapters.AdaptedLinear.forward)

# %% [markdown]
# **What just happened.** `AdaptedLinear` replaces a frozen linear layer (an attention block's
# `o_proj`, an MLP's `down_proj`) and feeds that layer's output $z$ to the adapter, which adds a
# small correction computed through an $m$-unit bottleneck. The `z +` is the residual: since
# $W_{up}$ and $b_{up}$ start at zero, the correction starts at zero and the adapted model starts as
# the base model, which the next cell checks along with the parameter count:

# %%
adapted = peft_methods.make_method(copy.deepcopy(base), "bottleneck_adapter", bottleneck_size=16, placement="houlsby")
trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
formula = adapters.adapter_parameter_count(base.config, 16, "houlsby")
h, m, L = base.config.hidden_size, 16, base.config.num_hidden_layers
print(f"2 adapters x {L} layers x (2·{h}·{m} + {m} + {h}) = {formula:,}; trainable parameters counted: {trainable:,}")
ids = tok("def fibonacci(n):", return_tensors="pt")["input_ids"]
with torch.no_grad():
    same = torch.allclose(adapted(ids).logits, base(ids).logits, atol=1e-5)
print("a fresh adapter leaves the output unchanged:", same)
assert trainable == formula == 2 * L * (2 * h * m + m + h) and same
del adapted

# %% [markdown]
# ## What the other methods compute
#
# The other methods come from peft. Each fits in a few lines; below, two of them are written out
# and checked against the layers peft builds for SmolLM2 (`make_method`, the same call the
# comparison trains), with their learned vectors moved away from their starting values so that
# the check means something.
#
# **IA³** (Liu et al. 2022) learns one vector per adapted layer and multiplies an activation by it,
# element by element. On the keys and values it scales the projection's output, and in the MLP it
# scales the input of the down projection (peft's `feedforward_modules`):
#
# $$k = l_k \odot (W_k x), \qquad v = l_v \odot (W_v x), \qquad
#   \text{mlp}(x) = W_{down}\,\big(l_{ff} \odot (\operatorname{silu}(W_{gate} x) \odot W_{up} x)\big).$$
#
# The vectors start at 1 (the base model); with 2 vectors of 192 (the key/value width) and one of
# 1,536 (the MLP width) in each of 30 layers, that is 57,600 trainable numbers.

# %%
ia3_model = peft_methods.make_method(copy.deepcopy(base), "ia3")
block = ia3_model.get_base_model().model.layers[0]          # the first transformer block, as peft adapted it
attn, mlp = block.self_attn, block.mlp
g = torch.Generator().manual_seed(SEED)
with torch.no_grad():
    for p in (attn.k_proj.ia3_l["default"], attn.v_proj.ia3_l["default"], mlp.down_proj.ia3_l["default"]):
        p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))    # as if trained a little
    l_k, l_v, l_ff = (layer.ia3_l["default"].flatten() for layer in (attn.k_proj, attn.v_proj, mlp.down_proj))
    x = block.input_layernorm(base.model.embed_tokens(ids))     # the block's real input for "def fibonacci(n):"
    keys = l_k * (x @ attn.k_proj.base_layer.weight.T)          # scale the output
    values = l_v * (x @ attn.v_proj.base_layer.weight.T)
    inner = torch.nn.functional.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)
    mlp_out = (l_ff * inner) @ mlp.down_proj.base_layer.weight.T   # scale the input of the down projection
    ia3_agrees = [torch.allclose(mine, peft_out, atol=1e-5)
                  for mine, peft_out in ((keys, attn.k_proj(x)), (values, attn.v_proj(x)), (mlp_out, mlp(x)))]
print("keys, values, MLP output as peft computes them:", ia3_agrees)
print("IA3 vectors per block:", tuple(l.numel() for l in (l_k, l_v, l_ff)), "| trainable in the model:",
      f"{sum(p.numel() for p in ia3_model.parameters() if p.requires_grad):,}")
assert all(ia3_agrees) and sum(p.numel() for p in ia3_model.parameters() if p.requires_grad) == 30 * (192 + 192 + 1536)
del ia3_model

# %% [markdown]
# **What just happened.** peft wrapped `k_proj`, `v_proj` and `down_proj` of every block; each
# wrapper holds one vector and multiplies by it, after the layer for keys and values, before it for
# the down projection. Nothing else changes: no new matrix, no nonlinearity, and the scaling can be
# folded into the weights after training (scale the rows of $W_k$, $W_v$ and the columns of
# $W_{down}$). Exercise 1 asks you to write such a layer yourself.
#
# **DoRA** (Liu et al. 2024) splits a weight into a direction and a magnitude. The direction is the
# frozen weight plus a LoRA update, normalised; the magnitude $m$ is a learned vector with one
# entry per output feature, initialised to the norms of the base weight so the model starts as
# the base model:
#
# $$W' = m \odot \frac{W_0 + s\,BA}{\lVert W_0 + s\,BA \rVert_c}, \qquad s = \frac{\texttt{lora\_alpha}}{r}.$$
#
# $\lVert\cdot\rVert_c$ is the paper's column-wise norm: the paper writes a weight as (inputs ×
# outputs), so a column is everything that feeds one output. PyTorch stores `weight` as (outputs ×
# inputs), so in code it is the norm of each row, `norm(dim=1)`, as peft computes it.

# %%
dora_model = peft_methods.make_method(copy.deepcopy(base), "dora")
q = dora_model.get_base_model().model.layers[0].self_attn.q_proj
with torch.no_grad():
    B, A = q.lora_B["default"].weight, q.lora_A["default"].weight
    magnitude = q.lora_magnitude_vector["default"].weight
    B.copy_(0.05 * torch.randn(B.shape, generator=g))                 # B starts at zero: move it, as training would
    magnitude.mul_(1 + 0.1 * torch.randn(magnitude.shape, generator=g))
    W = q.base_layer.weight + q.scaling["default"] * B @ A            # W0 + s·BA: (576 outputs, 576 inputs)
    W_dora = magnitude[:, None] * W / W.norm(dim=1, keepdim=True)     # each output's row rescaled to length m
    dora_gap = (x @ W_dora.T - q(x)).abs().max().item()
print(f"DoRA's q_proj written out equals peft's (largest difference below 1e-4): {dora_gap < 1e-4}")
print("each row of W' has length m:", torch.allclose(W_dora.norm(dim=1), magnitude))
assert dora_gap < 1e-4 and torch.allclose(W_dora.norm(dim=1), magnitude)
del dora_model

# %% [markdown]
# **What just happened.** The row norms of $W'$ are exactly $m$: the LoRA matrices $B$, $A$ only
# turn each row, the magnitude vector alone sets its length. Against LoRA it adds one number per
# output feature (576 for `q_proj`, 192 for `v_proj`, hence DoRA's extra 23,040 parameters in the
# table below), and a norm to compute at every step, which costs time and memory in training; after
# training $W'$ is one matrix again.
#
# **Prompt tuning** and **prefix tuning** change no weight. Prompt tuning learns $n$ input
# embeddings $P \in \mathbb{R}^{n \times h}$ and puts them before the embedded prompt $E$: the
# model reads $[P; E]$. Prefix tuning learns, for every layer, $n$ keys $P_k$ and $n$ values $P_v$
# and puts them before the ones computed from the input, so each attention layer computes
#
# $$\operatorname{softmax}\!\Big(\frac{Q\,[P_k; K]^\top}{\sqrt{d}}\Big)\,[P_v; V]$$
#
# ($[\,\cdot\,;\,\cdot\,]$ stacks along the sequence). Their trainable counts follow:
# $n \cdot h$ for prompt tuning, $n \cdot$ layers $\cdot\, 2 \cdot$ KV heads $\cdot$ head size for
# prefix tuning (exercise 2).

# %% [markdown]
# <a id="claim-07-live"></a>
#
# ## Seven methods, same task, same steps
#
# Each method trains a copy of SmolLM2 from the same weights on the same batches
# (`peft_methods.run_method`, which uses the course's training loop), with AdamW at a learning rate
# suited to it (`peft_methods.LEARNING_RATES`: a prompt far from the data needs large steps, full
# fine-tuning small ones). Prompt and prefix tuning start from the embedding of a real instruction
# (`peft_methods.INIT_TEXT`) rather than random vectors, which makes them train far better. For each:
# trainable parameters, AdamW state, the memory of one training step (chapter 03's accounting:
# weights, gradients, optimizer state, saved activations), seconds per step, and the test scores
# against the untrained base model, item by item on the same test instructions: the answer
# perplexity (`instruct.answer_nll` gives each answer's summed negative log-likelihood and token
# count; `stats.paired_bootstrap` resamples the instructions and recomputes the perplexity of all
# answers together, for the base model and the method alike) and the exact match of greedy answers
# (McNemar's exact test on the instructions where exactly one of the two is right).

# %% tags=["nbval-ignore-output"]
instructions, answers = [r["instruction"] for r in test_rows], [r["answer"] for r in test_rows]
base_nll = instruct.answer_nll(base, tok, instructions, answers)          # per answer: [nll, tokens]
base_right = instruct.exact_matches(instruct.generate_answers(base, tok, instructions), answers)
live, live_nll = {}, {}
for method in peft_methods.METHODS:
    r = peft_methods.run_method(base, tok, method, train_rows, test_rows, steps=LIVE_STEPS,
                                batch_size=LIVE_BATCH, warmup_steps=1, progress=False)
    live_nll[method] = r["answer_nll"]      # the same scoring as base_nll, per answer: [nll, tokens]
    live[method] = r
for method, r in live.items():
    print(f"{method:<20} {r['seconds_per_step']:5.2f} s/step")

# %%
vs_base = {m: stats.paired_bootstrap(base_nll, live_nll[m], stats.corpus_perplexity) for m in live}   # method minus base
em_vs_base = {m: stats.mcnemar(base_right, live[m]["correct"]) for m in live}   # right/wrong, per instruction
header = ("| method | trainable parameters | % of the model | AdamW state (MiB) | step memory (MiB) | loss first → last "
          "| answer perplexity | minus the base model's [95% CI] | verdict | exact match | right only: base / method, McNemar p |")
rows = [header,
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| base model (untrained) | 0 | 0 | | | | {vs_base['lora'].a:.4g} | | | {sum(base_right)}/{N_TEST} | |"]
for method, r in live.items():
    d, m = vs_base[method], em_vs_base[method]
    rows.append(f"| {method} | {r['trainable']:,} | {100 * r['trainable'] / base.num_parameters():.3f} | "
                f"{r['optimizer_state_bytes'] / 2**20:.2f} | {r['step_memory']['total'] / 2**20:.0f} | "
                f"{r['loss_first']:.2f} → {r['loss_last']:.2f} | {d.b:.3g} | {stats.format_difference(d.difference, d.low, d.high, label='')} | "
                f"{d.verdict(higher_is_better=False)} | {m.both + m.b_only}/{N_TEST} | {m.a_only} / {m.b_only}, p = {m.p_value:.3g} |")
display(Markdown(f"Live: {LIVE_STEPS} steps of {LIVE_BATCH} rows, {N_TEST} test instructions; differences paired over the same "
                 "instructions (10,000 bootstrap resamples, seed 0)\n\n" + "\n".join(rows)))
lora_ppl = vs_base["lora"]
# each interval to two significant digits of its half-width (stats.format_difference): a bootstrap
# percentile's fourth digit moves with the CPU's float32 rounding of the answer scores
print(f"LoRA, answer perplexity {lora_ppl.a:.4g} -> {lora_ppl.b:.3g}: "
      f"{stats.format_difference(lora_ppl.difference, lora_ppl.low, lora_ppl.high)} "
      f"({lora_ppl.verdict(higher_is_better=False)})")
print("answer perplexity lower than the base model's beyond noise:",
      ", ".join(m for m in live if vs_base[m].verdict(higher_is_better=False) == "gain") or "none")
print("exact match different from the base model's at p < 0.05:", ", ".join(m for m in live if em_vs_base[m].p_value < 0.05) or "none")

# %%
r = live
assert all(r[m]["trainable"] < 0.01 * base.num_parameters() for m in peft_methods.METHODS if m != "full")
assert r["full"]["trainable"] == base.num_parameters()
assert r["prompt_tuning"]["trainable"] == 16 * base.config.hidden_size     # 16 virtual tokens x hidden size
assert r["prefix_tuning"]["trainable"] == 16 * base.config.num_hidden_layers * 2 * base.config.num_key_value_heads * base.config.head_dim
assert r["lora"]["trainable"] == base.config.num_hidden_layers * 8 * (2 * 576 + 576 + 192)   # r(d_in+d_out) for q and v
assert r["dora"]["trainable"] == r["lora"]["trainable"] + base.config.num_hidden_layers * (576 + 192)  # + one magnitude per output
assert all(r[m]["optimizer_state_bytes"] == 8 * r[m]["trainable"] for m in r)                       # AdamW: two float32 moments
assert r["full"]["step_memory"]["total"] > 1.5 * max(r[m]["step_memory"]["total"] for m in r if m != "full")
assert all(r[m]["loss_last"] < r[m]["loss_first"] for m in r)
# the paired scores are the chapter's scoring, answer by answer: they give back each method's perplexity
assert all(abs(vs_base[m].b - r[m]["perplexity"]) < 1e-6 * r[m]["perplexity"] for m in r)
assert lora_ppl.verdict(higher_is_better=False) == "gain" and lora_ppl.high < 0                    # the interval excludes zero

# %% [markdown]
# **What the live run shows.** Three steps are enough to move the answer perplexity far below the
# base model's, and beyond noise: the cell prints LoRA's paired interval, which lies entirely below
# zero, and lists every method whose interval does. Exact match is another matter: on 12
# instructions after 3 steps, one or two answers changing is what the McNemar p-values weigh, and
# no method's exact match differs from the base model's at p < 0.05 unless the line above says so.
# Which method is *best* is not a question three steps can answer; the benchmark below runs 24.

# %% [markdown]
# <a id="claim-07-benchmark"></a>
#
# ## The comparison at 24 steps (benchmark)
#
# Three steps only show that everything runs. `benchmarks/peft_methods.py` trains every method for
# 24 steps of 8 rows on the same batches and scores 64 test instructions. It keeps every model's
# answer-by-answer scores, the untrained base model's too, so each method is compared with the base
# model and with LoRA on the same instructions. Its committed result (command and date below):
# what each method costs, its test scores with their paired differences, and the plot of each
# metric against the number of parameters trained.

# %%
bench = benchmark_result("peft_methods")
print(f"benchmark: {bench['command']}  ({bench['date'][:10]}, {bench['seconds'] // 60:.0f} min on {bench['threads']} CPU threads)")
rows = ["| method | trainable | AdamW state (MiB) | step memory (MiB) | s/step | loss first → last |", "|---|---|---|---|---|---|"]
for b in bench["runs"]:
    rows.append(f"| {b['method']} | {b['trainable']:,} | {b['optimizer_state_bytes'] / 2**20:.2f} | {b['step_memory']['total'] / 2**20:.0f} | "
                f"{b['seconds_per_step']:.2f} | {b['loss_first']:.2f} → {b['loss_last']:.2f} |")
display(Markdown("What each method costs\n\n" + "\n".join(rows)))
# every comparison the benchmark recorded, B minus A on the same test instructions
paired = {(c["a"], c["b"]): c for c in bench["comparisons"]}
n_bench = bench["n_test"]
base_items = bench["items"]["base"]


def interval(m, fmt):
    """+x [low, high] and the verdict: the interval's for perplexity, McNemar's (p < 0.05) for exact match."""
    verdict = m["verdict"] if "mcnemar_p" not in m else (
        "within noise" if m["mcnemar_p"] >= 0.05 else ("gain" if m["difference"] > 0 else "loss"))
    return f"{m['difference']:{fmt}} [{m['low']:{fmt}}, {m['high']:{fmt}}] {verdict}"


header = ("| method | exact match | minus the base model's [95% CI], verdict by McNemar | McNemar p | answer perplexity "
          "| minus the base model's [95% CI] | minus LoRA's [95% CI] |")
rows = [header, "|---|---|---|---|---|---|---|",
        (f"| base model (untrained) | {sum(base_items['correct'])}/{n_bench} | | | "
         f"{paired['base', 'lora']['perplexity']['a']:.1f} | | |")]
for b in bench["runs"]:
    vs_base = paired["base", b["method"]]
    vs_lora = paired.get(("lora", b["method"]))
    rows.append(f"| {b['method']} | {sum(bench['items'][b['method']]['correct'])}/{n_bench} | "
                f"{interval(vs_base['exact_match'], '+.3f')} | {vs_base['exact_match']['mcnemar_p']:.3g} | "
                f"{b['perplexity']:.2f} | {interval(vs_base['perplexity'], '+.1f')} | "
                f"{interval(vs_lora['perplexity'], '+.2f') if vs_lora else ''} |")
display(Markdown(f"Test scores on {n_bench} instructions, paired over the same instructions (10,000 bootstrap resamples, seed 0)"
                 "\n\n" + "\n".join(rows)))
fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
# LoRA and DoRA land almost on the same point: label one above-left, the other below-right
offsets = {"lora": ((-6, 6), "right"), "dora": ((6, -12), "left")}
panels = ((axes[0], "exact_match", f"exact match (fraction of {bench['n_test']} test instructions)", "Exact match: higher is better"),
          (axes[1], "perplexity", "answer perplexity (log scale)", "Answer perplexity: lower is better"))
for ax, key, label, title in panels:
    for b in bench["runs"]:
        offset, align = offsets.get(b["method"], ((6, 4), "left"))
        ax.scatter(b["trainable"], b[key], s=50)
        ax.annotate(b["method"], (b["trainable"], b[key]), textcoords="offset points",
                    xytext=offset, ha=align, fontsize=8)
    ax.set_xscale("log")
    ax.set_xlim(3e3, 1e9)
    ax.set_xlabel("trainable parameters (count, log scale)")
    ax.set_ylabel(label)
    ax.set_title(title, fontsize=10)
axes[1].set_yscale("log")
axes[1].set_yticks([10, 12, 15, 20, 25], labels=["10", "12", "15", "20", "25"])
axes[1].yaxis.set_minor_formatter(plt.NullFormatter())
fig.suptitle(f"Seven methods on SmolLM2 after {bench['steps']} steps of {bench['batch']} rows: "
             "test scores against the number of parameters each trains")
plt.tight_layout()
plt.show()

# %%
by = {b["method"]: b for b in bench["runs"]}
best_peft = min((m for m in by if m != "full"), key=lambda m: by[m]["perplexity"])
print("lowest perplexity among the parameter-efficient methods:", best_peft)
print(f"memory of a step, LoRA / full: {by['lora']['step_memory']['total'] / by['full']['step_memory']['total']:.2f}")
print(f"answer perplexity, prompt tuning / LoRA: {by['prompt_tuning']['perplexity'] / by['lora']['perplexity']:.2f}")
# every step's seconds are recorded and every method trained on the same batch at each step: step i
# of DoRA pairs with step i of LoRA (the warm-up step left out), as the benchmark's FIGURE line does
dora_steps = stats.median_time_ratio(by["dora"]["step_seconds"][1:], by["lora"]["step_seconds"][1:])
print(f"a DoRA step over a LoRA step, step by step: {dora_steps['ratio']:.3f} [95% CI {dora_steps['low']:.3f}, "
      f"{dora_steps['high']:.3f}] over {dora_steps['rounds']} steps ({dora_steps['verdict']}); the ratio of the medians "
      f"{by['dora']['seconds_per_step'] / by['lora']['seconds_per_step']:.3f}")
peft_memory = [by[m]["step_memory"]["total"] / 2**20 for m in by if m != "full"]
print(f"step memory (MiB): parameter-efficient methods {min(peft_memory):,.0f}-{max(peft_memory):,.0f}, "
      f"full fine-tuning {by['full']['step_memory']['total'] / 2**20:,.0f}")
# each method against LoRA, paired over the same instructions
verdicts = {m: paired["lora", m]["perplexity"]["verdict"] for m in by if m != "lora"}
print("answer perplexity against LoRA's:", ", ".join(f"{m} {v}" for m, v in verdicts.items()))
print("exact match against LoRA's, McNemar p:", ", ".join(f"{m} {paired['lora', m]['exact_match']['mcnemar_p']:.2g}"
                                                      for m in by if m != "lora"))
print("answer perplexity below the base model's beyond noise:",
      ", ".join(m for m in by if paired["base", m]["perplexity"]["verdict"] == "gain"))
print("exact match above the base model's at McNemar p < 0.05:",
      ", ".join(m for m in by if paired["base", m]["exact_match"]["mcnemar_p"] < 0.05) or "none")
# the figures quoted below, from the committed benchmark result
ppl_vs_lora = {m: tuple(round(paired["lora", m]["perplexity"][k], 2) for k in ("difference", "low", "high")) for m in by if m != "lora"}
em_p = {(a, m): round(paired[a, m]["exact_match"]["mcnemar_p"], 3) for a in ("base", "lora") for m in by if m != a}
right = {m: sum(bench["items"][m]["correct"]) for m in bench["items"]}
assert best_peft == "bottleneck_adapter" and (round(by["bottleneck_adapter"]["exact_match"], 3), round(by["bottleneck_adapter"]["perplexity"], 1)) == (0.156, 11.0)
assert round(by["lora"]["exact_match"], 3) == round(by["dora"]["exact_match"], 3) == 0.125 and round(by["lora"]["perplexity"], 1) == round(by["dora"]["perplexity"], 1) == 14.9
assert (round(by["ia3"]["exact_match"], 3), round(by["ia3"]["perplexity"], 1), by["ia3"]["trainable"]) == (0.109, 14.4, 57_600)
assert (round(by["prompt_tuning"]["exact_match"], 3), round(by["prefix_tuning"]["exact_match"], 3)) == (0.016, 0.031)
assert (round(by["full"]["exact_match"], 3), round(by["full"]["perplexity"], 1), round(by["full"]["loss_last"], 2)) == (0.109, 13.2, 1.46)
assert round(by["lora"]["step_memory"]["total"] / by["full"]["step_memory"]["total"], 2) == 0.39
assert round(by["prompt_tuning"]["perplexity"] / by["lora"]["perplexity"], 2) == 1.75
assert (round(min(peft_memory)), round(max(peft_memory)), round(by["full"]["step_memory"]["total"] / 2**20)) == (1090, 1779, 2797)
packed = ("bottleneck_adapter", "ia3", "lora", "dora")   # on the packed batch; prompt and prefix tuning on the padded one
assert [round(f(by[m]["step_memory"]["total"] for m in packed) / 2**20) for f in (min, max)] == [1090, 1172]
assert [round(by[m]["step_memory"]["total"] / 2**20) for m in ("prefix_tuning", "prompt_tuning")] == [1652, 1779]
assert [round(f(by[m]["seconds_per_step"] for m in packed), 1) for f in (min, max)] == [1.4, 1.7]
assert (right["base"], right["bottleneck_adapter"], right["lora"], right["full"], right["ia3"]) == (2, 10, 8, 7, 7)
assert all(paired["base", m]["perplexity"]["verdict"] == "gain" for m in by)                  # every method learned
assert round(paired["base", "lora"]["perplexity"]["a"]) == 697 and sorted(by, key=lambda m: by[m]["perplexity"])[:2] == ["bottleneck_adapter", "full"]
assert round(by["dora"]["step_memory"]["total"] / by["lora"]["step_memory"]["total"] - 1, 2) == 0.08
assert [round(dora_steps[k], 2) for k in ("ratio", "low", "high")] == [1.07, 1.06, 1.09] and dora_steps["rounds"] == 23
assert round(by["dora"]["seconds_per_step"] / by["lora"]["seconds_per_step"], 2) == 1.10
assert ppl_vs_lora["prompt_tuning"] == (11.12, 6.25, 19.27) and ppl_vs_lora["prefix_tuning"] == (5.14, 2.91, 8.8)
assert ppl_vs_lora["bottleneck_adapter"] == (-3.9, -6.75, -2.21) and ppl_vs_lora["full"] == (-1.68, -3.63, -0.29)
assert ppl_vs_lora["ia3"] == (-0.51, -1.61, 0.52) and ppl_vs_lora["dora"] == (-0.03, -0.11, 0.03)
assert em_p["base", "bottleneck_adapter"] == 0.021 and em_p["base", "lora"] == em_p["base", "dora"] == 0.07
assert em_p["base", "full"] == em_p["base", "ia3"] == 0.125 and em_p["lora", "prompt_tuning"] == 0.016
assert min(em_p["lora", m] for m in by if m not in ("lora", "prompt_tuning")) == 0.07
assert [round(by[m]["seconds_per_step"], 2) for m in ("prefix_tuning", "lora", "prompt_tuning", "dora", "full")] == [2.15, 1.50, 2.34, 1.65, 2.57]

# %% [markdown]
# **What the table says, and a recommendation.** At this budget: 24 steps of 8 rows, one task, one
# seed, 64 test instructions, so one answer is 1.6 points of exact match. Every difference is paired
# over the same instructions; a perplexity difference counts when its 95% interval excludes zero,
# an exact-match difference when McNemar's exact test gives p < 0.05 (with so few answers that
# differ, the bootstrap interval of an exact-match difference is only approximate).
#
# * **Every method learned.** Each one's answer perplexity fell from the base model's 697 to
#   between 11 and 26, every interval far below zero. Exact match is another matter: the base
#   model answered 2 of 64 right, and only the **bottleneck adapter**'s 10 is beyond noise
#   (McNemar p = 0.021). LoRA's and DoRA's 8 (p = 0.07) and IA³'s and full fine-tuning's 7
#   (p = 0.125) are not, at 64 instructions.
# * **Against LoRA** (0.46 M parameters, answer perplexity 14.89): the **bottleneck adapter**
#   (1.1 M, 0.8% of the model) reached a lower answer perplexity, 11.0, −3.90 [−6.75, −2.22], a
#   gain, and **full fine-tuning** (134.5 M) 13.2, −1.68 [−3.63, −0.29], a gain. **IA³**, with
#   58 K parameters (8 times fewer), is within noise of LoRA (−0.51 [−1.61, +0.52]), and so is
#   **DoRA** (−0.03 [−0.11, +0.03]), whose magnitude vector cost 8% more step memory (1,172
#   against 1,090 MiB) and 7% more time per step (step by step on the same batches, 1.07 [95% CI
#   1.06, 1.09]; the run before this one, on the same machine, had 2% between the two medians:
#   compare timings within one run only). **Prompt and prefix tuning** did worse: +11.12
#   [+6.25, +19.27] and +5.14 [+2.91, +8.80], losses, and exact match 1 and 2 of 64. A few virtual
#   tokens steer a 135M model poorly, as the seed itself warns for small models. The one
#   exact-match difference against LoRA beyond noise is prompt tuning's 1 of 64 against 8
#   (McNemar p = 0.016; every other p ≥ 0.07), and it rests on one answer: in the run before, on
#   another CPU, prompt tuning answered 2 right and the same test gave p = 0.07.
# * **Full fine-tuning** reached the lowest training loss (1.46) but only the second-best test
#   perplexity, after the bottleneck adapter's: 24 steps at a learning rate safe for all weights are few.
# * **Memory and time per step** depend here on how the batch goes in as much as on the method.
#   LoRA, DoRA, IA³, the bottleneck adapter and full fine-tuning train on the packed batch
#   (chapter 01: the prompt start every instruction shares once, then each row's own tokens
#   without padding, about half the padded batch's positions). Prompt and prefix tuning put their
#   virtual tokens in front of the prompt, which the packed batch does not provide for, so they
#   train on the whole padded batch. On the packed batch the parameter-efficient methods needed
#   1,090-1,172 MiB and 1.4-1.7 s for a step, full fine-tuning 2,797 MiB (LoRA / full = 0.39) and
#   2.6 s; prompt and prefix tuning, on the padded batch, 1,652-1,779 MiB and 2.1-2.3 s. So in this
#   run their time and memory do not compare with the other methods'. Every parameter-efficient
#   method's optimizer state is negligible (under 9 MiB against 1,026); what remains is the frozen
#   weights and the activations, which the method hardly changes on a model this small. Compare
#   timings within one run only.
#
# So, for a budget like this one: **LoRA** as the default (well supported, mergeable into the
# weights for deployment, chapter 06), a **bottleneck adapter** when a little more capacity per
# step pays off and an extra module at inference is acceptable, **IA³** when the adapter must be
# tiny (many tasks per base model), and prompt or prefix tuning only for large models. Full
# fine-tuning only when the memory is there and the run is long. Prompt tuning's answer
# perplexity is 1.75 times LoRA's.

# %% [markdown]
# <a id="claim-07-lora-placement"></a>
#
# ### Where LoRA goes: attention only, or every linear layer?
#
# One seed advises against putting LoRA on the feed-forward (MLP) layers, saying they store
# knowledge; the QLoRA paper puts it on every linear layer, as chapter 02 does. A fair test holds
# the number of trainable parameters fixed, since LoRA adds r(d_in + d_out) per adapted matrix: on
# SmolLM2 that is r × 3,840 per block for q, k, v and o (576 → 576, 576 → 192 twice, 576 → 576)
# and r × 10,176 for all seven linear layers (gate and up 576 → 1,536, down 1,536 → 576 added). So
# r = 53 on attention and r = 20 everywhere both train 30 × 3,840 × 53 = 30 × 10,176 × 20 =
# 6,105,600 parameters. The benchmark trains both (α = 2r, AdamW at 1e-3, the same 24 steps of 8
# rows as above) and scores the same 64 instructions:

# %%
placed = {p["method"]: p for p in bench["placement"]}
where = paired["lora_attention", "lora_all_linear"]
rows = ["| LoRA on | r | α | trainable | step memory (MiB) | s/step | exact match | answer perplexity |", "|---|---|---|---|---|---|---|---|"]
for name, p in placed.items():
    rows.append(f"| {', '.join(m.removesuffix('_proj') for m in p['target_modules'])} | {p['r']} | {p['lora_alpha']} | {p['trainable']:,} | "
                f"{p['step_memory']['total'] / 2**20:.0f} | {p['seconds_per_step']:.2f} | "
                f"{sum(bench['items'][name]['correct'])}/{n_bench} | {p['perplexity']:.2f} |")
display(Markdown("\n".join(rows)))
print(f"every linear layer minus attention only, answer perplexity: {interval(where['perplexity'], '+.2f')}")
print(f"every linear layer minus attention only, exact match: {interval(where['exact_match'], '+.3f')}, "
      f"McNemar p = {where['exact_match']['mcnemar_p']:.2g}")
assert placed["lora_attention"]["trainable"] == placed["lora_all_linear"]["trainable"] == 30 * 3840 * 53 == 30 * 10176 * 20
assert tuple(round(where["perplexity"][k], 2) for k in ("difference", "low", "high")) == (0.9, 0.28, 1.78)
assert where["perplexity"]["verdict"] == "loss" and where["exact_match"]["mcnemar_p"] == 1.0
assert (round(placed["lora_attention"]["perplexity"], 2), round(placed["lora_all_linear"]["perplexity"], 2)) == (11.17, 12.06)
assert (right["lora_attention"], right["lora_all_linear"]) == (10, 9)
assert [round(placed[m]["step_memory"]["total"] / 2**20) for m in ("lora_attention", "lora_all_linear")] == [1186, 1294]

# %% [markdown]
# At this budget, the same 6.1 M parameters did better on attention alone: answer perplexity 11.17
# against 12.06 spread over every linear layer, +0.90 [+0.28, +1.78] for the spread, a loss; exact
# match 10 against 9 of 64 is within noise (McNemar p = 1). The seed's advice holds here in its
# direction, for one small model, one task, 24 steps and one seed; its reason (that the MLP layers
# "store knowledge") is not what was tested. The QLoRA paper's finding is of another kind: at a
# *fixed rank*, adapting every linear layer (and so training more parameters) was needed to match
# full fine-tuning on large models. Spreading LoRA also costs activation memory: 1,294 MiB per step
# against 1,186, since every adapted matrix keeps its input for the backward pass.

# %% [markdown]
# <a id="claim-07-accelerate"></a>
#
# ## Beyond one process: the same loop with accelerate
#
# `course_lib.train.train` runs on `accelerate.Accelerator`. Launched once, it is the plain loop of
# every chapter (nothing wrapped, bit-identical numbers). Launched by `accelerate launch` with N
# processes, every process reads the same seeded stream of global batches, trains on its own share
# of each, and PyTorch's DistributedDataParallel averages the gradients in backward, so every
# process takes the same optimizer step, the one a single process would take on the whole batch.
# `course_lib.tooling.ddp_demo` trains a tiny Llama both ways (AdamW with clipping, and plain SGD) and saves
# the weights; on this CPU the two processes talk over gloo:

# %% tags=["nbval-ignore-output"]
out = Path(tempfile.mkdtemp(prefix="course07-"))
with socket.socket() as sock:   # a free port for the two processes' rendezvous
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
# TMPDIR: the launcher (torch.distributed.run underneath) keeps its log folders there, removed with `out`
env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "true", "TMPDIR": str(out)}
launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
          "-m", "course_lib.tooling.ddp_demo", "--out", str(out / "two")]
two = subprocess.run(launch, capture_output=True, text=True, env=env, timeout=300, check=False)
one = subprocess.run([sys.executable, "-m", "course_lib.tooling.ddp_demo", "--out", str(out / "one")], capture_output=True,
                     text=True, env=env, timeout=300, check=False)   # the same global batches in one process
if two.returncode or one.returncode:
    raise RuntimeError(f"a training run failed:\n{two.stderr[-2000:]}\n{one.stderr[-2000:]}")


def summed_gradients_run(optimizer):
    """The mistake the comparison must catch: two processes *summing* their halves' gradients instead
    of averaging them apply twice the averaged gradient. In one process that is the same run with
    the loss doubled (ddp_demo.run's settings: 4 steps, global micro-batches of 8, 2 per step)."""
    lr, clip = ddp_demo.OPTIMIZERS[optimizer]
    model = models.tiny_llama(SEED)
    opt = torch.optim.SGD(model.parameters(), lr=lr) if optimizer == "sgd" else None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)    # the same matmul kernels as the launched processes
    try:
        train.train(model, lambda m, rows: 2 * ddp_demo.lm_loss(m, rows),
                    train.batches(ddp_demo.token_rows(seed=SEED), 8, seed=SEED), steps=4, lr=lr, warmup_steps=1,
                    grad_accum=2, max_grad_norm=clip, optimizer=opt, seed=SEED, progress=False, desc="summed")
    finally:
        torch.set_num_threads(threads)
    return ddp_demo.state_dict_for_saving(model)


ddp_gap, summed_gap, replicas_equal, tolerances = {}, {}, {}, {"sgd": 1e-6, "adamw": 1e-4}
for opt, tolerance in tolerances.items():
    rank0, rank1 = (load_file(out / "two" / f"{opt}-rank{i}.safetensors") for i in (0, 1))
    single = load_file(out / "one" / f"{opt}-rank0.safetensors")
    summed = summed_gradients_run(opt)
    replicas_equal[opt] = all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    ddp_gap[opt] = max((rank0[k] - single[k]).abs().max().item() for k in rank0)
    summed_gap[opt] = max((summed[k] - single[k]).abs().max().item() for k in single)
    print(f"{opt}: the two processes end with identical weights: {replicas_equal[opt]}; largest difference from one "
          f"process on the same global batches {ddp_gap[opt]:.0e} (tolerance {tolerance:g}); "
          f"with gradients summed instead of averaged {summed_gap[opt]:.0e}")
shutil.rmtree(out)   # the saved weights were only needed for these comparisons

# %%
# the run above (its figures vary in their last digits from CPU to CPU), and the orders of magnitude quoted below
assert two.returncode == 0 and one.returncode == 0
assert all(replicas_equal.values()) and all(ddp_gap[o] < tolerances[o] < summed_gap[o] for o in tolerances)
assert ddp_gap["sgd"] < 1e-7 and ddp_gap["adamw"] < 1e-4
assert summed_gap["sgd"] > 1e-2 and summed_gap["adamw"] > 1e-3

# %% [markdown]
# <a id="claim-07-api"></a>
#
# The tolerance is rounding: two processes sum their halves' gradients in another order than one
# process sums the whole batch. With SGD the weights then differ by under 1e-7 (the cell above
# prints the measured difference); AdamW's first step moves each weight by roughly the learning
# rate times the *sign* of its gradient, so a gradient near zero can flip and the difference shows
# larger, still under the tolerance of 1e-4. A real mistake, summing the two processes' gradients
# instead of averaging them, moves the weights far more: above 1e-2 with SGD and above 1e-3 with
# AdamW (the printed "summed" figures), well beyond both tolerances, so the comparison (and the
# course's test of it, `tests/test_ddp.py`) would catch it.
#
# On real hardware the command is the same and the course's code does not change:
#
# ```bash
# # one machine, 8 GPUs
# accelerate launch --multi_gpu --num_processes 8 -m your_training_script
# # two machines with 8 GPUs each: run on both, with machine_rank 0 and 1
# accelerate launch --multi_gpu --num_machines 2 --num_processes 16 --machine_rank 0 \
#     --main_process_ip 10.0.0.1 --main_process_port 29500 -m your_training_script
# ```
#
# The seed writes `accelerate launch --multi_machine_launch`: no such flag exists (chapter 05's
# errata checks the installed `accelerate`); `--num_machines`, `--machine_rank` and
# `--main_process_ip` are the real ones. And `accelerate launch --cpu --num_processes 2` starts one
# process, not two: several CPU processes take the `--multi_gpu` path (gloo), as above.
#
# ## The seed's fictional API, corrected

# %%
print("peft.AdapterConfig exists:", hasattr(peft, "AdapterConfig"))
print("what peft has for these methods:", [n for n in ("PromptTuningConfig", "PrefixTuningConfig", "IA3Config", "LoraConfig") if hasattr(peft, n)],
      "| DoRA: LoraConfig(use_dora=True) | bottleneck adapters: course_lib.adapters.inject_adapters")
assert not hasattr(peft, "AdapterConfig")


# %% [markdown]
# ## Exercises
#
# Each exercise has a check cell right after it; the solution is in the cell between
# `BEGIN SOLUTION` and `END SOLUTION` (on the site it is on the Solutions page).
#
# **Exercise 1: build an IA³ layer.** Write `ia3_linear(x, W, b, l, feedforward)`, the forward pass
# of a linear layer adapted by IA³, for a batch:
#
# * `x`: the input, shape `(..., in_features)` (any leading dimensions, as `nn.Linear` accepts);
#   `W`: the frozen weight, `(out_features, in_features)`; `b`: the bias, `(out_features,)`, or
#   `None` for a layer without one; `l`: the learned IA³ vector.
# * `feedforward=False` (keys and values): scale the layer's output, bias included,
#   $l \odot (Wx + b)$, with `l` of shape `(out_features,)`.
# * `feedforward=True` (the MLP's down projection): scale the input, $W(l \odot x) + b$, with `l` of
#   shape `(in_features,)`.
# * Return a new tensor of shape `(..., out_features)`; do not change the inputs in place.
#
# Use tensor operations only: peft's IA³ layer (`peft.tuners.ia3.layer.Linear`, its `forward` and
# `merge`), `peft.get_peft_model` and `peft_methods.make_method` are unavailable inside the check.
# It compares your function with the algebra, with a 2×2 case worked by hand
# ($W = \begin{pmatrix}1&2\\3&4\end{pmatrix}$, $b = (1, -1)$, $x = (1, 1)$, $l = (2, 0.5)$ gives
# $(8, 3)$ when the output is scaled and $(4, 7)$ when the input is), and with peft's IA³ layer on
# the same weights.

# %% tags=["solution"]
def ia3_linear(x, W, b, l, feedforward):
    # BEGIN SOLUTION
    if feedforward:
        out = (l * x) @ W.T                 # scale each input feature, then the frozen layer
        return out if b is None else out + b
    out = x @ W.T if b is None else x @ W.T + b
    return l * out                          # the frozen layer, then scale each output feature
    # END SOLUTION


# %%
from course_lib.tooling.exercises.ia3 import check_ia3_linear

check_ia3_linear(ia3_linear)

# %% [markdown]
# **Exercise 2: count before you train.** Write `prefix_parameters(config, num_virtual_tokens)`:
# the trainable parameters of prefix tuning without a reparameterization (a key and a value vector
# per virtual token, KV head and layer), and check it against peft on SmolLM2.

# %% tags=["solution"]
def prefix_parameters(config, num_virtual_tokens):
    # BEGIN SOLUTION
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return num_virtual_tokens * config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim
    # END SOLUTION

print(prefix_parameters(base.config, 16))

# %%
prefixed = peft_methods.make_method(copy.deepcopy(base), "prefix_tuning", num_virtual_tokens=10)
assert prefix_parameters(base.config, 10) == sum(p.numel() for p in prefixed.parameters() if p.requires_grad)

# %% [markdown]
# **Exercise 3: a Pfeiffer adapter.** Put bottleneck adapters of size 32 only after the MLP of each
# block (`placement="pfeiffer"`) and check that the trainable count equals the formula for one
# adapter per block.

# %% tags=["solution"]
# BEGIN SOLUTION
pfeiffer = peft_methods.make_method(copy.deepcopy(base), "bottleneck_adapter", bottleneck_size=32, placement="pfeiffer")
# END SOLUTION
print(type(pfeiffer).__name__)

# %%
h, L = base.config.hidden_size, base.config.num_hidden_layers
assert sum(p.numel() for p in pfeiffer.parameters() if p.requires_grad) == L * (2 * h * 32 + 32 + h)

# %% [markdown]
# **Exercise 4 (open).** Run `python -m benchmarks.peft_methods --steps 48` from the repository
# root (or on a GPU, more): does the ranking of the methods change with a longer run? Which method would you pick for a 7B model on a
# 16 GB card, and why (chapter 05's `course-lib budget` helps)?
