# %% [markdown]
# # 08 · Beyond one device: sharded training, negatives across processes, and the budget for N GPUs
#
# Chapter 07 ran the course's training loop in two processes: each process holds the whole model,
# trains on half of every batch, and the gradients are averaged. That is *data parallelism*, and
# it answers "my training is too slow". It does not answer "my model does not fit": every process
# still holds every weight, every gradient and the whole optimizer state. Seed 000 ends its scaling
# section with "multi-machine, multi-GPU (256 GB in total): `accelerate launch`, automatic data
# parallelism, no code changes". This chapter checks the two halves of that sentence:
#
# 1. **Sharding the model state** (ZeRO, and PyTorch's FSDP2 `fully_shard`): SmolLM2 fine-tuned,
#    with LoRA and fully, by two processes that each keep half of the parameters, gradients and
#    optimizer state; the losses and the trained weights equal one process's, and the bytes each
#    process holds are measured beside `course_lib.budget`'s per-GPU estimate.
# 2. **Contrastive negatives across processes**: when a batch of B pairs is split over N processes,
#    an in-batch-negatives loss silently gives each query B/N - 1 negatives instead of B - 1. The
#    code changes that restore the full batch (an all-gather that carries gradients), and GradCache
#    on top of it.
# 3. **The budget for N GPUs**: the ZeRO paper's figures reproduced, and how many GPUs of 24, 40 or
#    80 GB the seeds' cases need, with which strategy.
#
# Everything runs here with two CPU processes talking over gloo. The same code takes one GPU per
# process and NCCL when GPUs are present (written for it, not run on GPUs for this chapter).
#
# **Time:** about 1.5 minutes on 2 CPU cores. Per-process memory for 1, 2 and 4 processes and the
# time per step come from `benchmarks/fsdp_memory.py`, whose committed result is shown labelled.

# %%
import inspect
import json
import os
import re
import socket
import subprocess
import sys
import tempfile

import matplotlib.pyplot as plt
import torch
from accelerate.utils import DataLoaderConfiguration
from IPython.display import Markdown, display

from course_lib import budget, distributed
from course_lib.tooling import fsdp_demo
from course_lib.tooling.results import benchmark_result

SEED = 0
WORLD = 2                    # processes; with GPUs, at most torch.cuda.device_count()
STEPS, BATCH, SEQ_LEN = 2, 4, 32     # SmolLM2: AdamW steps, packed rows per global batch (a multiple of WORLD), tokens per row
PAIRS = 16                   # the contrastive batch (MiniLM), split over the processes (a multiple of WORLD)
TIMEOUT = 900                # seconds before a stuck group of processes is killed
_ = torch.manual_seed(SEED)
print(f"{WORLD} processes, backend {'nccl' if torch.cuda.is_available() else 'gloo'}")

# %% [markdown]
# ## What data parallelism copies, and what ZeRO shards
#
# With N processes on one global batch of B rows, process r computes the gradient $g_r$ of the mean
# loss over its own B/N rows, and an all-reduce replaces every gradient by
# $\bar g = \frac{1}{N}\sum_{r=1}^{N} g_r$, which is the gradient of the mean over all B rows when
# the shards are equal. Every process then takes the same optimizer step on its own full copy of the
# model. For Ψ parameters trained in mixed precision with Adam, that copy is the *model state* of
# the ZeRO paper (Rajbhandari et al., 2020): 2Ψ bytes of 16-bit weights, 2Ψ of 16-bit gradients and
# KΨ of optimizer state, with K = 12 (a float32 master copy of the weights and Adam's two moments).
# ZeRO keeps each of the three in 1/N shards instead, one stage at a time. Per GPU:
#
# | stage | what is sharded | model state per GPU |
# |---|---|---|
# | DDP | nothing | $(2 + 2 + K)\,\Psi$ |
# | ZeRO-1 | optimizer state | $2\Psi + 2\Psi + K\Psi/N$ |
# | ZeRO-2 | + gradients | $2\Psi + (2 + K)\,\Psi/N$ |
# | ZeRO-3 (FSDP full shard) | + parameters | $(2 + 2 + K)\,\Psi/N$ |
#
# The paper's Figure 1 is a 7.5B-parameter model on 64 GPUs: 120, 31.4, 16.6 and 1.9 GB.
# `course_lib.budget.estimate` takes the number of GPUs and the strategy (`gpus=`, `sharding=`;
# `master_weights=True` for the float32 copy). On a GPT-style model of 7.46B parameters
# (hidden 4096, 36 layers, GPT-2's vocabulary):

