# %% [markdown]
# # 01 · LoRA from the ground up
#
# LoRA (low-rank adaptation) fine-tunes a large model by leaving its weights frozen and learning a
# small correction beside each chosen linear layer. This chapter
#
# 1. builds LoRA from scratch (`course_lib.lora`, plain PyTorch) and checks the seeds' worked example,
# 2. counts what it trains, on our two models and on LLaMA-3-8B's published shapes,
# 3. fine-tunes MiniLM (code search) and SmolLM2 (function names) with LoRA, against chapter 00's
#    baselines and against full fine-tuning on the same budget,
# 4. compares ranks, merged vs runtime inference, several adapters and their blends,
# 5. runs the same experiment through peft and shows the two agree.
#
# **Time:** about 2.5 minutes on 2 CPU cores. Longer runs (the rank sweep, full fine-tuning of
# SmolLM2) come from `benchmarks/lora_training.py`, whose committed results are shown labelled.

# %%
import copy
import logging
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from IPython.display import Markdown, display
from torch import nn

from course_lib import data, instruct, lora, lora_combine, lora_io, memory, models, retrieval, stats, train
from course_lib.tooling.exercises.lora import check_lora
from course_lib.tooling.results import benchmark_result
from course_lib.tooling.source import show

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)   # peft imports bitsandbytes, which notes a missing optional CPU kernel
warnings.filterwarnings("ignore", category=FutureWarning)
from peft import PeftModel

SEED = 0
DEVICE = models.default_device()
MINILM_STEPS = 10    # contrastive steps for MiniLM (LoRA and full fine-tuning alike)
MINILM_BATCH = 16    # pairs per step: 15 in-batch negatives per query
SMOLLM_STEPS = 6     # instruction-tuning steps for SmolLM2
SMOLLM_BATCH = 8
EVAL_PAIRS = 200     # test queries (and their documents) scored; chapter 00 used all 506
N_INSTRUCT = 128     # test instructions scored by answer perplexity (the test split has 506)
N_GENERATED = 6      # of them, answered by generation (exact match)
TIMING_ROUNDS = 5    # interleaved rounds of the merged vs runtime latency measurement
ADAPTER_STEPS = 4    # steps for each of the two adapters in the multi-adapter section
# LoRA draws A from torch's random generator (peft too), and torch seeds it at random in every
# process: without this line each run would start from other adapters and land elsewhere
_ = torch.manual_seed(SEED)

# %% [markdown]
# <a id="claim-01-worked-example"></a>
#
# ## The idea, and the seeds' worked example
#
# A linear layer computes $y = W_0 x$ with $W_0 \in \mathbb{R}^{d \times k}$. Full fine-tuning
# learns a new $W$. LoRA keeps $W_0$ frozen and learns a low-rank update
# $\Delta W = B A$ with $B \in \mathbb{R}^{d \times r}$, $A \in \mathbb{R}^{r \times k}$ and rank
# $r \ll \min(d, k)$:
#
# $$ y = W_0 x + \tfrac{\alpha}{r}\, B A x .$$
#
# It trains $r(d + k)$ numbers instead of $d k$. The factor $\alpha / r$ (`lora_alpha / r`, peft's
# names) is meant to keep the update's size comparable when you change $r$; rank-stabilised LoRA
# argues that $\alpha/\sqrt{r}$ does that job better (the reason is below). One seed tutorial works a 2×2 example by hand:
# $W_0 = \begin{pmatrix}1&2\\3&4\end{pmatrix}$, $A = (0.1\;\;0.2)$,
# $B = \begin{pmatrix}0.5\\0.6\end{pmatrix}$, $x = (1, 2)$: then $W_0 x = (5, 11)$, $Ax = 0.5$,
# $BAx = (0.25, 0.3)$ and the output is $(5.25, 11.3)$. Our `LoRALinear` with $r = \alpha = 1$:

# %%
layer = lora.LoRALinear(nn.Linear(2, 2, bias=False), r=1, lora_alpha=1)
with torch.no_grad():
    layer.base_layer.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    layer.lora_A["default"].weight.copy_(torch.tensor([[0.1, 0.2]]))
    layer.lora_B["default"].weight.copy_(torch.tensor([[0.5], [0.6]]))
y = layer(torch.tensor([1.0, 2.0]))
print("W0·x + B·A·x =", [round(v, 4) for v in y.tolist()])
assert torch.allclose(y, torch.tensor([5.25, 11.3]))

# %% [markdown]
# ## The code that ran
#
# Here is `LoRALinear`'s forward pass, its update $\Delta W$, and merge and unmerge, as they are
# in `course_lib/lora.py`:

# %%
show(lora.LoRALinear.forward, lora.LoRALinear.delta_weight, lora.LoRALinear.merge, lora.LoRALinear.unmerge)

# %% [markdown]
# **What just happened.** `forward` first runs the frozen layer, `base_layer(x)` $= W_0x + b$.
# Then, for each active adapter that is not merged, it adds `lora_B(lora_A(x)) * scaling`:
# `lora_A` is an `nn.Linear(k, r)` whose weight is $A$ ($r \times k$) and `lora_B` an
# `nn.Linear(r, d)` whose weight is $B$ ($d \times r$), so this is $s\,B(Ax)$ with the scaling $s$.
# It multiplies by $A$ first and never forms $BA$: that costs $r(d + k)$ multiply-adds per input
# instead of $dk$. (Dropout, when set, acts on the adapter's input only; the base layer sees `x`
# unchanged.) The scaling is fixed when the adapter is added:
#
# $$ s = \frac{\alpha}{r} \quad\text{(LoRA)}, \qquad s = \frac{\alpha}{\sqrt{r}} \quad\text{(rank-stabilised LoRA)}. $$
#
# Why $\sqrt{r}$? $BAx = \sum_{j=1}^{r} b_j (a_j \cdot x)$ is a sum of $r$ rank-one terms. With $A$
# initialised randomly (as usual) and then trained, those terms point in largely unrelated
# directions, so, like a sum of $r$ independent random vectors, the update's norm grows like
# $\sqrt{r}$, not like $r$. Dividing by $r$ therefore *shrinks* the update (and the gradients that
# reach $A$ and $B$) like $1/\sqrt{r}$ as the rank grows: a large rank learns more slowly and its
# extra capacity goes unused. Dividing by $\sqrt{r}$ (`use_rslora=True`) cancels the growth and
# keeps the update's size stable across ranks; this is the argument of the rsLoRA paper
# (Kalajdzievski, 2023). The two agree at $r = 1$, and the table below shows how fast they part:
# at $r = 64$, $\alpha/r$ is $\sqrt{64} = 8$ times smaller than $\alpha/\sqrt{r}$. `merge` folds the update into the base weight, and `unmerge`
# takes it out again:
#
# $$ W = W_0 + s\,BA \quad\text{(merge)}, \qquad W_0 = W - s\,BA \quad\text{(unmerge)}. $$
#
# Before it writes anything, `merge` refuses an adapter already merged (its update would be added
# twice), a 4-bit base, and an update holding NaN or infinity. Below: both scalings for
# $\alpha = 16$, then merge and unmerge on the 2×2 example.

# %%
with torch.random.fork_rng(devices=[]):   # new layers draw random weights; keep the runs below on their seed
    for r in (1, 4, 16, 64):
        plain = lora.LoRALinear(nn.Linear(64, 64), r=r, lora_alpha=16).scaling["default"]
        rs = lora.LoRALinear(nn.Linear(64, 64), r=r, lora_alpha=16, use_rslora=True).scaling["default"]
        print(f"r = {r:2d}:  alpha/r = {plain:6.3f}   alpha/sqrt(r) = {rs:6.3f}")
        assert plain == 16 / r and rs == 16 / r**0.5