# %%
zero_model = budget.ModelConfig("zero-7.5b", "gpt", 4096, 36, 32, 32, 4 * 4096, 50257, True,
                                max_position_embeddings=2048)
psi, n, K = zero_model.parameters(), 64, 12
formula = {"none": (2 + 2 + K) * psi, "optimizer": 4 * psi + K * psi / n,
           "optimizer+gradients": 2 * psi + (2 + K) * psi / n, "full": (2 + 2 + K) * psi / n}
paper = {"none": 120, "optimizer": 31.4, "optimizer+gradients": 16.6, "full": 1.9}
print(f"Ψ = {psi / 1e9:.2f}B parameters, {n} GPUs; model state per GPU in GB (10^9 bytes):")
for strategy, expected in formula.items():
    b = budget.estimate(zero_model, "full", weight_dtype="bfloat16", master_weights=True, gpus=n, sharding=strategy)
    print(f"  {strategy:20s} estimate {b.model_states / 1e9:6.2f}   formula {expected / 1e9:6.2f}   "
          f"paper {paper[strategy]}")
    assert abs(b.model_states - expected) <= 4                             # bytes: each shard rounded up
    assert abs(b.model_states / 1e9 - paper[strategy]) <= 0.03 * paper[strategy]   # Ψ is 7.46B, not 7.5B

# %% [markdown]
# "256 GB in total", the seed's phrase, is therefore not a 256 GB card: under plain data
# parallelism (what `accelerate launch --multi_gpu` gives) each GPU must hold the whole model
# state, and the total only counts once it is sharded.
#
# <a id="claim-08-fsdp"></a>
#
# ## Sharded training with FSDP2, measured
#
# PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`) is ZeRO-3: applied to each decoder layer
# and then to the whole model, it replaces every parameter by a `DTensor` of which each process
# stores 1/N (along the first dimension). Before a layer runs, its shards are all-gathered; after
# it, they are freed again (`reshard_after_forward=True`); in backward the gradients are
# reduce-scattered, so each process receives the averaged gradient of its own shard only, and the
# optimizer, built on the sharded parameters, keeps state for that shard only. `course_lib.distributed.shard`
# is the whole of the course's part (`"grad_op"` keeps the gathered weights from forward to
# backward, ZeRO-2-like; `"ddp"` and `"optimizer"` are plain DDP and ZeRO-1):

# %%
source = inspect.getsource(distributed.shard)
display(Markdown(f"```python\n{source[source.index('    one_of('):]}```"))

# %% [markdown]
# `fsdp_demo.train_smollm2` runs in each process: it loads SmolLM2, adds LoRA (r = 8 on every
# linear layer) or trains everything, shards it when there is more than one process, and takes
# the same AdamW steps on the same global batches of packed instruction rows, each process on its
# own half. One process on the whole batches is the reference:

# %%
LR = 1e-4                          # fsdp_demo.train_smollm2's AdamW learning rate
WEIGHT_TOLERANCE = 2 * LR * STEPS  # each run moves a weight by about LR a step, either way round
assert inspect.signature(fsdp_demo.train_smollm2).parameters["lr"].default == LR
runs = {}
for method in ("lora", "full"):
    for world in (1, WORLD):
        runs[method, world] = distributed.launch(fsdp_demo.train_smollm2, world, method, "full", STEPS, BATCH,
                                                 SEQ_LEN, timeout=TIMEOUT)
for method in ("lora", "full"):
    one, many = runs[method, 1][0], runs[method, WORLD][0]
    gap = max((many["trainable"][k] - one["trainable"][k]).abs().max().item() for k in one["trainable"])
    loss_gap = max(abs(a - b) / b for a, b in zip(many["losses"], one["losses"]))
    print(f"{method}: losses {', '.join(f'{x:.2f}' for x in one['losses'])} in one process; "
          f"{WORLD} processes within 1e-5 relative: {loss_gap < 1e-5}; "
          f"trained weights within {WEIGHT_TOLERANCE:g}: {gap < WEIGHT_TOLERANCE} ({len(one['trainable'])} tensors)")
    assert loss_gap < 1e-5 and gap < WEIGHT_TOLERANCE

# %% [markdown]
# The losses agree to float32 rounding. The weights agree within 2 x 1e-4 x 2 steps = 4e-4 rather
# than bit for bit, because the processes add their halves' gradients in another order than one
# process adds the whole batch, and AdamW's first steps move each weight by about the learning rate
# (1e-4) times the *sign* of its gradient: a gradient that is zero up to rounding can take either
# sign, and the two runs then step that weight in opposite directions. How far apart they end
# depends on the CPU's summation order: within 1e-4 on an AMD EPYC, up to 1.7e-4 for full
# fine-tuning on an Intel Xeon with AVX-512 and AMX. (The unit
# tests also train on one process's half alone, which ends far outside this tolerance, so the
# comparison can fail.)
#
# What each process held after its last step, counted on its local shards
# (`distributed.state_bytes`), beside the estimate for one GPU of `WORLD` with `sharding="full"`:

# %%
MiB = 2**20
rows, ratios = [], {}
for method in ("lora", "full"):
    lora_kwargs = {"r": 8, "target_modules": "all-linear", "lora_dtype": "float32"} if method == "lora" else {}
    for world in (1, WORLD):
        held = [r["bytes"] for r in runs[method, world]]
        est = budget.estimate("smollm2-135m", method, weight_dtype="float32", device="cpu", gpus=world,
                              sharding="full" if world > 1 else "none", **lora_kwargs)
        expected = {"parameters": est.weights + est.lora_parameters, "gradients": est.gradients,
                    "optimizer": est.optimizer_state}
        for kind, estimated in expected.items():
            measured = max(h[kind] for h in held)
            rows.append(f"| {method} | {world} | {kind} | {measured / MiB:,.1f} | {estimated / MiB:,.1f} |")
            # exact, except AdamW's step counters (4 bytes per tensor, kept whole on every process)
            assert 0 <= measured - estimated <= 4 * len(runs[method, 1][0]["trainable"])
    ratios[method] = (max(sum(h.values()) for h in (r["bytes"] for r in runs[method, WORLD]))
                      / sum(runs[method, 1][0]["bytes"].values()))
display(Markdown("| method | processes | state | held by one process (MiB) | estimate per GPU (MiB) |\n"
                 "|---|---|---|---|---|\n" + "\n".join(rows)))
print("one process of two holds, of one process's bytes:", {m: round(v, 3) for m, v in ratios.items()})
assert all(abs(v - 1 / WORLD) < 0.01 for v in ratios.values())

# %% [markdown]
# Each process holds half: 0.5 of the parameters, of the gradients and of AdamW's state, for LoRA
# and for full fine-tuning alike, and the estimate agrees to the byte (AdamW's step counters
# aside). Two things the table does not show. First, while a layer computes, its weights are
# gathered whole: the estimate's `sharding_buffers` line counts the root unit (embeddings and
# final norm, most of it SmolLM2's 49,152 × 576 float32 embedding matrix, 108 MiB) and two
# decoder layers, held on top of the shards. Second, sharding costs communication: ZeRO-3 moves 1.5 times the data of
# DDP's all-reduce per step (the weights are gathered in forward and again in backward), which is
# why the planner below prefers the lighter stages when they fit.

# %%
held_peak = budget.estimate("smollm2-135m", "lora", weight_dtype="float32", device="cpu", gpus=WORLD,
                            sharding="full", r=8, target_modules="all-linear", lora_dtype="float32")