assert rs / plain == 8   # at r = 64: alpha/r is sqrt(64) = 8 times smaller than alpha/sqrt(r)

layer.merge()
print("merged weight W0 + B·A =", [[round(v, 4) for v in row] for row in layer.base_layer.weight.tolist()])
# B·A = [[0.05, 0.1], [0.06, 0.12]], added to W0:
assert torch.allclose(layer.base_layer.weight, torch.tensor([[1.05, 2.10], [3.06, 4.12]]))
assert torch.allclose(layer(torch.tensor([1.0, 2.0])), y)          # the same output, now from one matrix
layer.unmerge()
assert torch.allclose(layer.base_layer.weight, torch.tensor([[1.0, 2.0], [3.0, 4.0]]))

# %% [markdown]
# <a id="claim-01-zero-init"></a>
#
# **Why B starts at zero.** A is initialised randomly (Kaiming-uniform, as peft does) and B at
# zero, so $BA = 0$: the wrapped model starts *exactly* equal to the pretrained one, and training
# moves away from it. (If both were random, the first forward pass would already be a damaged
# model.) Injecting LoRA into MiniLM's `query` and `value` layers changes no output:

# %%
minilm, minilm_tok = models.load_minilm(DEVICE)
smollm, smollm_tok = models.load_smollm2(DEVICE)
probe = ["Return the sum of two numbers.", "def add(a, b):\n    return a + b"]
before = retrieval.embed(minilm, minilm_tok, probe)
wrapped = lora.inject_lora(copy.deepcopy(minilm), target_modules=["query", "value"], r=8, lora_alpha=16)
after = retrieval.embed(wrapped, minilm_tok, probe)
print(f"largest change in an embedding after injection: {(after - before).abs().max().item()}")
assert torch.equal(before, after)


# %% [markdown]
# <a id="claim-01-llama8b-params"></a>
#
# ## What LoRA trains
#
# `lora.count_parameters` counts trainable and total parameters after injection. The count must
# equal $\sum r(d_\text{in} + d_\text{out})$ over the wrapped layers, which we can also compute for
# a model we cannot load here, from its published configuration. For LLaMA-3-8B
# (hidden size 4096, 32 layers, 32 query heads but only 8 key/value heads of size 128, so `v_proj`
# maps 4096 → 1024):

# %%
def lora_count(shapes_per_layer, layers, r):
    # shapes_per_layer: (d_in, d_out) of each wrapped linear layer in one block
    return layers * sum(r * (d_in + d_out) for d_in, d_out in shapes_per_layer)

def qv_shapes(hidden, heads, kv_heads, head_dim):
    return [(hidden, heads * head_dim), (hidden, kv_heads * head_dim)]

counts = {}
for name, model, targets in [("all-MiniLM-L6-v2", minilm, ["query", "value"]),
                             ("SmolLM2-135M-Instruct", smollm, ["q_proj", "v_proj"])]:
    trainable, total = lora.count_parameters(
        lora.inject_lora(copy.deepcopy(model), target_modules=targets, r=8, lora_alpha=16))
    counts[name] = (trainable, total)
    print(f"{name:22s} r=8 on {'+'.join(targets):13s} {trainable:>9,d} trainable of {total:>12,d} ({trainable / total:.3%})")