smol = budget.get_config("smollm2-135m")
embedding = smol.vocab_size * smol.hidden_size * 4
print(f"LoRA, {WORLD} processes: sharded model state {held_peak.model_states / MiB:,.0f} MiB, "
      f"gathered while computing {held_peak.sharding_buffers / MiB:,.0f} MiB, "
      f"of which the {smol.vocab_size:,} × {smol.hidden_size} embedding matrix {embedding / MiB:,.0f} MiB")
assert round(embedding / MiB) == 108 and held_peak.sharding_buffers > embedding

# %% [markdown]
# <a id="claim-08-communication"></a>
#
# Seed 003 says LoRA also cuts the communication of multi-GPU training, "because much less data
# is synchronised". Under DDP that is so: the all-reduce carries the gradients, and LoRA has
# gradients only for its adapters. Under full sharding it is much less so: the frozen base
# weights are still all-gathered before every layer, in forward and again in backward. Per step
# and process, in the ZeRO paper's accounting (a ring all-reduce moves twice the data, an
# all-gather or a reduce-scatter once; the (N-1)/N factor left out), from the bytes measured above:

# %%
one = {m: runs[m, 1][0]["bytes"] for m in ("lora", "full")}
traffic = {m: {"DDP (all-reduce of the gradients)": 2 * b["gradients"],
               "FSDP (gather weights twice, reduce-scatter gradients)": 2 * b["parameters"] + b["gradients"]}
           for m, b in one.items()}
for kind in traffic["full"]:
    print(f"{kind:55s} full {traffic['full'][kind] / MiB:7,.0f} MiB   LoRA {traffic['lora'][kind] / MiB:7,.0f} MiB   "
          f"LoRA sends {traffic['full'][kind] / traffic['lora'][kind]:4.1f}x less")
ddp_saving = traffic["full"]["DDP (all-reduce of the gradients)"] / traffic["lora"]["DDP (all-reduce of the gradients)"]
fsdp_saving = (traffic["full"]["FSDP (gather weights twice, reduce-scatter gradients)"]
               / traffic["lora"]["FSDP (gather weights twice, reduce-scatter gradients)"])
assert ddp_saving > 50 and fsdp_saving < 1.5

# %% [markdown]
# So the seed's claim holds for data parallelism, where LoRA sends 55 times less than full
# fine-tuning, and hardly for sharded training (1.5 times less), which is the setting where a
# model too large for one GPU ends up.

# %% [markdown]
# <a id="claim-08-benchmark"></a>
#
# **Benchmark (committed result, `python -m benchmarks.fsdp_memory`):** 1, 2 and 4 processes,
# three AdamW steps at batch 8 × 64 tokens, the same measurements as above:

# %%
bench = benchmark_result("fsdp_memory")
print(bench["command"], "|", bench["date"][:10])
lines = [("| method | processes | held by one process (MiB) | of one process's | seconds per step | "
          "largest weight difference from one process |"), "|---|---|---|---|---|---|"]
single = {r["method"]: r["state_bytes_max_rank"] for r in bench["training"] if r["processes"] == 1}
for r in bench["training"]:
    gap = "-" if r["max_weight_gap_vs_one_process"] is None else f"{r['max_weight_gap_vs_one_process']:.0e}"
    lines.append(f"| {r['method']} | {r['processes']} | {r['state_bytes_max_rank'] / MiB:,.0f} | "
                 f"{r['state_bytes_max_rank'] / single[r['method']]:.2f} | {r['seconds_per_step']:.1f} | {gap} |")
display(Markdown("\n".join(lines)))
shares = {(r["method"], r["processes"]): r["state_bytes_max_rank"] / single[r["method"]] for r in bench["training"]}
assert all(abs(share - 1 / n) < 0.005 for (_, n), share in shares.items())
assert all(r["max_weight_gap_vs_one_process"] < 1e-4 for r in bench["training"] if r["processes"] > 1)