c = minilm.config
assert counts["all-MiniLM-L6-v2"][0] == lora_count(
    qv_shapes(c.hidden_size, c.num_attention_heads, c.num_attention_heads, c.hidden_size // c.num_attention_heads),
    c.num_hidden_layers, 8)
c = smollm.config
assert counts["SmolLM2-135M-Instruct"][0] == lora_count(
    qv_shapes(c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim), c.num_hidden_layers, 8)

llama3_8b = lora_count(qv_shapes(4096, 32, 8, 128), 32, 8)
llama2_7b = lora_count(qv_shapes(4096, 32, 32, 128), 32, 8)   # LLaMA-1/2-7B: no grouped-query attention
print(f"LLaMA-3-8B  r=8 on q,v: {llama3_8b:,d} trainable parameters")
print(f"LLaMA-2-7B  r=8 on q,v: {llama2_7b:,d} trainable parameters")
for r in (8, 16):
    print(f"LLaMA-3-8B  r={r} on q,k,v,o: {lora_count(qv_shapes(4096, 32, 8, 128) * 2, 32, r):,d}")

# %% [markdown]
# One seed's table says LoRA on "LLaMA-8B" trains **about 4M parameters**. With r = 8 on q and v,
# LLaMA-3-8B has 3,407,872 trainable parameters (3.4M), because grouped-query attention makes
# `v_proj` four times narrower than `q_proj`. The round "4M" is what r = 8 on q and v gives for
# an older 7B model without grouped-query attention (LLaMA-1/2-7B: 4,194,304). So the claim is
# right in magnitude, and 17% too high for the model it names.

# %%
assert llama3_8b == 3_407_872 and llama2_7b == 4_194_304   # r·(d_in + d_out) summed, by hand above
assert abs(llama2_7b - 4e6) < abs(llama3_8b - 4e6)

# %% [markdown]
# ## The training loop and gradient accumulation
#
# The fine-tuning runs below go through `train.train`: AdamW, a short linear warm-up then cosine
# decay, gradient clipping. When a batch does not fit in memory it can also accumulate gradients:
# with `grad_accum = M` it runs $M$ micro-batches before each optimizer step, and calls backward
# on each micro-batch's mean loss *divided by M*. The gradients add up in `.grad`, and for $M$
# micro-batches of equal size the sum is exactly the gradient of the whole batch's mean loss:
#
# $$ \nabla \frac{1}{N}\sum_{i=1}^{N} \ell_i \;=\; \sum_{m=1}^{M} \frac{1}{M}\, \nabla \bar\ell_m,
#    \qquad \bar\ell_m = \frac{M}{N} \sum_{i \in \text{micro-batch } m} \ell_i . $$
#
# Without the division the step would be $M$ times too large. A check on a small LoRA layer:
# the gradient of 8 examples at once, then the same 8 as 4 micro-batches of 2 by hand, then one
# step of `train.train(..., grad_accum=4)` with plain SGD at learning rate 1, whose update must be
# minus that gradient.

# %%
with torch.random.fork_rng():   # this check draws random numbers; keep the runs below on their seed
    torch.manual_seed(SEED)
    small = lora.LoRALinear(nn.Linear(5, 3), r=2, lora_alpha=4)
    nn.init.normal_(small.lora_B["default"].weight)       # B = 0 would give A no gradient
    xs, ys = torch.randn(8, 5), torch.randn(8, 3)
params = [small.lora_A["default"].weight, small.lora_B["default"].weight]
mse = lambda model, batch: ((model(batch[0]) - batch[1]) ** 2).mean()

full_grad = torch.autograd.grad(mse(small, (xs, ys)), params)      # the whole batch's mean loss
for start in range(0, 8, 2):                                       # M = 4 micro-batches of 2
    (mse(small, (xs[start:start + 2], ys[start:start + 2])) / 4).backward()
accumulated = [p.grad for p in params]
print("4 micro-batches, each loss / 4, equal the full-batch gradient:",
      all(torch.allclose(a, g, atol=1e-6) for a, g in zip(accumulated, full_grad)))
assert all(torch.allclose(a, g, atol=1e-6) for a, g in zip(accumulated, full_grad))

for p in params:
    p.grad = None
before = [p.detach().clone() for p in params]
with torch.random.fork_rng():   # train.train seeds the generators itself
    train.train(small, mse, [(xs[i:i + 2], ys[i:i + 2]) for i in range(0, 8, 2)], steps=1, grad_accum=4,
                max_grad_norm=None, optimizer=torch.optim.SGD(params, lr=1.0), progress=False)
step = [p.detach() - b for p, b in zip(params, before)]
print("train.train's step with grad_accum=4 is minus the full-batch gradient:",
      all(torch.allclose(s, -g, atol=1e-6) for s, g in zip(step, full_grad)))
assert all(torch.allclose(s, -g, atol=1e-6) for s, g in zip(step, full_grad))

# %% [markdown]
# <a id="claim-01-minilm-lora-vs-full"></a>
#
# ## Fine-tuning MiniLM for code search: LoRA vs full fine-tuning
#
# Same batches, same number of steps, the in-batch-negatives contrastive loss of
# `retrieval.code_search_loss` (sentence-transformers' `MultipleNegativesRankingLoss`, scale 20).
# LoRA wraps `query` and `value` with r = 8, α = 16 and learns at 1e-3; full fine-tuning updates
# all 22.7M weights at 2e-5 (a LoRA learning rate would wreck the pretrained weights). The metric
# is chapter 00's, recall@10 and MRR, on the first 200 test queries against their 200 documents
# (chapter 00 used all 506; the benchmark below does too).

# %% tags=["nbval-ignore-output"]
train_rows = data.load_code_search("train")
test_pairs = data.load_code_search("test")[:EVAL_PAIRS]

def code_search_ranks(model, pairs=test_pairs):
    # rank of each query's own document among the pairs' documents (1 = first): per-query scores,
    # so two models can be compared on the same queries with a paired interval
    q, d = retrieval.embed_code_search(model, minilm_tok, pairs)
    return retrieval.relevant_ranks(q, d, list(range(len(pairs))))

def metrics_of(ranks):
    return {"recall@10": (ranks <= 10).float().mean().item(), "mrr": (1 / ranks.float()).mean().item()}

baseline_ranks = code_search_ranks(minilm)
baseline = metrics_of(baseline_ranks)

def fit_minilm(model, lr, steps=MINILM_STEPS, rows=train_rows, desc="MiniLM"):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    history = train.train(model, lambda m, batch: retrieval.code_search_loss(m, minilm_tok, batch),
                          train.batches(rows, MINILM_BATCH, seed=SEED), steps=steps,
                          optimizer=optimizer, warmup_steps=2, seed=SEED, desc=desc)
    return history, optimizer

runs = {}
for name, lr in [("LoRA r=8", 1e-3), ("full fine-tuning", 2e-5)]:
    model = copy.deepcopy(minilm)
    if name.startswith("LoRA"):
        lora.inject_lora(model, target_modules=["query", "value"], r=8, lora_alpha=16)
    history, optimizer = fit_minilm(model, lr, desc=f"MiniLM {name}")
    trainable, _ = lora.count_parameters(model)
    ranks = code_search_ranks(model)
    runs[name] = {"model": model, "history": history, "trainable": trainable,
                  "optimizer_bytes": memory.optimizer_state_bytes(optimizer),
                  "ranks": ranks, "metrics": metrics_of(ranks)}
    del optimizer

# %%
fig, ax = plt.subplots(figsize=(6, 3.2))
for name, run in runs.items():
    ax.plot(range(1, MINILM_STEPS + 1), run["history"].loss, label=name)
ax.set(xlabel="step", ylabel="contrastive loss", title=f"MiniLM, batch {MINILM_BATCH}")
ax.legend()
plt.show()
print(f"{'':18s} {'trainable':>11s} {'AdamW state':>12s} {'recall@10':>9s} {'MRR':>6s}")
print(f"{'zero-shot':18s} {'':>11s} {'':>12s} {baseline['recall@10']:9.3f} {baseline['mrr']:6.3f}")
for name, run in runs.items():
    m = run["metrics"]
    print(f"{name:18s} {run['trainable']:11,d} {run['optimizer_bytes'] / 2**20:9.2f} MiB {m['recall@10']:9.3f} {m['mrr']:6.3f}")
print(f"\nchange from zero-shot on the same {EVAL_PAIRS} queries, with its paired 95% interval:")
diffs = {}
for name, run in runs.items():
    diffs[name] = {"recall@10": stats.paired_bootstrap((baseline_ranks <= 10).float(), (run["ranks"] <= 10).float()),
                   "mrr": stats.paired_bootstrap(1 / baseline_ranks.float(), 1 / run["ranks"].float())}
    rec, mrr = diffs[name]["recall@10"], diffs[name]["mrr"]
    print(f"{name:18s} recall@10 {rec} {rec.verdict():12s}  MRR {mrr} {mrr.verdict()}")

# %% tags=["nbval-ignore-output"]
speed = {name: run["history"].seconds_per_step for name, run in runs.items()}
print(f"seconds per step: LoRA {speed['LoRA r=8']:.2f}, full {speed['full fine-tuning']:.2f}, "
      f"full/LoRA = {speed['full fine-tuning'] / speed['LoRA r=8']:.2f}x")

# %%
lora_run, full_run = runs["LoRA r=8"], runs["full fine-tuning"]
# AdamW keeps two float32 moments per trainable parameter: 8 bytes each
assert lora_run["optimizer_bytes"] == 8 * lora_run["trainable"] == 8 * counts["all-MiniLM-L6-v2"][0]
# full fine-tuning: every parameter that received a gradient. MiniLM's pooler is not used by
# mean pooling, gets no gradient, and AdamW allocates no state for it.
pooler = sum(p.numel() for p in minilm.pooler.parameters())
assert full_run["optimizer_bytes"] == 8 * (full_run["trainable"] - pooler)
# what the prose below quotes
assert all(d.n == EVAL_PAIRS for run in diffs.values() for d in run.values())
assert [d.verdict() for run in diffs.values() for d in run.values()] == ["within noise"] * 4

# %% [markdown]
# **Reading the table.** Ten steps of 16 pairs are too few to move MiniLM measurably: on these
# 200 queries every change from zero-shot, for LoRA and for full fine-tuning alike, has a 95%
# interval that contains zero. Those differences are within noise, whatever the sign of the point
# estimate, and this run shows no gain for either method. (The 40-step benchmark below, on all 506
# queries, moves recall@10 from 0.792 to 0.846 with LoRA r = 8, +0.053 [95% CI +0.032, +0.077]
# paired over those queries: a gain.) What the run does show, without any
# noise, is the cost: the AdamW state of LoRA is 0.56 MiB against 172 MiB for full fine-tuning.
# The fine-tuning result of this chapter that clears the noise is SmolLM2's, next.
#
# ## Fine-tuning SmolLM2 to name functions
#
# The instruction task from chapter 00: given a docstring summary, answer the function's name.
# The loss is next-token cross-entropy on the answer tokens only (`instruct.answer_loss`). Every
# prompt starts with the same 32 tokens (the chat template's system turn and the task's first
# words), so a batch goes in as one sequence: those tokens once, then each row's own, with an
# attention mask that lets each row see the shared start and itself only
# (`instruct.pack_after_prefix`): the loss a padded batch would give, for about half the positions,
# in one pass. LoRA r = 8 on `q_proj` and `v_proj` trains 460,800 of SmolLM2's 134.5M parameters, at a learning rate
# of 2e-3. Full fine-tuning of SmolLM2 does not fit this notebook's time budget (and it needs 1 GiB
# of AdamW state); the benchmark below runs it.

# %% tags=["nbval-ignore-output"]
instruct_test = data.load_instruct("test")[:N_INSTRUCT]
instructions = [r["instruction"] for r in instruct_test]
answers = [r["answer"] for r in instruct_test]

def score_smollm(model):
    nll = instruct.answer_nll(model, smollm_tok, instructions, answers)   # per answer: [nll, tokens]
    predictions = instruct.generate_answers(model, smollm_tok, instructions[:N_GENERATED])
    return {"nll": nll, "perplexity": (nll[:, 0].sum() / nll[:, 1].sum()).exp().item(),
            "predictions": predictions, "examples": list(zip(answers, predictions))}

smol_base = score_smollm(smollm)
smol_lora = lora.inject_lora(copy.deepcopy(smollm), target_modules=["q_proj", "v_proj"], r=8, lora_alpha=16)
smol_opt = torch.optim.AdamW([p for p in smol_lora.parameters() if p.requires_grad], lr=2e-3)
smol_history = train.train(smol_lora, lambda m, batch: instruct.answer_loss(m, smollm_tok, batch),
                           train.batches(data.load_instruct("train"), SMOLLM_BATCH, seed=SEED),
                           steps=SMOLLM_STEPS, optimizer=smol_opt, warmup_steps=1, seed=SEED, desc="SmolLM2 LoRA")
smol_after = score_smollm(smol_lora)
print(f"SmolLM2 LoRA: {smol_history.seconds_per_step:.1f} s per step")

# %%
ppl = stats.paired_bootstrap(smol_base["nll"], smol_after["nll"], stats.corpus_perplexity)
print(f"answer perplexity on {len(answers)} test instructions: zero-shot {ppl.a:.1f}, "
      f"after {SMOLLM_STEPS} LoRA steps {ppl.b:.2f}")
print(f"change with its paired 95% interval: {ppl}  ({ppl.verdict(higher_is_better=False)})")
print(f"loss: first step {smol_history.loss[0]:.2f}, last step {smol_history.loss[-1]:.2f}\n")
gold = answers[:N_GENERATED]
right_before = instruct.exact_matches(smol_base["predictions"], gold)
right_after = instruct.exact_matches(smol_after["predictions"], gold)
exact = stats.mcnemar(right_before, right_after)
print(f"exact match on the first {N_GENERATED}: zero-shot {sum(right_before)}/{N_GENERATED}, "
      f"LoRA {sum(right_after)}/{N_GENERATED}; {exact}\n")
print(f"{'gold':18s} {'zero-shot':32s} LoRA r=8")
for (gold_name, before), (_, after) in zip(smol_base["examples"], smol_after["examples"]):
    print(f"{gold_name:18s} {before[:30]!r:32s} {after!r}")

# %%
assert ppl.verdict(higher_is_better=False) == "gain"   # the whole interval lies below zero
assert ppl.n == len(answers) == N_INSTRUCT
assert sum(right_after) == 0 and exact.p_value == 1.0  # no name right yet: see the answers above
assert (SMOLLM_STEPS, SMOLLM_BATCH, N_GENERATED) == (6, 8, 6)   # the prose below quotes them
near = lambda got, want, tol: all(abs(g - w) <= tol for g, w in zip(got, want, strict=True))
assert near((ppl.a, ppl.b), (455.0, 21.40), 0.06)     # the last digit may move with float rounding on another CPU
assert str(ppl) == "-430 [95% CI -640, -300]"        # printed to two digits of its half-width

# %% [markdown]
# <a id="claim-01-benchmark"></a>
#
# In six steps (`SMOLLM_STEPS`) of 8 examples the perplexity of the right answers on 128 test
# instructions falls from 455.0 to 21.40, and the paired 95% interval of the change,
# −430 [−640, −300], lies entirely below zero: a real gain, not noise. (Scoring all 506 test
# instructions would take this notebook past its time budget; the interval is already far from
# zero.) Look at what the tuned model *answers*,
# though: `_threading_local`, `cgit`, the name of the **module** the instruction quotes, not the
# name of the function. Six steps taught the model the *form* of an answer (a bare identifier,
# then end of turn) and that the instruction's own words are a good place to look, and that is
# what makes the right names so much less surprising; they did not teach it which function a
# docstring describes. Exact match stays at 0 of 6 before and after (McNemar p = 1: no evidence
# either way). Naming the function needs more steps than this notebook can afford; the
# benchmark's longer runs below show where they take it.
#
# ## Longer runs: the rank sweep and full fine-tuning (benchmark results)
#
# A seed tutorial gives a table of rank vs accuracy vs memory. The sweep over
# r ∈ {1, 2, 4, 8, 16, 32} and the full fine-tuning of SmolLM2 take longer than this notebook's
# budget, so they come from `benchmarks/lora_training.py`; its committed JSON (with the command and
# the date it ran) is shown here, labelled as such. The benchmark keeps every test query's rank and
# every test answer's score, the untrained models' too, so each change below is paired over the
# same items, with its 95% interval and verdict (for exact match, McNemar's exact test decides).

# %%
bench = benchmark_result("lora_training")
print(f"benchmark results: `{bench['command']}` run on {bench['date']} ({bench['seconds'] / 60:.0f} min, CPU)\n")
sweep = [row for row in bench["minilm"] if row["method"] == "lora"]
full = next(row for row in bench["minilm"] if row["method"] == "full")
# the benchmark kept every test item's score and recorded the paired differences: b minus a on the
# same queries (MiniLM) or instructions (SmolLM2), each with its 95% bootstrap interval and verdict
paired = {(c["model"], c["a"], c["b"]): c for c in bench["comparisons"]}

def change(model, a, b, metric):
    m = paired[model, a, b][metric]
    p = f" (McNemar p = {m['mcnemar_p']:.2g})" if "mcnemar_p" in m else ""
    return f"{stats.format_difference(m['difference'], m['low'], m['high'], label='')} {m['verdict']}{p}"

def minilm_changes(a, b):
    return f"recall@10 {change('minilm', a, b, 'recall@10')}, MRR {change('minilm', a, b, 'mrr')}"

def smollm_changes(a, b):
    return (f"exact match {change('smollm2', a, b, 'exact_match')}, "
            f"perplexity {change('smollm2', a, b, 'perplexity')}")

n_queries = len(bench["items"]["minilm"]["pretrained"])
n_instructions = len(bench["items"]["smollm2"]["base"]["correct"])
print(f"MiniLM, {bench['command'].split('--minilm-steps ')[1].split()[0]} steps, {n_queries} test queries; "
      f"zero-shot recall@10 {bench['minilm_baseline']['recall@10']:.3f}, MRR {bench['minilm_baseline']['mrr']:.3f}")
print("(each change is a paired difference with its 95% interval)")
print(f"{'':6s} {'trainable':>10s} {'AdamW state':>12s} {'s/step':>7s} {'recall@10':>9s} {'MRR':>6s}")
for row in sweep + [full]:
    label, name = (f"r={row['r']}", f"lora_r{row['r']}") if row["method"] == "lora" else ("full", "full")
    print(f"{label:6s} {row['trainable']:10,d} {row['optimizer_state_bytes'] / 2**20:8.2f} MiB "
          f"{row['seconds_per_step']:7.2f} {row['recall@10']:9.3f} {row['mrr']:6.3f}")
    print(f"{'':6s} minus zero-shot: {minilm_changes('pretrained', name)}")
    if name != "full":
        print(f"{'':6s} minus full:      {minilm_changes('full', name)}")
print("along the sweep:")
for a, b in [(1, 8), (8, 32), (1, 32)]:
    print(f"{'':6s} r={b} minus r={a}: {minilm_changes(f'lora_r{a}', f'lora_r{b}')}")
print(f"\nSmolLM2, {n_instructions} test instructions; zero-shot exact match "
      f"{bench['smollm2_base']['exact_match']:.3f}, perplexity {bench['smollm2_base']['perplexity']:.2f}")
for row in bench["smollm2"]:
    print(f"{row['method']:5s} {row['trainable']:>12,d} trainable  {row['optimizer_state_bytes'] / 2**20:8.1f} MiB AdamW  "
          f"{row['seconds_per_step']:6.2f} s/step  exact match {row['exact_match']:.3f}  perplexity {row['perplexity']:.2f}")
    print(f"{'':5s} minus zero-shot: {smollm_changes('base', row['method'])}")
print(f"lora minus full: {smollm_changes('full', 'lora')}")

fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
ranks = [row["r"] for row in sweep]
axes[0].plot(ranks, [row["recall@10"] for row in sweep], "o-", label="LoRA")
axes[0].axhline(full["recall@10"], color="tab:red", linestyle="--", label="full fine-tuning")
axes[0].axhline(bench["minilm_baseline"]["recall@10"], color="gray", linestyle=":", label="zero-shot")
axes[0].set(xscale="log", xticks=ranks, xticklabels=ranks, xlabel="rank r", ylabel="test recall@10",
            title="MiniLM: metric vs rank (benchmark)")
axes[0].legend()
axes[1].plot(ranks, [row["trainable"] for row in sweep], "o-")
axes[1].set(xscale="log", yscale="log", xticks=ranks, xticklabels=ranks, xlabel="rank r",
            ylabel="trainable parameters", title="trainable parameters grow linearly in r")
plt.tight_layout()
plt.show()

# %%
# trainable parameters are linear in r: r · Σ(d_in + d_out) = r · 9,216 for MiniLM's query+value
assert all(row["trainable"] == row["r"] * 6 * 2 * (384 + 384) for row in sweep)
assert all(row["optimizer_state_bytes"] == 8 * row["trainable"] for row in sweep + bench["smollm2"])
pooler = sum(p.numel() for p in minilm.pooler.parameters())   # unused by mean pooling: no gradient, no state
assert full["optimizer_state_bytes"] == 8 * (full["trainable"] - pooler)
# each recorded comparison is of the same test items as the table's metrics (rounded to 4 places there)
assert all(abs(paired["minilm", "pretrained", f"lora_r{row['r']}" if row["method"] == "lora" else "full"][k]["b"]
               - row[k]) <= 5e-5 for row in sweep + [full] for k in ("recall@10", "mrr"))
assert all(abs(paired["smollm2", "base", row["method"]]["exact_match"]["b"] - row["exact_match"]) <= 5e-5
           for row in bench["smollm2"])

# %% [markdown]
# <a id="claim-01-runtime-merged"></a>
#
# ## Inference: merged vs runtime LoRA
#
# After training there are two ways to serve the adapter. **Runtime** (unmerged): keep $W_0$, $A$
# and $B$ apart and compute $W_0x + \frac{\alpha}{r}B(Ax)$, so adapters can be switched per
# request. **Merged**: fold the update into the weight once, $W = W_0 + \frac{\alpha}{r}BA$, and
# serve a plain model with zero overhead. `lora.merge` and `lora.unmerge` do this exactly and
# reversibly. The extra work of the runtime branch is $r(d+k)$ multiply-adds per token against
# $dk$ for the layer itself: for r = 8 on MiniLM's 384 × 384 `query`/`value`,
# 8 · 768 / 384² = 4.2% of those two layers and less of the whole model.

# %%
runtime_model = runs["LoRA r=8"]["model"]
merged_model = lora.merge(copy.deepcopy(runtime_model))
docs = [r["document"] for r in test_pairs[:32]]
emb_runtime = retrieval.embed(runtime_model, minilm_tok, docs)
emb_merged = retrieval.embed(merged_model, minilm_tok, docs)
print(f"merged and runtime embeddings agree to 1e-5: {torch.allclose(emb_merged, emb_runtime, atol=1e-5)}")
assert torch.allclose(emb_merged, emb_runtime, atol=1e-5)

unmerged = lora.unmerge(copy.deepcopy(merged_model))
w0 = minilm.encoder.layer[0].attention.self.query.weight
w_back = unmerged.encoder.layer[0].attention.self.query.base_layer.weight
assert torch.allclose(w_back, w0, atol=1e-6)            # unmerge restores the pretrained weight


# %% tags=["nbval-ignore-output"]
def seconds(model):
    start = time.perf_counter()
    retrieval.embed(model, minilm_tok, docs)
    return time.perf_counter() - start

contenders = [("base", minilm), ("runtime LoRA", runtime_model), ("merged LoRA", merged_model),
              ("base, timed again", minilm)]   # the same model twice: how much a timing moves on its own
latency = {name: [] for name, _ in contenders}
for i in range(TIMING_ROUNDS):   # interleaved, in rotating order, so a slow moment hits all alike
    for name, model in contenders[i % 4:] + contenders[:i % 4]:
        latency[name].append(seconds(model))
print(f"{'':18s} {'ms/document':>11s} {'vs base':>8s}  (median over {TIMING_ROUNDS} rounds; the ratio's range)")
for name, times in latency.items():
    ratios = [t / b for t, b in zip(times, latency["base"])]
    print(f"{name:18s} {statistics.median(times) * 1000 / len(docs):11.2f} {statistics.median(ratios):7.2f}x"
          f"  ({min(ratios):.2f}-{max(ratios):.2f}x)")

# %% [markdown]
# **Reading the timings.** The last row times the *same* base model a second time, so its
# distance from 1.00x, and the range of each ratio over the rounds, is how far a timing moves on
# its own on this machine. A difference between rows smaller than that is within run-to-run
# variation: on a loaded machine this short cell cannot resolve a few percent, and it is not
# checked. A merged adapter leaves a plain model with the same weights' shapes, so it must cost
# what the base costs; the runtime branch adds about 4% to two layers. The committed benchmark,
# `benchmarks/lora_vs_peft.py`, times SmolLM2 with 12 interleaved rounds and takes the median of
# the rounds' ratios; from the times of every round it also gives each median a 95% interval,
# resampling whole rounds (`stats.median_time_ratio`):

# %%
lvp = benchmark_result("lora_vs_peft")
print(f"benchmark results: `{lvp['command']}` run on {lvp['date'][:10]} ({lvp['setting']})")
print(f"{lvp['repeats']['inference']} rounds, {lvp['repeats']['order']} order; median seconds per batch:")
rounds = lvp["all_seconds"]["inference"]
round_ratios = {name: [t / b for t, b in zip(rounds[name], rounds["base"])] for name in ("runtime", "merged")}
for name in ("base", "runtime", "merged"):
    seconds_median = lvp["median_seconds"]["inference"][name]
    print(f"  {name:8s} {seconds_median:.3f} s" + ("" if name == "base" else
          f"   {lvp['ratios'][f'{name}_inference_over_base']:.3f}x base "
          f"(rounds {min(round_ratios[name]):.2f}-{max(round_ratios[name]):.2f}x)"))
# each median with its interval, resampling whole rounds (the benchmark's interval lines)
medians = {name: stats.median_time_ratio(rounds[name], rounds["base"]) for name in ("runtime", "merged")}
for name, t in medians.items():
    print(f"  {name:8s} median {t['ratio']:.3f}x base, 95% interval [{t['low']:.3f}, {t['high']:.3f}] ({t['verdict']})")
print(f"LoRA's share of the multiply-adds: {lvp['lora_multiply_add_share']['wrapped_layers']:.1%} of the wrapped "
      f"layers, {lvp['lora_multiply_add_share']['whole_forward']:.2%} of the whole forward pass")

# %%
# what the prose around this cell quotes
assert round(lvp["ratios"]["runtime_inference_over_base"], 3) == 1.054
assert round(lvp["ratios"]["merged_inference_over_base"], 3) == 1.014
assert [(round(min(r), 2), round(max(r), 2)) for r in round_ratios.values()] == [(0.98, 1.13), (0.96, 1.05)]
interval = lambda name: [f"{medians[name][k]:.3f}" for k in ("ratio", "low", "high")]   # as printed
assert interval("merged") == ["1.014", "0.975", "1.043"] and medians["merged"]["verdict"] == "within noise"
assert interval("runtime") == ["1.054", "1.033", "1.066"] and medians["runtime"]["verdict"] == "slower"
assert {"FIGURE lora_merged_inference_ours_over_base_95pct_high: 1.043 (target <= 1.02) missed",
        "FIGURE lora_runtime_inference_ours_over_base_95pct_high: 1.066 (target <= 1.1) met"} <= set(lvp["figures"])
assert lvp["ratios"]["runtime_inference_over_base"] < 2.0   # the seed's "runtime LoRA is 2-3x slower" does not hold

# %% [markdown]
# Measured with repeats, merged LoRA costs what the base model costs: 1.014x, while single rounds
# range from 0.96x to 1.05x, so the 1.4% is run-to-run variation; its 95% interval, [0.975,
# 1.043], holds 1, within noise, and is too wide to show the benchmark's target (at most 2% more):
# that interval line is missed. Runtime LoRA's median is 1.054x (rounds 0.98x to 1.13x), 95%
# interval [1.033, 1.066]: slower than the base by 3% to 7%, and nowhere near the seed's "2-3x". The adapters add 0.33% of the forward pass's multiply-adds; the rest is the
# overhead of the extra small matrix products and the calls around them.

# %% [markdown]
# <a id="claim-01-several-adapters"></a>
#
# ## Several adapters on one model, and blending them
#
# One base model can carry several named adapters: add them, switch the active one, disable all
# (back to the base model), delete. Here two adapters learn from two different slices of the
# training data (the training modules whose names start with a-l, and m-z) and we score each, then
# two ways of blending them half and half:
#
# Write $w_i$ for the blend weights (here ½ and ½) and $s_i$ for each adapter's scaling (here
# $\alpha/r = 2$), so $\Delta W_i = s_i B_i A_i$; the new adapter has scaling 1.
#
# * **exact** (peft's `combination_type="cat"`): stack the adapters along the rank,
#   $A = \begin{pmatrix} w_a s_a A_a \\ w_b s_b A_b \end{pmatrix}$ and $B = (B_a \;\; B_b)$, so the new
#   update is exactly $BA = w_a\Delta W_a + w_b\Delta W_b = \tfrac12\Delta W_a + \tfrac12\Delta W_b$
#   (rank 16);
# * **linear**: put $c_i = \sqrt{w_i s_i}$ on *both* factors, $A = c_a A_a + c_b A_b$ and
#   $B = c_a B_a + c_b B_b$ (rank 8). Then
#
#   $$ BA = \underbrace{c_a^2 B_aA_a + c_b^2 B_bA_b}_{w_a\Delta W_a + w_b\Delta W_b}
#       \;+\; c_a c_b\,(B_aA_b + B_bA_a), $$
#
#   the intended blend plus the cross terms $B_aA_b$ and $B_bA_a$: it is *not* the weighted average
#   of the two updates, which users often assume. (Here $c_a = c_b = \sqrt{\tfrac12 \cdot 2} = 1$.)

# %% tags=["nbval-ignore-output"]
halves = {"a_to_l": [r for r in train_rows if r["module"][0].lower() <= "l"],
          "m_to_z": [r for r in train_rows if r["module"][0].lower() > "l"]}
multi = copy.deepcopy(minilm)
for name, rows in halves.items():
    lora.inject_lora(multi, target_modules=["query", "value"], r=8, lora_alpha=16, adapter_name=name)
    lora.set_adapter(multi, name)
    fit_minilm(multi, 1e-3, steps=ADAPTER_STEPS, rows=rows, desc=f"adapter {name}")
lora_combine.add_weighted_adapter(multi, ["a_to_l", "m_to_z"], [0.5, 0.5], "exact_blend", combination_type="cat")
lora_combine.add_weighted_adapter(multi, ["a_to_l", "m_to_z"], [0.5, 0.5], "linear_blend", combination_type="linear")

# %%
subset = test_pairs[:64]
scores = {}
with lora.disable_adapters(multi):
    scores["base (adapters disabled)"] = code_search_ranks(multi, subset)
for name in ["a_to_l", "m_to_z", "exact_blend", "linear_blend"]:
    lora.set_adapter(multi, name)
    scores[name] = code_search_ranks(multi, subset)
base_ranks = scores["base (adapters disabled)"]
print("64 test queries and documents; MRR change from the base with its paired 95% interval")
blend_mrr = {}
for name, ranks in scores.items():
    m = metrics_of(ranks)
    line = f"{name:25s} recall@10 {m['recall@10']:.3f}  MRR {m['mrr']:.3f}"
    if name != "base (adapters disabled)":
        blend_mrr[name] = stats.paired_bootstrap(1 / base_ranks.float(), 1 / ranks.float())
        line += f"   {blend_mrr[name]} {blend_mrr[name].verdict()}"
    print(line)

layer = multi.encoder.layer[0].attention.self.query
delta = {name: lora.delta_weight(layer, name) for name in ["a_to_l", "m_to_z", "exact_blend", "linear_blend"]}
target = 0.5 * delta["a_to_l"] + 0.5 * delta["m_to_z"]
rel = {k: ((delta[k] - target).norm() / target.norm()).item() for k in ["exact_blend", "linear_blend"]}
print(f"\nlayer 0 query, |ΔW_blend - (ΔW_a + ΔW_b)/2| / |(ΔW_a + ΔW_b)/2|: "
      f"exact {'< 1e-5' if rel['exact_blend'] < 1e-5 else rel['exact_blend']}, linear {rel['linear_blend']:.2f}")
assert rel["exact_blend"] < 1e-5 and rel["linear_blend"] > 0.1
assert torch.equal(base_ranks, code_search_ranks(minilm, subset))   # disabled adapters: exactly the base model
assert all(d.verdict() == "within noise" for d in blend_mrr.values())  # 4 steps each, 64 queries: see below

# %% [markdown]
# Four steps per adapter, scored on 64 queries, move MRR by amounts whose intervals all contain
# zero: no adapter or blend here is measurably better than the base model, and this section is
# about the mechanics (switching, disabling, blending) and the check on $\Delta W$, not about
# accuracy.

# %% [markdown]
# ## The same experiment through peft
#
# peft is the library people use in production. We start peft and `course_lib` from the *same*
# initial adapter (saved by `course_lib` as `adapter_model.safetensors` + `adapter_config.json` in
# peft's layout and loaded by `peft.PeftModel.from_pretrained`), train both on the same batches,
# and compare the losses step by step and the adapters at the end.

# %% tags=["nbval-ignore-output"]
PEFT_STEPS = 2
ours = lora.inject_lora(copy.deepcopy(minilm), target_modules=["query", "value"], r=8, lora_alpha=16)
with tempfile.TemporaryDirectory() as folder:
    lora_io.save_adapter(ours, folder)
    theirs = PeftModel.from_pretrained(copy.deepcopy(minilm), folder, is_trainable=True)
    saved_files = sorted(p.name for p in Path(folder).iterdir())
histories = {}
for name, model in [("course_lib", ours), ("peft", theirs)]:
    histories[name], _ = fit_minilm(model, 1e-3, steps=PEFT_STEPS, desc=name)

# %%
print("adapter folder:", saved_files)
print(f"{'step':>4s} {'course_lib':>11s} {'peft':>11s}")
for step, (a, b) in enumerate(zip(histories["course_lib"].loss, histories["peft"].loss), 1):
    print(f"{step:4d} {a:11.5f} {b:11.5f}")
ours_state = {k: v for k, v in ours.state_dict().items() if "lora_" in k}
peft_state = {k: v for k, v in theirs.state_dict().items() if "lora_" in k}
assert len(ours_state) == len(peft_state) == 6 * 2 * 2   # A and B for query and value in 6 layers
worst = max((a - b).abs().max().item() for a, b in zip(ours_state.values(), peft_state.values()))
print(f"largest difference between the trained adapters is below 1e-4: {worst < 1e-4}")
assert worst < 1e-4
assert max(abs(a - b) for a, b in zip(histories["course_lib"].loss, histories["peft"].loss)) < 1e-4

# %% [markdown]
# ## What we measured

# %%
lo, fu = runs["LoRA r=8"]["metrics"], runs["full fine-tuning"]["metrics"]
bench_lora, bench_full = bench["smollm2"]
r8 = next(row for row in sweep if row["r"] == 8)
# the benchmark records every step's seconds, and full fine-tuning and LoRA trained on the same batch
# at each step: step i of one pairs with step i of the other (the warm-up step left out)
steps_smollm = stats.median_time_ratio(bench_full["step_seconds"][1:], bench_lora["step_seconds"][1:])
steps_minilm = stats.median_time_ratio(full["step_seconds"][1:], r8["step_seconds"][1:])
step_ci = lambda m: f'{m["ratio"]:.2f}x [95% CI {m["low"]:.2f}, {m["high"]:.2f}] over {m["rounds"]} steps'
table = f'''
| quantity | measured here |
|---|---|
| seed's 2×2 example, W0·x + B·A·x | [5.25, 11.3] |
| LoRA r=8 on q,v trainable: MiniLM / SmolLM2 | {counts["all-MiniLM-L6-v2"][0]:,d} / {counts["SmolLM2-135M-Instruct"][0]:,d} |
| LoRA r=8 on q,v trainable: LLaMA-3-8B (computed) | {llama3_8b:,d} (seed: "4M") |
| MiniLM recall@10 / MRR, zero-shot | {baseline["recall@10"]:.3f} / {baseline["mrr"]:.3f} |
| MiniLM after {MINILM_STEPS} steps, LoRA r=8 | {lo["recall@10"]:.3f} / {lo["mrr"]:.3f} (change {diffs["LoRA r=8"]["recall@10"]} / {diffs["LoRA r=8"]["mrr"]}: {diffs["LoRA r=8"]["recall@10"].verdict()} / {diffs["LoRA r=8"]["mrr"].verdict()}) |
| MiniLM after {MINILM_STEPS} steps, full fine-tuning | {fu["recall@10"]:.3f} / {fu["mrr"]:.3f} (change {diffs["full fine-tuning"]["recall@10"]} / {diffs["full fine-tuning"]["mrr"]}: {diffs["full fine-tuning"]["recall@10"].verdict()} / {diffs["full fine-tuning"]["mrr"].verdict()}) |
| AdamW state, LoRA vs full (MiniLM) | {runs["LoRA r=8"]["optimizer_bytes"] / 2**20:.2f} MiB vs {runs["full fine-tuning"]["optimizer_bytes"] / 2**20:.1f} MiB |
| SmolLM2 answer perplexity ({len(answers)} test), zero-shot → {SMOLLM_STEPS} LoRA steps | {ppl.a:.1f} → {ppl.b:.2f} (change {ppl}: {ppl.verdict(higher_is_better=False)}) |
| SmolLM2 exact match (first {N_GENERATED}), zero-shot → {SMOLLM_STEPS} LoRA steps | {sum(right_before)}/{N_GENERATED} → {sum(right_after)}/{N_GENERATED} (McNemar p = {exact.p_value:.3g}) |
| benchmark, {bench["command"].split("--minilm-steps ")[1].split()[0]} steps: MiniLM recall@10, LoRA r=8 minus zero-shot / minus full | {change("minilm", "pretrained", "lora_r8", "recall@10")} / {change("minilm", "full", "lora_r8", "recall@10")} |
| benchmark, {bench["command"].split("--smollm-steps ")[1].split()[0]} steps: SmolLM2 exact match LoRA / full | {bench_lora["exact_match"]:.3f} / {bench_full["exact_match"]:.3f} (LoRA minus full {change("smollm2", "full", "lora", "exact_match")}) |
| benchmark: SmolLM2 full vs LoRA seconds per step, step by step | {step_ci(steps_smollm)} (seed: LoRA "15-20x faster") |
| benchmark: MiniLM full vs LoRA r=8 seconds per step, step by step | {step_ci(steps_minilm)} |
| exact blend vs linear blend, relative ΔW error | < 1e-5 vs {rel["linear_blend"]:.2f} |
| benchmark: inference, runtime / merged LoRA vs base (SmolLM2) | {lvp["ratios"]["runtime_inference_over_base"]:.3f}x / {lvp["ratios"]["merged_inference_over_base"]:.3f}x |
'''
display(Markdown(table))

# %% [markdown]
# ## What the seeds claim, and what we measured
#
# * **"About 4M trainable parameters" for LoRA on LLaMA-8B:** 3,407,872 for LLaMA-3-8B with r = 8
#   on q and v; 4,194,304 is what the same setting gives on a 7B model without grouped-query attention.
# * **"Training is 15-20x faster than full fine-tuning":** not on this hardware. In the benchmark a
#   full fine-tuning step of SmolLM2 takes 1.72x as long as a LoRA step (step by step on the same
#   batches, 95% CI 1.69 to 1.74), and 1.23x for MiniLM at r = 8 (1.21 to 1.25). LoRA
#   still runs the whole forward pass and back-propagates through every layer (the adapters of
#   layer 1 need the gradient that flows through layers 2…30); it saves the weight gradients of the
#   frozen layers and the optimizer's work on them. What LoRA saves by orders of magnitude is
#   *memory*: AdamW state of 3.5 MiB instead of 1026 MiB for SmolLM2, 0.56 MiB instead of 172 MiB
#   for MiniLM, and no gradient buffers for the frozen weights.
# * **"Runtime (unmerged) LoRA is 2-3x slower at inference":** the extra branch costs
#   $r(d+k)/(dk)$ of a layer's multiply-adds, a few percent. The live latency cell above cannot
#   resolve a few percent (its "timed again" row shows how far a timing moves by itself, so it is
#   not checked); `benchmarks/lora_vs_peft.py`, with 12 interleaved rounds, measured runtime LoRA
#   at 1.054x the base model on SmolLM2, and merged LoRA at 1.014x, the same as the base within
#   run-to-run variation.
# * **Rank vs accuracy (the seed's table):** in the 40-step benchmark, MiniLM's test recall@10 rises
#   from 0.810 at r = 1 to 0.846 at r = 8, paired over the 506 queries +0.036 [95% CI +0.018,
#   +0.055], a gain, and stops there: r = 16 and r = 32 also put 428 of the 506 queries' documents
#   in the top 10 (recall@10 0.846; not all the same queries: r = 32 minus r = 8 is +0.000 [−0.016,
#   +0.016], within noise), and r = 32 minus r = 1 is +0.036 [+0.014, +0.057]. r = 8 is level with
#   full fine-tuning (0.844; +0.002 [−0.014, +0.018], within noise). Trainable parameters grow
#   linearly in r and the time per step does not change. On SmolLM2, LoRA and full fine-tuning
#   both beat the untrained model (exact match 2 of 100 → 12 and 11) and are level with each other
#   (LoRA minus full: exact match McNemar p = 1, answer perplexity −0.12 [−0.84, +0.54]).
# * **Blending adapters:** the exact ("cat") blend reproduces $\tfrac12\Delta W_a + \tfrac12\Delta W_b$ to
#   float precision; the linear blend of A and B is off by 99% of the norm of the intended update
#   in the layer we checked, because of the cross terms $B_aA_b$ and $B_bA_a$.
# * **Agreement with peft:** the same initial adapter, trained on the same batches, gives the same
#   losses to 5 decimals in both libraries, and the same adapters to 1e-4.

# %%
# The figures quoted in the paragraph above, checked against what this run computed.
assert llama3_8b == 3_407_872 and llama2_7b == 4_194_304
assert (round(lora_run["optimizer_bytes"] / 2**20, 2), round(full_run["optimizer_bytes"] / 2**20)) == (0.56, 172)
bench_figures = benchmark_result("lora_vs_peft")["figures"]
assert any("lora_runtime_inference_ours_over_base: 1.054" in f for f in bench_figures)
assert any("lora_merged_inference_ours_over_base: 1.014" in f for f in bench_figures)
# the benchmark's figures quoted above (benchmarks/results/lora_training.json)
assert [round(steps_smollm[k], 2) for k in ("ratio", "low", "high")] == [1.72, 1.69, 1.74] and steps_smollm["rounds"] == 39
assert [round(steps_minilm[k], 2) for k in ("ratio", "low", "high")] == [1.23, 1.21, 1.25] and steps_minilm["rounds"] == 39
assert (round(bench_lora["optimizer_state_bytes"] / 2**20, 1), round(bench_full["optimizer_state_bytes"] / 2**20)) == (3.5, 1026)
assert [round(row["recall@10"], 3) for row in sweep if row["r"] in (1, 8, 32)] == [0.810, 0.846, 0.846]
assert [round(row["recall@10"] * n_queries) for row in sweep if row["r"] >= 8] == [428] * 3
interval_of = lambda model, a, b, metric: tuple(round(paired[model, a, b][metric][k], 3) for k in ("difference", "low", "high"))
assert interval_of("minilm", "pretrained", "lora_r8", "recall@10") == (0.053, 0.032, 0.077)
assert interval_of("minilm", "lora_r1", "lora_r32", "recall@10") == (0.036, 0.014, 0.057)
assert interval_of("minilm", "lora_r1", "lora_r8", "recall@10") == (0.036, 0.018, 0.055)
assert interval_of("minilm", "lora_r8", "lora_r32", "recall@10") == (0.0, -0.016, 0.016)
assert interval_of("minilm", "full", "lora_r8", "recall@10") == (0.002, -0.014, 0.018)
assert [sum(bench["items"]["smollm2"][m]["correct"]) for m in ("base", "lora", "full")] == [2, 12, 11]
assert paired["smollm2", "full", "lora"]["exact_match"]["mcnemar_p"] == 1.0
assert tuple(round(paired["smollm2", "full", "lora"]["perplexity"][k], 2) for k in ("difference", "low", "high")) == (-0.12, -0.84, 0.54)
assert round(full["recall@10"], 3) == 0.844
assert len({row["seconds_per_step"] // 0.5 for row in sweep}) <= 2   # flat in r, up to noise
assert round(rel["linear_blend"], 2) == 0.99

# %% [markdown]
# ## Exercises
#
# Each exercise has a check cell right after it; the solution is in the cell between
# `BEGIN SOLUTION` and `END SOLUTION` (on the site it is on the Solutions page).
#
# **Exercise 1: build LoRA's forward pass and merge.** Write two functions with plain tensor
# operations (`@`, `+`, `*`, `.T`):
#
# * `lora_forward(x, W0, b0, A, B, scaling)` returns $W_0x + b_0 + s\,BAx$ for every row of the
#   batch `x` (shape $n \times k$), that is a tensor of shape $n \times d$. `W0` is the frozen
#   weight ($d \times k$, as `nn.Linear` stores it), `b0` its bias ($d$), `A` is $r \times k$, `B` is
#   $d \times r$ and `scaling` is the number $s$ ($\alpha/r$, or $\alpha/\sqrt{r}$ for rsLoRA).
# * `lora_merge(W0, A, B, scaling)` returns the merged weight $W_0 + s\,BA$ ($d \times k$), as a new
#   tensor: `W0` must stay as it was.
#
# The check tries them on the 2×2 worked example above, on a random layer with a bias, and checks
# that a plain linear layer with your merged weight gives your forward's output. Calling
# `LoRALinear` (its `forward`, `merge`, `unmerge`, `delta_weight`), `lora.merge`,
# `lora.merge_and_unload`, `lora.delta_weight` or peft's LoRA layer is not allowed: the check
# reports it.

# %% tags=["solution"]
def lora_forward(x, W0, b0, A, B, scaling):
    # BEGIN SOLUTION
    return x @ W0.T + b0 + scaling * (x @ A.T) @ B.T   # A first: r(d + k) multiply-adds, never d·k
    # END SOLUTION


def lora_merge(W0, A, B, scaling):
    # BEGIN SOLUTION
    return W0 + scaling * B @ A
    # END SOLUTION

# %%
check_lora(lora_forward, lora_merge)

# %% [markdown]
# **Exercise 2: count before you train.** How many parameters does LoRA with r = 16 on *all*
# linear layers of SmolLM2 (`"all-linear"`: q, k, v, o, gate, up and down projections, not the
# output layer) train? Compute it from `smollm.config` with the formula $r(d_\text{in} + d_\text{out})$.

# %% tags=["solution"]
# BEGIN SOLUTION
c = smollm.config
h, i, kv = c.hidden_size, c.intermediate_size, c.num_key_value_heads * c.head_dim
per_block = [(h, c.num_attention_heads * c.head_dim), (h, kv), (h, kv), (c.num_attention_heads * c.head_dim, h),
             (h, i), (h, i), (i, h)]
all_linear_r16 = lora_count(per_block, c.num_hidden_layers, 16)
# END SOLUTION
print(f"{all_linear_r16:,d} trainable parameters")

# %%
check = lora.inject_lora(copy.deepcopy(smollm), target_modules="all-linear", r=16, lora_alpha=32)
assert all_linear_r16 == lora.count_parameters(check)[0]
del check

# %% [markdown]
# **Exercise 3 (open).** Train the MiniLM adapter with `lora_alpha` = 8, 16 and 64 at r = 8 (same
# steps). Which scaling works best at this learning rate, and why do `lora_alpha` and the learning
# rate trade off against each other?