# %% [markdown]
# One process of N holds 1/N of the model state, for N = 2 and 4 alike, and the trained weights
# stay within 1e-4 of one process's (2e-5 at most in this benchmark's run, on an Intel Xeon). Time
# goes the other way on a 2-core machine: one process uses both cores for the whole batch, while
# two processes each use one core for half of it and then exchange shards, layer by layer, so a
# step takes longer (for full fine-tuning 4.4 s against 2.4 s), and four processes on two cores
# longer still. Sharding buys memory and pays for it in
# communication; on N GPUs each process has its own device, and FSDP hides part of the
# communication by gathering the next layer while the current one computes.

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
for ax, method, title in zip(axes, ("full", "lora"), ("full fine-tuning", "LoRA, r = 8")):
    runs_n = [r for r in bench["training"] if r["method"] == method]
    counts = [r["processes"] for r in runs_n]
    bottom = [0.0] * len(runs_n)
    for kind, colour in (("parameters", "tab:blue"), ("gradients", "tab:orange"), ("optimizer", "tab:green")):
        values = [max(b[kind] for b in r["bytes_per_rank"]) / MiB for r in runs_n]
        ax.bar([str(c) for c in counts], values, bottom=bottom, color=colour, label=kind)
        bottom = [a + v for a, v in zip(bottom, values)]
    ax.set_title(f"SmolLM2, {title}: model state of one process")
    ax.set_xlabel("processes (FSDP2, full sharding)")
    ax.set_ylabel("MiB held by one process")
axes[0].legend()
plt.tight_layout()
plt.show()

# %%
steps = {(r["method"], r["processes"]): r["seconds_per_step"] for r in bench["training"]}
assert all(steps[m, 1] < steps[m, 2] < steps[m, 4] for m in ("full", "lora"))
assert (round(steps["full", 2], 1), round(steps["full", 1], 1)) == (4.4, 2.4)
assert max(r["max_weight_gap_vs_one_process"] for r in bench["training"] if r["processes"] > 1) < 2e-5
assert bench["machine"]["cpu_model"].startswith("Intel(R) Xeon(R)")   # the CPU the benchmark ran on

# %% [markdown]
# <a id="claim-08-negatives"></a>
#
# ## Contrastive negatives across processes
#
# Chapters 01, 03 and 04 train MiniLM with in-batch negatives: for a batch of B pairs, query $q_i$
# must pick its document $d_i$ out of all B documents (scale s = 20, cosine similarity):
#
# $$\mathcal{L} = -\frac{1}{B}\sum_{i=1}^{B}\log\frac{\exp(s\cos(q_i, d_i))}{\sum_{j=1}^{B}\exp(s\cos(q_i, d_j))}$$
#
# Split the batch over N processes and run the same code in each ("no code changes"), and each
# process computes this loss on its own B/N pairs: every query now competes with B/N - 1 negatives
# instead of B - 1. It is a different, easier loss, and DDP averages its gradient without a word.
# The fix is to give every process all B documents: each gathers the others' document embeddings,
# scores its b = B/N queries against all of them (query i of process r has its positive at
# $rb + i$), and the gather must carry gradients back, because process r's loss also depends on the
# documents of every other process. `course_lib.distributed.gather_with_grad`:

# %%
display(Markdown(f"```python\n{inspect.getsource(distributed._GatherWithGrad)}```"))

# %% [markdown]
# In backward, every process has the gradient of its own loss with respect to *all* B embeddings;
# summing these over the processes and keeping one's own slice gives each process the gradient of
# the sum of all losses with respect to its embeddings. DDP then averages the parameter gradients
# over N: the result is the gradient of the mean of the N losses, which is the full batch's
# $\mathcal{L}$. `fsdp_demo.minilm_gradient` computes MiniLM's gradient on the first 16 training
# pairs of the code-search task three ways over two processes (dropout off, so every run sees
# the same network) and compares each with one process on all 16:

# %%
one_process = distributed.launch(fsdp_demo.minilm_gradient, 1, "gathered", PAIRS, timeout=TIMEOUT)[0]
negatives = {}
for mode in fsdp_demo.MINILM_MODES:
    r = distributed.launch(fsdp_demo.minilm_gradient, WORLD, mode, PAIRS, timeout=TIMEOUT)[0]
    gap = ((r["gradient"] - one_process["gradient"]).norm() / one_process["gradient"].norm()).item()
    negatives[mode] = {"negatives": r["negatives_per_query"], "loss": r["loss"], "gap": gap}
    print(f"{mode:19s} negatives per query {r['negatives_per_query']:2d}   loss {r['loss']:.2f} "
          f"(one process: {one_process['loss']:.2f})   gradient equal to one process's within 1e-5: {gap < 1e-5}")
assert negatives["per_process"]["negatives"] == PAIRS // WORLD - 1 and negatives["per_process"]["gap"] > 1e-2
assert negatives["gathered"]["gap"] < 1e-5 and negatives["gathered_gradcache"]["gap"] < 1e-5

# %% [markdown]
# With each process's own negatives the loss is lower (fewer candidates to beat) and the gradient
# is another one altogether (relative difference 0.27 here); gathered, it is the full batch's to
# float32 rounding. The third line is GradCache (chapter 03) inside each process: every process
# embeds its pairs a few at a time without keeping activations, the gathered loss gives the
# gradient with respect to every embedding, and each process back-propagates its chunks. N
# processes × GradCache chunks = one large batch, exact, and only embeddings travel between
# processes, never activations. sentence-transformers offers the same gather:
# `MultipleNegativesRankingLoss(model, gather_across_devices=True)`; the unit tests check that its
# loss and gradients equal `distributed.contrastive_loss_across_processes`.

# %% [markdown]
# <a id="claim-08-plan"></a>
#
# ## How many GPUs, with which strategy
#
# `course_lib.budget.plan_gpus` (the command `course-lib plan MODEL MEMORY`) finds the smallest
# number of GPUs on which one GPU's estimated peak fits (10% headroom), and at that number the
# cheapest strategy: DDP, ZeRO-1, ZeRO-2, then full sharding. Each cell of the table is the
# number of GPUs, then the sharding strategy when one is needed. Full fine-tuning is mixed precision
# with float32 master weights (16 bytes per parameter before activations); each GPU trains one
# 512-token sequence with gradient checkpointing. The seeds' cases:

# %%
plans = {}
table = ["| model | card | full fine-tuning | LoRA | QLoRA |", "|---|---|---|---|---|"]
for model in ("llama-3-8b", "llama-3-70b"):
    for card in ("24GB", "40GB", "80GB"):
        cells = []
        for method in ("full", "lora", "qlora"):
            p = plans[model, card, method] = budget.plan_gpus(model, card, method)
            cells.append("does not fit" if not p.fits else str(p.gpus) if p.sharding == "none"
                         else f"{p.gpus}, {p.sharding}")
        table.append(f"| {model} | {card} | " + " | ".join(cells) + " |")
display(Markdown("\n".join(table)))
print(plans["llama-3-8b", "80GB", "full"].line())
print(plans["llama-3-70b", "24GB", "qlora"].line())
assert (plans["llama-3-8b", "24GB", "qlora"].gpus, plans["llama-3-8b", "80GB", "full"].gpus) == (1, 2)
assert plans["llama-3-8b", "80GB", "full"].sharding == "optimizer+gradients"
assert (plans["llama-3-70b", "24GB", "qlora"].gpus, plans["llama-3-70b", "80GB", "qlora"].gpus) == (3, 1)
assert plans["llama-3-70b", "80GB", "full"].gpus == 19

# %% [markdown]
# Full fine-tuning of LLaMA-3-8B needs 16 bytes × 8.0B = 128 GB of model state: two 80 GB cards
# with ZeRO-2, eight 24 GB cards fully sharded. LLaMA-3-70B needs 19 cards of 80 GB for full
# fine-tuning, against one for QLoRA: the method, not the cluster, is what makes a 70B model
# cheap. QLoRA of a 70B model does not fit one 24 GB card (chapter 05) but fits three fully
# sharded, which is where the next section comes in.
#
# <a id="claim-08-qlora"></a>
#
# ## QLoRA across GPUs
#
# FSDP shards *parameters*. A 4-bit model keeps its packed weights in `uint8` tensors, and FSDP
# flattens the parameters of a unit into one buffer of one dtype, so the 4-bit weights can only be
# sharded with the rest when bitsandbytes stores them in the same dtype as the other parameters:
# `BitsAndBytesConfig(..., bnb_4bit_quant_storage=torch.bfloat16)` (the packed bytes viewed as
# bfloat16), the setting transformers and peft document for FSDP-QLoRA. The estimator takes it
# as `quant_storage`; with full sharding it divides the 4-bit weights by N as well:

# %%
for gpus in (1, 2, 3):
    b = budget.estimate("llama-3-70b", "qlora", gpus=gpus, sharding="full" if gpus > 1 else "none",
                        quant_storage="bfloat16", seq_len=512)
    print(f"LLaMA-3-70B QLoRA on {gpus} GPU(s): 4-bit weights {b.weights / 2**30:5.1f} GiB per GPU, "
          f"peak {b.peak / 2**30:5.1f} GiB")

# %% [markdown]
# On this CPU, FSDP2 shards bitsandbytes' `Params4bit` weights when they are created with their
# module (so that the quantization state survives the gather) and trains with the same losses as
# one process (`tests/test_distributed.py`), while the course's own `Linear4bit` keeps its packed
# weights as buffers, which FSDP does not shard. A learner with GPUs runs the production path:
# transformers' `from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True,
# bnb_4bit_quant_storage=torch.bfloat16))`, peft's LoRA, and
# `accelerate launch --use_fsdp --fsdp_version 2 --num_processes N train.py`.
#
# <a id="claim-08-accelerate"></a>
#
# ## "No code changes": what accelerate does and does not do
#
# The seed's command does not exist (`--multi_machine_launch`; chapter 07 gives the real flags).
# What `Accelerator.prepare` changes is worth knowing before trusting "no code changes":
#
# * the model is wrapped (DDP, or FSDP with `--use_fsdp`), the optimizer wrapped, and each
#   `DataLoader` replaced by one that gives every process *its own* batches of the configured size:
#   with `split_batches=False`, the default, a batch size of 64 on 8 GPUs is a global batch of 512,
#   and the learning rate that suited 64 may not suit 512;
# * the loss is not changed: an in-batch-negatives loss loses negatives, as measured above;
# * the launch configuration decides what happens, and it can silently decide nothing. On a
#   machine without GPUs, `accelerate launch --use_fsdp --num_processes 2` starts two processes
#   that each believe they are alone:

# %%
with socket.socket() as sock:   # a free port for the rendezvous
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
env.pop("ACCELERATE_USE_CPU", None)
with tempfile.TemporaryDirectory() as launcher_tmp:   # TMPDIR: the launcher keeps its log folders there
    probe = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port), "--use_fsdp",
         "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
         "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer", "-m", "course_lib.tooling.fsdp_demo"],
        capture_output=True, text=True, env={**env, "TMPDIR": launcher_tmp}, timeout=300, check=False)
seen = [json.loads(found) for found in re.findall(r"\{[^{}]*\}", probe.stdout)]   # one flat object per process
for s in seen:
    print(s)
print("DataLoaderConfiguration().split_batches =", DataLoaderConfiguration().split_batches)
assert probe.returncode == 0 and len(seen) == 2
assert all(s["num_processes"] == 1 and not s["sharded"] for s in seen)   # two lone processes, nothing sharded
assert DataLoaderConfiguration().split_batches is False

# %% [markdown]
# Both processes report index 0 of 1: accelerate's FSDP path needs GPUs, and without them it
# falls back to no distribution at all, so two processes would train the same data twice,
# unaware of each other. On GPUs the same command shards; on CPUs the processes must be started
# on the DDP path (`--multi_gpu` with `ACCELERATE_USE_CPU=1`, chapter 07) or, as in this chapter,
# with `torch.distributed` directly. Check what the processes see (`accelerator.num_processes`,
# `accelerator.distributed_type`) before trusting a launch.
#
# ## What we measured

# %%
display(Markdown(f'''
| quantity | measured here |
|---|---|
| ZeRO paper, 7.5B on 64 GPUs: model state per GPU (DDP, ZeRO-1, -2, -3) | 120 / 31.4 / 16.6 / 1.9 GB, estimate within 3% |
| FSDP2, {WORLD} processes, SmolLM2 LoRA and full: losses vs one process | equal within 1e-5 relative |
| the same: trained weights vs one process | within {WEIGHT_TOLERANCE:g} (AdamW, lr 1e-4, {STEPS} steps) |
| bytes one process holds, {WORLD} processes vs 1 | LoRA {ratios["lora"]:.3f}, full {ratios["full"]:.3f}; estimate exact |
| in-batch negatives per query, {PAIRS} pairs over {WORLD} processes | {negatives["per_process"]["negatives"]} without gathering, {negatives["gathered"]["negatives"]} gathered |
| gradient vs one process: per-process negatives / gathered / gathered + GradCache | {negatives["per_process"]["gap"]:.2f} / below 1e-5 / below 1e-5 |
| GPUs for LLaMA-3-8B full fine-tuning on 80 GB / 24 GB cards | {plans["llama-3-8b", "80GB", "full"].gpus} / {plans["llama-3-8b", "24GB", "full"].gpus} |
| GPUs for LLaMA-3-70B QLoRA on 24 GB cards, fully sharded | {plans["llama-3-70b", "24GB", "qlora"].gpus} |
'''))
if (WORLD, PAIRS) == (2, 16):                  # the figure the prose quotes, for the default run
    assert round(negatives["per_process"]["gap"], 2) == 0.27

# %% [markdown]
# ## Exercises
#
# Each exercise has a check cell right after it. The solution is in the cell between the lines
# `BEGIN SOLUTION` and `END SOLUTION` (on the site it is on the Solutions page).
#
# **Exercise 1: ZeRO by hand.** Write `model_state_bytes(psi, gpus, stage, k=12)`: the bytes of
# model state one GPU holds for Ψ parameters trained with mixed-precision Adam at ZeRO stage 0
# (DDP), 1, 2 or 3, without `course_lib`. The check compares it with the ZeRO paper's printed
# figures.

# %% tags=["solution"]
def model_state_bytes(psi, gpus, stage, k=12):
    # BEGIN SOLUTION
    weights, gradients, optimizer = 2 * psi, 2 * psi, k * psi
    if stage >= 1:
        optimizer /= gpus
    if stage >= 2:
        gradients /= gpus
    if stage >= 3:
        weights /= gpus
    return weights + gradients + optimizer
    # END SOLUTION


print([round(model_state_bytes(7.5e9, 64, stage) / 1e9, 1) for stage in range(4)])

# %%
assert [round(model_state_bytes(7.5e9, 64, stage) / 1e9, 1) for stage in range(4)] == [120, 31.4, 16.6, 1.9]
assert model_state_bytes(1e9, 1, 3) == model_state_bytes(1e9, 1, 0) == 16e9

# %% [markdown]
# **Exercise 2: the labels of the gathered loss.** Process `rank` of `world` holds `b` queries and
# scores them against all `world · b` gathered documents. Write `gathered_labels(rank, world, b)`:
# the index of each local query's positive document among the gathered ones.

# %% tags=["solution"]
def gathered_labels(rank, world, b):
    # BEGIN SOLUTION
    return list(range(rank * b, (rank + 1) * b))
    # END SOLUTION


print(gathered_labels(1, 2, 4))

# %%
assert gathered_labels(0, 2, 3) == [0, 1, 2] and gathered_labels(1, 2, 3) == [3, 4, 5]
assert gathered_labels(3, 4, 2) == [6, 7]

# %% [markdown]
# **Exercise 3 (open).** With `PAIRS = 16` and 2 processes, each query saw 7 negatives without
# the gather. Run chapter 03's batch-size comparison in your head: which do you expect to find
# better code-search models, 2 processes × 8 pairs without gathering, or one process × 16 pairs,
# and why? Then run `python -m benchmarks.fsdp_memory --processes 1 2 4` and explain the seconds
# per step of 4 processes on a 2-core machine.
