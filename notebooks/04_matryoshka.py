# %% [markdown]
# # 04 · Matryoshka embeddings: one vector, many sizes
#
# MiniLM embeds a text as 384 numbers. Cut that vector to its first 64 and recall@10 on this
# chapter's code search drops from 0.755 to 0.601, 15 points (measured below, with its interval):
# the model spread what it knows over all 384. **Matryoshka Representation Learning**
# (MRL, Kusupati et al., 2022) trains the embedding so that its prefixes (the first 32, 64, 128,
# 256 numbers) are each good embeddings, like nested dolls. The network does not change; only the
# loss does: the same contrastive loss is computed on every prefix, each re-normalised, and summed.
#
# What that buys is at search time: a 64-number prefix is a six times smaller index, and a
# **two-stage search** shortlists candidates cheaply at the small size, then re-ranks only the
# shortlist at full size. This chapter
#
# 1. builds the Matryoshka loss (`course_lib.matryoshka`, checked against sentence-transformers'
#    `MatryoshkaLoss` in the tests) and trains MiniLM + LoRA with and without it,
# 2. measures recall@10 at every prefix size: where MRL keeps its accuracy and plain truncation
#    loses it,
# 3. measures two-stage search: recall against shortlist size and time, index bytes per vector,
# 4. shows the seeds' headline table (full fine-tuning, LoRA, LoRA + GradCache, LoRA + MRL, all
#    three) reproduced at this scale, and checks which of its conclusions hold.
#
# **Time:** about 3 minutes on 2 CPU cores. The search speed-up on the full 20,506-document corpus
# and the combination table come from `benchmarks/mrl_search.py` and
# `benchmarks/mrl_combination.py`, whose committed results are shown labelled.

# %%
import copy
import itertools
import time

import matplotlib.pyplot as plt
import torch
from IPython.display import Markdown, display

from course_lib import data, gradcache, lora, matryoshka, models, retrieval, stats, train
from course_lib.tooling.results import benchmark_result
from course_lib.tooling.source import show

SEED = 0
DEVICE = models.default_device()
TRAIN_STEPS = 24         # contrastive steps for each model (LoRA with and without MRL)
BATCH = 32               # pairs per step
GROUP_SIZE = 8           # texts per padded group inside a step (sorted by length: less padding, same embeddings)
N_DISTRACTORS = 1000     # distractors added to the 506 test documents (the benchmark uses all 20,000)
MRL_DIMS = (384, 256, 128, 64, 32)                  # the nested dimensions the loss trains
EVAL_DIMS = [32, 48, 64, 96, 128, 192, 256, 384]   # prefix sizes we score
SHORTLIST_DIM = 64
KS = [10, 20, 50, 100, 200, 500]                    # shortlist sizes of the two-stage search
_ = torch.manual_seed(SEED)

# %% [markdown]
# ## The loss: the same loss on every prefix
#
# For a batch of $n$ query embeddings $q_1, \dots, q_n$ and their matching documents
# $d_1, \dots, d_n$ (384 numbers each), and a set $\mathcal M$ of nested dimensions
# (here 384, 256, 128, 64, 32) with weights $w_m$, the Matryoshka loss is
#
# $$\mathcal L_{MRL} = \sum_{m \in \mathcal M} w_m \, \mathcal L\big(\mathrm{norm}(q_{1:m}),\ \mathrm{norm}(d_{1:m})\big)$$
#
# where $x_{1:m}$ is the first $m$ numbers of a vector, $\mathrm{norm}$ rescales it to unit length
# (a unit vector's prefix is shorter than 1, by a different amount for each vector), and
# $\mathcal L$ is the in-batch-negatives loss of chapters 01 and 03: each query must pick its own
# document among the $n$ of the batch,
#
# $$\mathcal L(q, d) = -\frac1n \sum_{i=1}^{n} \log \frac{e^{s \cos(q_i, d_i)}}{\sum_{j=1}^{n} e^{s \cos(q_i, d_j)}}$$
#
# with scale $s = 20$ (a temperature of 0.05). This is all of it in `course_lib`:
# `MatryoshkaLoss.__call__` sums the weighted `per_dim` losses, each computed on prefixes cut
# by `truncate`, with `retrieval.in_batch_negatives_loss` as $\mathcal L$.

# %%
show(matryoshka.truncate, matryoshka.MatryoshkaLoss.per_dim, matryoshka.MatryoshkaLoss.__call__,
     retrieval.in_batch_negatives_loss)

# %% [markdown]
# **What just happened.** `truncate` slices the first `dim` numbers and re-normalises them;
# `per_dim` calls the same base loss once per nested dimension; `__call__` adds the losses up
# with their weights (a plain weighted sum, as sentence-transformers does). In
# `in_batch_negatives_loss`, the logits are $s\cos(q_i, d_j)$, one row per query, and
# `cross_entropy` with labels $0, \dots, n-1$ is exactly $\mathcal L$ above: row $i$'s right
# answer is column $i$, and every other document in the batch is a negative. Nothing else changes:
# the model, the optimizer and the forward pass are the same, and the prefixes are slices of one
# output, so MRL costs no extra forward pass. On a batch of training pairs, the pretrained
# MiniLM's loss grows as the prefix shrinks:

# %%
base, tok = models.load_minilm(DEVICE)
train_rows = data.load_code_search("train")
test_pairs = data.load_code_search("test")
distractors = data.load_distractors(n=N_DISTRACTORS, seed=SEED)
mrl_loss = matryoshka.MatryoshkaLoss(matryoshka_dims=MRL_DIMS)
print(mrl_loss)
with torch.no_grad():
    batch = train_rows[:BATCH]
    q = retrieval.encode_batch(base.eval(), tok, [r["query"] for r in batch], retrieval.QUERY_MAX_TOKENS)
    d = retrieval.encode_batch(base, tok, [r["document"] for r in batch], retrieval.DOC_MAX_TOKENS)
    per_dim = {m: v.item() for m, v in mrl_loss.per_dim(q, d).items()}
for m, v in per_dim.items():
    print(f"loss at the first {m:3d} numbers: {v:.3f}")
print(f"Matryoshka loss (sum, weights 1): {mrl_loss(q, d).item():.3f}")
assert per_dim[32] > per_dim[384]
assert abs(mrl_loss(q, d).item() - sum(per_dim.values())) < 1e-4


# %% [markdown]
# ## Training with and without MRL
#
# Two copies of MiniLM with LoRA r = 16 on the query and value projections (the seeds' rank), the
# same pairs in the same order, the same learning rate; one trained with the ordinary loss, one
# with the Matryoshka loss over 384/256/128/64/32. The step is `gradcache.code_search_step`, the
# ordinary step here (GradCache would give the same gradients, chapter 03), with one saving of
# time. A batch padded to its longest text makes every text cost the model what the longest
# costs; with `group_size=GROUP_SIZE` the step sorts the 32 queries, and the 32 documents, by
# token count and runs them 8 at a time, each group padded to its own longest
# (`retrieval.encode_batch`). The attention mask keeps an encoder's texts apart, so the
# embeddings, the loss and the gradients are the same up to float rounding (the tests check it on
# MiniLM); only the dropout masks drawn are others. Counted over this run's batches:

# %%
def tokens_run(texts, max_length, group_size):
    """Tokens the encoder runs, padding included, when the texts go in groups of group_size."""
    lengths = retrieval.token_counts(tok, texts, max_length)   # per text, truncated, special tokens included
    return sum(len(g) * max(lengths[i] for i in g) for g in retrieval.length_groups(lengths, group_size))

counts = {"text": 0, BATCH: 0, GROUP_SIZE: 0}
for rows in itertools.islice(train.batches(train_rows, BATCH, seed=SEED), TRAIN_STEPS):   # the steps' batches
    for key, max_length in (("query", retrieval.QUERY_MAX_TOKENS), ("document", retrieval.DOC_MAX_TOKENS)):
        texts = [r[key] for r in rows]
        counts["text"] += tokens_run(texts, max_length, 1)
        counts[BATCH] += tokens_run(texts, max_length, BATCH)
        counts[GROUP_SIZE] += tokens_run(texts, max_length, GROUP_SIZE)
print(f"tokens in {TRAIN_STEPS} batches (queries and documents): {counts['text']:,d} of text; the model runs "
      f"{counts[BATCH]:,d} padded to each batch's longest, {counts[GROUP_SIZE]:,d} in groups of {GROUP_SIZE}")
print(f"padding: {1 - counts['text'] / counts[BATCH]:.0%} of the tokens run without groups, "
      f"{1 - counts['text'] / counts[GROUP_SIZE]:.0%} with")
assert counts[GROUP_SIZE] < 0.65 * counts[BATCH]

# %% tags=["nbval-ignore-output"]
def fit(loss_fn, desc):
    torch.manual_seed(SEED)
    model = copy.deepcopy(base)
    lora.inject_lora(model, target_modules=["query", "value"], r=16, lora_alpha=32)
    history = train.train(model, gradcache.code_search_step(tok, None, loss_fn, group_size=GROUP_SIZE),
                          train.batches(train_rows, BATCH, seed=SEED), steps=TRAIN_STEPS, lr=1e-3,
                          warmup_steps=2, seed=SEED, desc=desc, loss_fn_does_backward=True)
    return model, history

lora_plain, history_plain = fit(None, "LoRA")
lora_mrl, history_mrl = fit(mrl_loss, "LoRA + MRL")
print(f"{TRAIN_STEPS} steps of {BATCH} pairs each: {history_plain.seconds_per_step:.1f} s/step without MRL, "
      f"{history_mrl.seconds_per_step:.1f} s/step with")

# %% [markdown]
# The two times per step printed above should be equal up to the machine's load: MRL adds five
# losses computed on slices of embeddings already in memory, which costs next to nothing, so
# neither run can be faster for a reason. Whichever prints the smaller number, the difference is
# timing noise.
#
# <a id="claim-04-prefix-recall"></a>
#
# ## Recall at every prefix size
#
# Each model embeds the 506 test queries and a corpus of their 506 functions plus
# `N_DISTRACTORS` distractors; we truncate both sides to each prefix size, re-normalise, and
# measure recall@10 (`matryoshka.metrics_by_dim`). Two models scored on the same queries differ
# partly by chance, so each difference is printed with its **paired 95% interval**: a bootstrap
# over the 506 queries (`stats.paired_bootstrap`, seeded), from each query's rank of its own
# document (`retrieval.relevant_ranks`). We call a difference a gain only when its interval
# excludes zero, and "within noise" otherwise.

# %% tags=["nbval-ignore-output"]
# This output varies slightly from run to run and between CPUs (AVX2 / AVX-512): one query of 506
# crossing rank 10 moves a recall by 0.002. The checks below allow for it.
relevant = list(range(len(test_pairs)))
embeddings, by_dim = {}, {}
for name, model in [("pretrained", base), ("LoRA", lora_plain), ("LoRA + MRL", lora_mrl)]:
    embeddings[name] = retrieval.embed_code_search(model, tok, test_pairs, distractors)
    by_dim[name] = matryoshka.metrics_by_dim(*embeddings[name], relevant, EVAL_DIMS)
n_docs = embeddings["LoRA"][1].shape[0]

fig, ax = plt.subplots(figsize=(6.5, 3.6))
for name, metrics in by_dim.items():
    ax.plot(EVAL_DIMS, [metrics[m]["recall@10"] for m in EVAL_DIMS], "o-", label=name)
ax.set_xscale("log")
ax.set_xticks(EVAL_DIMS)
ax.set_xticklabels([str(m) for m in EVAL_DIMS])
ax.minorticks_off()            # a log axis would also label its minor ticks, on top of ours
ax.set(xlabel="prefix length (numbers kept of 384, log scale)", ylabel="test recall@10 (fraction of queries)",
       title=f"Recall@10 against prefix length, with and without MRL\n"
             f"(MiniLM code search, {len(relevant)} queries, {n_docs} documents)")
ax.legend()
plt.show()
print(f"{'dims':>4s} " + " ".join(f"{name:>11s}" for name in by_dim) + "   (recall@10)")
for m in EVAL_DIMS:
    print(f"{m:4d} " + " ".join(f"{by_dim[name][m]['recall@10']:11.3f}" for name in by_dim))

# each query's rank of its own document, per model and prefix size; then paired differences B - A
ranks = {name: {m: retrieval.relevant_ranks(matryoshka.truncate(q, m), matryoshka.truncate(d, m), relevant)
                for m in EVAL_DIMS} for name, (q, d) in embeddings.items()}
hit10 = lambda r: (r <= 10).float()        # per query: recall@10 is the mean of this
mrl_gain = {m: stats.paired_bootstrap(hit10(ranks["LoRA"][m]), hit10(ranks["LoRA + MRL"][m])) for m in EVAL_DIMS}
mrl_gain_mrr = {m: stats.paired_bootstrap(1 / ranks["LoRA"][m].float(), 1 / ranks["LoRA + MRL"][m].float())
                for m in EVAL_DIMS}
tuned_gain = {name: {m: stats.paired_bootstrap(hit10(ranks["pretrained"][m]), hit10(ranks[name][m])) for m in EVAL_DIMS}
              for name in ("LoRA", "LoRA + MRL")}
print("\nLoRA + MRL minus LoRA, paired over the same queries (95% intervals)")
print(f"{'dims':>4s}  {'recall@10 difference':>32s} {'':12s}  {'MRR difference':>32s}")
for m in EVAL_DIMS:
    r, mr = mrl_gain[m], mrl_gain_mrr[m]
    print(f"{m:4d}  {r!s:>32s} {r.verdict():12s}  {mr!s:>32s} {mr.verdict()}")
print("\nfine-tuned minus pretrained, recall@10, paired (95% intervals)")
print(f"{'dims':>4s}  {'LoRA':>32s} {'':12s}  {'LoRA + MRL':>32s}")
for m in EVAL_DIMS:
    a, b = tuned_gain["LoRA"][m], tuned_gain["LoRA + MRL"][m]
    print(f"{m:4d}  {a!s:>32s} {a.verdict():12s}  {b!s:>32s} {b.verdict()}")

# %%
r10 = {name: {m: v["recall@10"] for m, v in metrics.items()} for name, metrics in by_dim.items()}
# truncation's cost, per model: 384 numbers (A) against 64 (B), the same queries
shrink = {name: stats.paired_bootstrap(hit10(ranks[name][384]), hit10(ranks[name][64])) for name in ranks}
# the introduction's figures: the pretrained model from 384 to 64 numbers, a loss far outside the noise
assert f"{shrink['pretrained'].a:.3f} -> {shrink['pretrained'].b:.3f}" == "0.755 -> 0.601"
assert round(-100 * shrink["pretrained"].difference) == 15 and shrink["pretrained"].verdict() == "loss"
assert all(shrink[name].verdict() == "loss" for name in ranks)      # every model loses from 384 to 64
# MRL's gain over plain LoRA at 32 numbers is beyond noise (its interval excludes zero); at 384 it costs nothing measurable
assert mrl_gain[32].verdict() == "gain"
assert mrl_gain[384].verdict() == "within noise"
said = lambda r: "a gain" if r.verdict() == "gain" else "a loss" if r.verdict() == "loss" else "within noise"
pts = lambda r: f"{abs(100 * r.difference):.1f} points [95% CI {-100 * r.high:.1f}, {-100 * r.low:.1f}]"
display(Markdown(
    f"From 384 to 64 numbers, recall@10 drops by {pts(shrink['pretrained'])} for the pretrained model "
    f"({shrink['pretrained'].a:.3f} → {shrink['pretrained'].b:.3f}), by {pts(shrink['LoRA'])} for LoRA "
    f"without MRL and by {pts(shrink['LoRA + MRL'])} with MRL.\n\n"
    "MRL against plain LoRA, paired over the same queries: " +
    "; ".join(f"at {m} numbers {mrl_gain[m].a:.3f} → {mrl_gain[m].b:.3f}, {mrl_gain[m]}, {said(mrl_gain[m])}"
              for m in (32, 48, 64, 384)) + ". "
    f"Fine-tuning itself (LoRA against the pretrained model) at 384 numbers: "
    f"{tuned_gain['LoRA'][384].a:.3f} → {tuned_gain['LoRA'][384].b:.3f}, {tuned_gain['LoRA'][384]}, "
    f"{said(tuned_gain['LoRA'][384])}; at 32 numbers {tuned_gain['LoRA'][32]}, {said(tuned_gain['LoRA'][32])}."))

# %% [markdown]
# ## Two-stage search: shortlist small, re-rank big
#
# `matryoshka.TwoStageIndex` stores the corpus twice: the 64-number prefixes (the shortlist
# index) and the full vectors. A search scores every document on the small index, keeps the best
# `k`, and re-ranks only those `k` at 384 numbers. With `k` equal to the whole corpus the re-rank
# sees every document and the result *is* full-dimension brute force (the tests check it); the
# question is how small `k` can be.
#
# The saving is in the work per query. Brute force over $N$ documents of $D$ numbers costs about
# $ND$ multiply-adds. The two-stage search scores all $N$ documents at $m$ numbers, then $k'$
# candidates at $D$:
#
# $$\underbrace{N m}_{\text{shortlist}} + \underbrace{k' D}_{\text{re-rank}} \quad\text{instead of}\quad N D .$$
#
# With $N$ = 20,506 documents, $D = 384$, $m = 64$ and $k' = 200$, that is about 1.39 million
# instead of 7.87 million, 5.7 times fewer (plus picking the top $k'$, which brute force does
# too). Here is the search (the index built once holds `shortlist`, the corpus at $m$ numbers,
# and `full`, the unit vectors at $D$):

# %%
show(matryoshka.TwoStageIndex.search)
N_BIG, D_FULL, K_BIG = 20_506, 384, 200
print(f"multiply-adds per query, N = {N_BIG:,d}: brute force {N_BIG * D_FULL:,d}; "
      f"two-stage at m = {SHORTLIST_DIM}, k' = {K_BIG}: {N_BIG * SHORTLIST_DIM + K_BIG * D_FULL:,d}")
assert round(N_BIG * D_FULL / (N_BIG * SHORTLIST_DIM + K_BIG * D_FULL), 1) == 5.7

# %% [markdown]
# **What just happened.** Stage 1, `self.first_stage(q, k)` (that is,
# `self.shortlist.scores(q).topk(k)`), scores each query against every document of the small
# index (the $Nm$ term) and keeps the indices of the best `k`. Stage 2 gathers those `k`
# documents' full vectors into one block of shape queries × k × D (`index_select`, whole rows at
# a time: the block `self.full[shortlist]` would give), and takes their dot products with the
# normalised query (`einsum("qd,qkd->qk")`, the $k'D$ term); sorting those scores and mapping
# the positions back through `shortlist.gather` gives document indices in full-dimension order. A document the shortlist missed can never come back,
# which is why `k` trades speed for recall. Queries go through in blocks of `query_batch` so the
# gathered `k × D` block stays small.

# %% tags=["nbval-ignore-output"]
q_emb, d_emb = embeddings["LoRA + MRL"]
index = matryoshka.TwoStageIndex(d_emb, SHORTLIST_DIM)
full_recall = by_dim["LoRA + MRL"][384]["recall@10"]

def seconds(fn, repeats=5):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)

full_unit = torch.nn.functional.normalize(d_emb, dim=-1)
q_unit = torch.nn.functional.normalize(q_emb, dim=-1)
brute_seconds = seconds(lambda: (q_unit @ full_unit.T).topk(10, dim=1))
two_stage = {}
for k in KS:
    result = index.search(q_emb, k, top=10)
    two_stage[k] = {"recall@10": matryoshka.two_stage_recall(result, relevant, ks=(10,))["recall@10"],
                    "seconds": seconds(lambda k=k: index.search(q_emb, k, top=10))}
fig, ax = plt.subplots(figsize=(6, 3.4))
ax.plot([v["seconds"] * 1e3 for v in two_stage.values()], [v["recall@10"] for v in two_stage.values()], "o-",
        label=f"two-stage, shortlist at {SHORTLIST_DIM}")
for k, v in two_stage.items():
    ax.annotate(f"k={k}", (v["seconds"] * 1e3, v["recall@10"]), fontsize=8, textcoords="offset points", xytext=(4, -10))
ax.plot([brute_seconds * 1e3], [full_recall], "s", color="black", label="brute force, 384")
ax.margins(x=0.12, y=0.1)      # room for the points' labels
ax.set(xlabel=f"time for all {len(relevant)} queries (ms)", ylabel="test recall@10 (fraction of queries)",
       title=f"Two-stage search against brute force: recall@10 and time\n"
             f"(shortlist sizes k, {n_docs} documents)")
ax.legend()
plt.show()
print(f"brute force at 384: recall@10 {full_recall:.3f}, {brute_seconds * 1e3:.1f} ms")
for k, v in two_stage.items():
    print(f"k = {k:4d}: recall@10 {v['recall@10']:.3f}, {v['seconds'] * 1e3:.1f} ms, "
          f"{brute_seconds / v['seconds']:.1f}x brute force")

# %%
exhaustive = index.search(q_emb, n_docs, top=10)     # k = the whole corpus: brute force exactly
assert matryoshka.two_stage_recall(exhaustive, relevant, ks=(10,))["recall@10"] == full_recall
recall_by_k = {k: round(v["recall@10"], 3) for k, v in two_stage.items()}
print("recall@10 by shortlist size:", recall_by_k)
enough = [k for k in KS if two_stage[k]["recall@10"] >= 0.99 * full_recall]
print(f"smallest shortlist within 1% of brute force: k = {enough[0]} of {n_docs} documents")
assert enough and enough[0] <= 100      # a shortlist of at most 100 recovers full-size search

# %% [markdown]
# At this corpus size (about 1,500 documents) a full-size scan is already a millisecond-scale
# matrix product: the two-stage search gains little or nothing even at the smallest `k` (these
# timings move from run to run) and is slower beyond, since it pays for its second stage
# (gathering `k` full vectors per query); it wins once the corpus is large. `benchmarks/mrl_search.py` measures it on all 20,506 documents and on a million synthetic
# vectors (below).
#
# ### Index bytes per vector
#
# The shortlist index can also be quantised: int8 (one byte per number plus a float32 scale per
# vector) or one sign bit per number (binary; scored by Hamming distance). Each stores the same
# 64-number prefixes; the re-rank stays at full float32.

# %%
bytes_per_vector = {f"float32, {m}": matryoshka.build_index(d_emb[:1], m, "float32").nbytes for m in (384, 64)}
for kind in ("int8", "binary"):
    bytes_per_vector[f"{kind}, {SHORTLIST_DIM}"] = matryoshka.build_index(d_emb[:1], SHORTLIST_DIM, kind).nbytes
quantised_recall = {}
for kind in matryoshka.INDEX_TYPES:
    result = matryoshka.TwoStageIndex(d_emb, SHORTLIST_DIM, kind).search(q_emb, 100, top=10)
    quantised_recall[kind] = matryoshka.two_stage_recall(result, relevant, ks=(10,))["recall@10"]
for name, b in bytes_per_vector.items():
    print(f"{name:14s} {b:5d} bytes per vector")
# two decimals: an AVX2 and an AVX-512 CPU train slightly different embeddings, and one query of
# 506 crossing rank 10 moves a recall by 0.002
print(f"two-stage recall@10 with k=100 from a {SHORTLIST_DIM}-number shortlist index: " +
      ", ".join(f"{kind} {r:.2f}" for kind, r in quantised_recall.items()) + f" (brute force {full_recall:.2f})")
assert bytes_per_vector == {"float32, 384": 1536, "float32, 64": 256, "int8, 64": 68, "binary, 64": 8}
assert quantised_recall["int8"] >= quantised_recall["float32"] - 0.01

# %% [markdown]
# <a id="claim-04-search-speed"></a>
#
# ## The search at full scale (benchmark)
#
# `benchmarks/mrl_search.py` trains the same kind of LoRA + MRL model on 2,048 pairs, embeds the
# 506 test queries against all 20,506 documents, and times brute force against two-stage search
# for shortlist dimensions 32, 64, 96, 128 and shortlists of 10 to 1,000; then it times the chosen
# setting on a million synthetic unit vectors (timing only: random vectors have no Matryoshka
# structure, so their recall means nothing). It also times the first stage alone (the shortlist
# scores and their top-k, no re-rank), the least work any two-stage search does, in both modes
# (the crosses below). For each setting it runs brute force, the search and the first stage side
# by side in 9 rounds; each speed-up is the median of the rounds' ratios, with a 95% interval from
# resampling the rounds (`course_lib.stats.speedup`). Its committed results:

# %%
search = benchmark_result("mrl_search")
print(f"benchmark run: {search['command']}\n  ({search['date'][:10]}, {search['threads']} CPU threads, "
      f"{search['machine']['cpu_capability']} instructions)")
bf = search["brute_force"]
print(f"brute force, {search['n_queries']} queries x {search['n_docs']} documents at 384: recall@10 {bf['recall@10']:.3f}; "
      f"{bf['seconds_batched'] * 1e3:.0f} ms for all queries at once, {bf['seconds_per_query'] * 1e3:.2f} ms per query one at a time")
fig, axes = plt.subplots(1, 2, figsize=(10, 3.9), sharey=True, layout="constrained")
for ax, mode, title in [(axes[0], "per_query", "one query at a time"), (axes[1], "batched", "all queries at once")]:
    for dim in sorted({s["dim"] for s in search["two_stage"]}):
        rows = [s for s in search["two_stage"] if s["dim"] == dim]
        line, = ax.plot([s[f"speedup_{mode}"] for s in rows], [s["recall@10"] for s in rows], "o-", label=f"shortlist at {dim}")
        # the first stage alone: the most any re-rank could leave
        ax.plot([s[f"limit_{mode}"] for s in rows], [s["recall@10"] for s in rows], "x:", color=line.get_color())
    ax.axhline(0.99 * bf["recall@10"], color="gray", ls=":", label="99% of brute force")
    ax.axvline(1, color="black", lw=0.8)
    ax.set_xscale("log")
    ticks = [t for t in (0.25, 0.5, 1, 2, 4, 8, 16) if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    if len(ticks) < 3:         # a narrow range (within a factor of 2 or so): finer ticks
        ticks = [t for t in (0.5, 0.75, 1, 1.25, 1.5, 2, 2.5, 3, 4) if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t:g}x" for t in ticks])
    ax.minorticks_off()        # a log axis would also label its minor ticks, on top of ours
    ax.set(xlabel="speed-up over brute force (times, log scale)", title=f"{title} (benchmark)")
axes[0].set_ylabel("recall@10 (fraction of queries)")
fig.suptitle(f"Two-stage search against brute force, {search['n_docs']:,d} documents: recall@10 and speed-up")
axes[0].legend(fontsize=8)
axes[1].legend(handles=[plt.Line2D([], [], color="gray", marker="o", label="two-stage search"),
                        plt.Line2D([], [], color="gray", marker="x", ls=":", label="its first stage alone")], fontsize=8)
plt.show()
def interval(setting: dict, key: str) -> str:
    """A speed-up's 95% interval over the benchmark's paired rounds, as printed."""
    i = setting["intervals"][key]
    return f"95% interval {i['low']:.2f}-{i['high']:.2f}, {i['rounds']} rounds"


for mode, label in [("per_query", "one at a time"), ("batched", "all at once")]:
    b = search["best_at_99pct"][mode]
    print(f"fastest setting within 1% of brute force, {label}: shortlist at {b['dim']}, k = {b['k']}: "
          f"recall@10 {b['recall@10']:.3f}, {b[f'speedup_{mode}']:.2f} times brute force's speed ({interval(b, f'speedup_{mode}')})")
good = [s for s in search["two_stage"] if s["recall@10"] >= 0.99 * bf["recall@10"]]
limit = max(good, key=lambda s: s["limit_batched"])
print(f"the first stage alone, all at once, within 1% of brute force's recall: at most {limit['limit_batched']:.2f}x faster "
      f"(shortlist at {limit['dim']}, k = {limit['k']}; {interval(limit, 'limit_batched')}), whatever the re-rank costs")
limit_pq = max(good, key=lambda s: s["limit_per_query"])
print(f"the first stage alone, one at a time, within 1% of brute force's recall: at most {limit_pq['limit_per_query']:.2f}x faster "
      f"(shortlist at {limit_pq['dim']}, k = {limit_pq['k']}; {interval(limit_pq, 'limit_per_query')})")
# one query's first stage at k = 10 at each prefix length: a straight line through (MB read, ms)
tens = [s for s in search["two_stage"] if s["k"] == 10]
mb_read = torch.tensor([search["n_docs"] * s["dim"] * 4 / 1e6 for s in tens], dtype=torch.float64)
ms = torch.tensor([s["seconds_per_query_first_stage"] * 1e3 for s in tens], dtype=torch.float64)
slope, fixed_ms = torch.linalg.lstsq(torch.stack([mb_read, torch.ones_like(mb_read)], 1), ms[:, None]).solution[:, 0].tolist()
print(f"one query's first stage, k = 10, at {', '.join(str(s['dim']) for s in tens)} numbers: "
      f"{', '.join(f'{v:.2f}' for v in ms.tolist())} ms = {fixed_ms:.2f} ms fixed + the index's bytes at {1 / slope:.0f} GB/s; "
      f"brute force {bf['seconds_per_query'] * 1e3:.2f} ms, {bf['seconds_per_query'] / (fixed_ms / 1e3):.1f}x the fixed cost")
syn = search["synthetic_timing_only"]
print(f"on {syn['n_docs']:,d} synthetic vectors (timing only), shortlist at {syn['dim']}, k = {syn['k']}: "
      f"one at a time {syn['seconds_per_query_brute_force'] * 1e3:.1f} ms -> {syn['seconds_per_query_two_stage'] * 1e3:.1f} ms "
      f"per query ({syn['speedup_per_query']:.2f}x, {interval(syn, 'speedup_per_query')}); "
      f"{syn['n_queries']} at once {syn['seconds_batched_brute_force']:.2f} s -> {syn['seconds_batched_two_stage']:.2f} s "
      f"({syn['speedup_batched']:.2f}x, {interval(syn, 'speedup_batched')}); first stage alone "
      f"{syn['seconds_per_query_first_stage'] * 1e3:.1f} ms one at a time ({syn['limit_per_query']:.2f}x), "
      f"{syn['seconds_batched_first_stage']:.2f} s at once ({syn['limit_batched']:.2f}x)")

# %% [markdown]
# How the queries arrive decides the answer, and so does the CPU. **One at a time**, as a search
# service receives them, brute force reads the whole corpus for every query (20,506 × 1,536 bytes,
# 31 MB). On the benchmark's CPU that took 0.77 ms a query, 41.0 GB/s: the corpus fits in this Intel
# Xeon's last-level cache (480 MiB, as the benchmark records the machine) and stays there between
# queries. A shortlist reads a third or less of those bytes, but here that buys little: at k ≤ 50
# the two-stage search took 0.37-0.59 ms a query at shortlist sizes from 32 to 128 numbers (at most
# 2.12× faster than brute force). The first stage alone says why. One query's first stage at k = 10
# took 0.26, 0.27, 0.34 and 0.40 ms at 32, 64, 96 and 128 numbers: a straight line through them is
# **0.20 ms** of fixed cost (a top-k over all 20,506 scores, whatever the prefix length, and each
# call's own overhead, the matrix product's included) plus the index's bytes at 54 GB/s (brute force
# reads at 41). So a first stage that read nothing at all would still be only 3.9× faster than brute
# force, short of the target; timed alone, at 99% of brute force's recall, it is at most **2.2×
# faster** (96 numbers, k = 50; 95% interval 2.02-2.25), before any re-rank. The fastest whole
# search within 1% of brute force's recall@10 (the same setting, which finds exactly brute force's
# 0.626) is **1.5× faster** (1.46-1.59), far short of the target we set (at least 4×). The 1% line
# turns on a few queries: it asks for 314 of the 317 queries brute force finds, and 128 numbers at k
# = 20 finds exactly 314. Until the evening before this run the model the benchmark trains landed a
# few queries differently in each run, as each drew its adapters' starting values at random (torch
# seeds its generator anew in every process; the script now seeds them): two runs that day on this
# machine had brute force at 0.617 and 0.626, and their best settings within 1% at 1.1× and 0.89×
# (the benchmarks page gives them, and the AMD EPYC's run, where brute force read the corpus from
# main memory and the same search was several times faster, past the target); the seeded runs since,
# this one among them, found the same recall@10 at every setting. On a million synthetic vectors,
# 1.5 GB, which no cache holds, the saving comes back in part: 63.6 ms to 19.9 ms a query (3.2×,
# 3.13-3.25, at 96 numbers, k = 50), less than the 4× fewer bytes, as brute force reads at 24.1 GB/s
# and the shortlist stage at 19.3; its first stage alone takes 19.8 ms of those 19.9 (3.2× faster
# than brute force), so there too the first stage sets the limit, and with a quarter of the bytes no
# float32 shortlist at 96 numbers could pass 4×. **All 506 queries at once**, brute force is one
# matrix product that reads the corpus once for all of them: the best setting within 1% (128
# numbers, k = 20) is 1.4× faster (1.39-1.60), and 2.1× on a million vectors (2.03-2.09): short of
# the target both times.
#
# Batched too, the limit is the first stage, not the re-rank. Timed alone, without any re-rank,
# the first stage is at most **2.0× faster** than brute force at 99% of its recall (128 numbers,
# k = 20; 1.82-2.11; 2.1× on a million vectors), so no re-rank, however fast, could reach 4× here.
# It still scores every (query, document) pair: at 128 numbers each score takes a third of the
# multiplications, and the matrix product alone is 3.5× faster than brute force, but the top-k of
# every row costs the same at every size, and more for a longer list. The shortlists that would
# leave room need long lists to keep recall (k = 200 at 64 numbers, k = 1,000 at 32), and ranking
# and re-ranking that many costs more than the smaller product saves. A batched search faster
# than a matrix product needs a first stage that does not score every document (an inverted-file
# or graph index), beyond this chapter. These timings come from a 2-core machine. Each interval
# says how far this run's 9 rounds leave its speed-up; between runs a machine's speed drifts by
# more: the run six hours before this one, with the same search, gave 1.38× one at a time, below
# this run's interval, and 1.50× at once, inside it (the run the evening before, with the previous
# re-rank, 1.28× and 1.43×). Read them as "about level" or "several-fold", not to the decimal.
#
# A binary shortlist index at 64 numbers (8 bytes per vector) loses far more than it saves here
# (recall@10 0.486 at k = 200); int8 (68 bytes) stays within one query of float32 at every
# setting. Note also that recall@10 need not grow with k: a larger shortlist admits documents that
# the full-size score ranks above the right one (at 96 numbers, k = 100 found 0.628 and k = 200
# 0.625). Only k = the whole corpus is guaranteed to equal brute force.
#
# The seeds' own two-stage figures (1,000 candidates shortlisted in 20 ms and re-ranked in 50 ms:
# 70 ms against 100 ms without MRL) come without a corpus size or hardware and cannot be
# reproduced; the shape of the claim, a faster search at nearly the same recall, holds one query
# at a time where brute force waits on memory (3.2× on the million vectors here, and on the corpus
# itself on a CPU whose cache does not hold it), and little where the corpus sits in cache (1.5×
# here; 1.1× and 0.89× in the two unseeded runs before).

# %%
b_pq, b_b = search["best_at_99pct"]["per_query"], search["best_at_99pct"]["batched"]
ends = lambda setting, key: tuple(round(setting["intervals"][key][end], 2) for end in ("low", "high"))
assert search["rounds"] == 9 and all(s["intervals"][key]["rounds"] == 9 for s in good + [syn] for key in s["intervals"])
assert (b_pq["dim"], b_pq["k"], b_pq["speedup_per_query"], round(b_pq["recall@10"], 3)) == (96, 50, 1.5, 0.626)
assert ends(b_pq, "speedup_per_query") == (1.46, 1.59) and ends(b_b, "speedup_batched") == (1.39, 1.60)
assert (b_b["dim"], b_b["k"], b_b["speedup_batched"]) == (128, 20, 1.44)
assert (limit["dim"], limit["k"], limit["limit_batched"]) == (128, 20, 1.96) and round(bf["seconds_batched"] / limit["seconds_batched_scores_only"], 1) == 3.5
assert ends(limit, "limit_batched") == (1.82, 2.11)
assert (limit_pq["dim"], limit_pq["k"], limit_pq["limit_per_query"]) == (96, 50, 2.16) and ends(limit_pq, "limit_per_query") == (2.02, 2.25)
assert [round(v, 2) for v in ms.tolist()] == [0.26, 0.27, 0.34, 0.40] and round(fixed_ms, 2) == 0.20 and round(1 / slope) == 54
assert round(bf["seconds_per_query"] / (fixed_ms / 1e3), 1) == 3.9      # a first stage reading nothing: short of the target
assert round(bf["recall@10"], 3) == 0.626 and b_pq["recall@10"] == bf["recall@10"] and round(bf["seconds_per_query"] * 1e3, 2) == 0.77
assert round(search["n_docs"] * bf["bytes_per_vector"] / bf["seconds_per_query"] / 1e9, 1) == 41.0    # GB/s, one query at a time
per_query_ms = [s["seconds_per_query"] * 1e3 for s in search["two_stage"] if s["k"] <= 50]
assert (round(min(per_query_ms), 2), round(max(per_query_ms), 2)) == (0.37, 0.59)
assert max(s["speedup_per_query"] for s in search["two_stage"] if s["k"] <= 50) == 2.12
assert 1.38 < ends(b_pq, "speedup_per_query")[0] and ends(b_b, "speedup_batched")[0] < 1.50 < ends(b_b, "speedup_batched")[1]   # the run before
assert search["machine"]["cpu_model"].startswith("Intel(R) Xeon(R)")   # the CPU the benchmark ran on
caches = search["machine"]["cpu_caches_bytes"]   # the first CPU's caches, from the operating system
assert caches["L3"] == 480 * 2**20 > search["n_docs"] * bf["bytes_per_vector"]   # the 31 MB corpus fits
assert (syn["dim"], syn["k"], syn["speedup_per_query"], syn["speedup_batched"], syn["limit_batched"], syn["limit_per_query"]) == (96, 50, 3.17, 2.07, 2.11, 3.23)
assert ends(syn, "speedup_per_query") == (3.13, 3.25) and ends(syn, "speedup_batched") == (2.03, 2.09)
assert (round(syn["seconds_per_query_brute_force"] * 1e3, 1), round(syn["seconds_per_query_two_stage"] * 1e3, 1), round(syn["seconds_per_query_first_stage"] * 1e3, 1)) == (63.6, 19.9, 19.8)
assert syn["n_docs"] == 1_000_000 and search["n_docs"] == 20_506   # 1.5 GB and 0.38 GB of float32 a query at 384 and 96 numbers
gb_per_s = [n_bytes / syn[f"seconds_per_query_{kind}"] / 1e9 for n_bytes, kind in ((syn["n_docs"] * 384 * 4, "brute_force"), (syn["n_docs"] * syn["dim"] * 4, "two_stage"))]
assert [round(v, 1) for v in gb_per_s] == [24.1, 19.3]   # the shortlist stage's bytes alone: its true rate is higher
at = {(s["dim"], s["k"]): s for s in search["two_stage"]}
hits = lambda setting: round(at[setting]["recall@10"] * search["n_queries"])   # queries whose document is in the top 10
assert (hits((128, 20)), round(bf["recall@10"] * search["n_queries"])) == (314, 317) and 313 < 0.99 * 317 <= 314
assert round(at[64, 200]["recall@10_binary"], 3) == 0.486
assert all(round(abs(s["recall@10_int8"] - s["recall@10"]) * search["n_queries"]) <= 1 for s in search["two_stage"])   # queries
assert at[96, 100]["recall@10"] > at[96, 200]["recall@10"] and [round(at[96, k]["recall@10"], 3) for k in (100, 200)] == [0.628, 0.625]          # a larger shortlist can lose a hit
assert at[64, 200]["recall@10"] >= 0.99 * bf["recall@10"] > at[64, 100]["recall@10"]
assert at[32, 1000]["recall@10"] >= 0.99 * bf["recall@10"] > at[32, 500]["recall@10"]

# %% [markdown]
# <a id="claim-04-combination"></a>
#
# ## The seeds' combination table, at this scale (benchmark)
#
# The seeds' headline table trains CLIP on Flickr30k for three epochs five ways. We reproduce its
# *comparisons* on code search with MiniLM: `benchmarks/mrl_combination.py` trains each method on
# the same 2,048 pairs in the same order (batch 64; LoRA r = 16; GradCache chunk 16; MRL over
# 384…32), measures one training step's memory by chapter 03's exact accounting, and scores the
# test split against 2,506 documents at 384 and at 64 numbers.

# %%
combo = benchmark_result("mrl_combination")
print(f"benchmark run: {combo['command']}\n  ({combo['date']}, {combo['seconds'] / 60:.0f} min on {combo['threads']} CPU threads)")
mib = lambda b: b / 2**20
rows_md = []
for name, m in combo["methods"].items():
    s384, s64, seed = m["scores"]["384"], m["scores"]["64"], combo["seeds_flickr30k"][name]
    rows_md.append(f"| {name} | {s384['recall@1']:.3f} | {s384['recall@10']:.3f} | {s64['recall@1']:.3f} | "
                   f"{s64['recall@10']:.3f} | {m['trainable']:,d} | {mib(m['memory']['total']):.0f} | "
                   f"{m['epoch_seconds'] / 60:.1f} | {seed['recall@1']:.1%} | {seed['memory_gb']} GB | {seed['hours']} h |")
u = combo["untrained"]
rows_md.append(f"| pretrained, no training | {u['384']['recall@1']:.3f} | {u['384']['recall@10']:.3f} | "
               f"{u['64']['recall@1']:.3f} | {u['64']['recall@10']:.3f} | 0 | | | | | |")
display(Markdown(
    f"Ours: {combo['n_queries']} queries, {combo['n_docs']} documents; memory of one training step (MiB); "
    f"time per epoch of the {combo['train_pairs']:,d} training pairs (min, 2 CPU cores). "
    "Seeds: Flickr30k, CLIP, 3 epochs on a GPU.\n\n"
    "| method | R@1 384 | R@10 384 | R@1 64 | R@10 64 | trainable | step memory | min/epoch | seeds R@1 | seeds memory | seeds time |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows_md)))

# %% [markdown]
# How far apart must two numbers be to differ? With 506 test queries, one query is 0.2 points
# of recall, and the standard error of a single recall near 0.4 is about 2 points
# ($\sqrt{0.4 \cdot 0.6 / 506}$); the seeds' accuracy differences (0.1 to 1.8 points) are of that
# size too. The benchmark keeps each test query's rank for every model at every dimension, so
# each difference below is *paired* over the same queries, with its seeded 95% bootstrap interval,
# as for the live run above. Two methods answer mostly the same queries right, so the paired
# interval is much narrower than the two standard errors would suggest:

# %%
# the benchmark kept each test query's rank at every dimension for every model (the pretrained one
# too) and recorded the paired differences: b minus a over the same queries, with a seeded 95%
# bootstrap interval and its verdict
paired = {(c["a"], c["b"], c["dim"]): c for c in combo["comparisons"]}
compared = [("pretrained", "LoRA", 384, 10), ("pretrained", "full fine-tuning", 384, 10),
            ("full fine-tuning", "LoRA", 384, 10), ("full fine-tuning", "LoRA", 384, 1),
            ("LoRA", "LoRA + GradCache", 384, 1), ("LoRA", "LoRA + MRL", 384, 1), ("LoRA", "LoRA + MRL", 384, 10),
            ("LoRA", "LoRA + MRL", 128, 10), ("LoRA", "LoRA + MRL", 64, 10), ("LoRA", "LoRA + MRL", 32, 10),
            ("LoRA + GradCache", "LoRA + GradCache + MRL", 384, 10),
            ("LoRA + GradCache", "LoRA + GradCache + MRL", 64, 10),
            ("LoRA + GradCache", "LoRA + GradCache + MRL", 32, 10)]
score = lambda name, dim, k: (combo["untrained"] if name == "pretrained" else combo["methods"][name]["scores"])[
    str(dim)][f"recall@{k}"]                       # as the table above shows them
diffs = {}
print(f"benchmark: B minus A over the same {combo['n_queries']} queries, with its paired 95% interval")
for a, b, dim, k in compared:
    d = paired[a, b, dim][f"recall@{k}"]
    diffs[a, b, dim, k] = d["difference"], d["low"], d["high"], d["verdict"]
    print(f"{b:>22s} - {a:<16s} R@{k:<2d} at {dim:3d}: {score(a, dim, k):.3f} -> {score(b, dim, k):.3f}  "
          f"{stats.format_difference(d['difference'], d['low'], d['high'])}  {d['verdict']}")
# time: the table's minutes per epoch are five runs timed one after the other; the benchmark also
# stepped all five methods side by side, the same batch in each round, and kept each method's
# time per step over LoRA's in the same round
side = combo["step_times"]
print(f"\nbenchmark: seconds per step over LoRA's, {side['rounds']} rounds of one step of each method on the same "
      f"batch of {side['batch']}, with its 95% interval over rounds")
for name, t in side["over_lora"].items():
    print(f"{name:>22s}: {t['ratio']:.2f}x [{t['low']:.2f}, {t['high']:.2f}]  {t['verdict']}")

# %% [markdown]
# Every trained model is a gain over the pretrained one at 384 numbers (LoRA: recall@10 0.727 →
# 0.790, +0.063 [+0.038, +0.091]). Between the methods most differences lie within noise; the
# ones that do not are MRL's. Their conclusions, one by one, against this table:
#
# * **LoRA matches full fine-tuning** (71.0% vs 71.2%): *holds*. R@10 0.790 against 0.796
#   (−0.006 [−0.022, +0.010]), R@1 0.399 against 0.389 (+0.010 [−0.012, +0.032]): within noise,
#   with 147,456 trainable parameters instead of 22.7 million. "Matches" as far as 506 queries
#   tell: the interval still allows LoRA to be 2.2 points of R@10 worse, so the benchmark's
#   figure for a margin of 2 points is met by the difference and missed by its interval.
# * **LoRA cuts memory threefold** (8 GB vs 24 GB): *not here*: 2,458 MiB against 3,425 MiB, a
#   factor 1.4. For a 22.7M-parameter encoder, the weights, gradients and AdamW state of full
#   fine-tuning are only 87 + 86 + 172 MiB; the activations saved at batch 64 dominate both (3,080
#   MiB for full fine-tuning, 2,369 MiB for LoRA, which needs no saved inputs for the frozen
#   weights' gradients). LoRA's saving grows with the model's size relative to its activations.
# * **GradCache costs almost no accuracy** (70.9% vs 71.0%): *holds*, and must: it computes the same
#   gradient (chapter 03). R@1 0.395 against 0.399 (−0.004 [−0.020, +0.010]): the dropout masks
#   are drawn in another order (chunk by chunk), and the difference is within noise.
# * **GradCache saves memory** (5 GB vs 8 GB, −37%): *holds, and more*: 520 MiB against 2,458 MiB
#   (−79%) with chunk 16 of a batch of 64; the saving is set by the batch-to-chunk ratio, not a
#   fixed percentage. It costs more time than the seeds say (+10%): timed side by side, a
#   GradCache step takes 1.48 times LoRA's [1.45, 1.51]; the extra forward pass without gradients
#   and the chunking (chapter 03) add about half a LoRA step, whose backward pass is light (no
#   gradients for the frozen weights). The table's minutes per epoch, one run of each method after the other, say +51% in this run
#   (6.7 against 4.4), and said +60% and +28% in two earlier runs on the same machine, with the
#   same scores to the last digit each time: single runs move that much. The benchmark's target,
#   at most 1.5 times LoRA's time, is met by the side-by-side ratio and missed by its interval's
#   upper end: within noise of the target.
# * **MRL adds accuracy at full dimension** (72.8% vs 71.0%): *wrong here*. At 384 numbers LoRA +
#   MRL has R@1 0.371 against 0.399, −0.028 [−0.051, −0.004], a loss; R@10 0.785 against 0.790,
#   within noise. With GradCache, MRL's R@10 at 384 numbers is lower too: 0.771 against 0.792,
#   −0.022 [−0.042, −0.004]. At this budget the losses on the prefixes cost the full vector a
#   little.
# * **MRL adds accuracy at low dimension**: *holds at 32 numbers, within noise from 64 up*. At 32
#   numbers R@10 is 0.547 against 0.514 (+0.034 [+0.008, +0.057]), and 0.555 against 0.514 with
#   GradCache (+0.042 [+0.016, +0.067]); at 64 numbers 0.672 against 0.656 (+0.016 [−0.008,
#   +0.040]), and at 128 no difference. The live run above agrees: a gain at 32 numbers. At this
#   training budget (32 steps) MRL has only begun to reorganise the prefixes.
# * **MRL costs memory** (10 GB vs 8 GB): *wrong*. 2,459 MiB against 2,458 MiB: the extra losses
#   are computed on slices of embeddings already in memory.
# * **MRL costs time** (2.5 h vs 2.0 h): *not here*. Side by side, a LoRA + MRL step takes 1.00
#   times LoRA's [0.97, 1.02], within noise, and the interval excludes the seeds' +25%: MRL adds
#   only five cheap losses on prefixes of the same embeddings. The table's single runs scatter
#   around that: 4.2 against 4.4 minutes per epoch in this run (5% less), 2% and 6% more in two
#   earlier runs on the same machine, 7% less on 2026-12-02. The live training above (two runs,
#   one after the other) shows the same: two times per step equal up to the machine's load.
# * **All three together: 6 GB and the fastest of the MRL runs** (2.1 h vs 2.5 h): the memory
#   *holds* (520 MiB, GradCache's), the time *does not*: side by side, 1.48 times LoRA's step
#   [1.45, 1.51] against 1.00 for LoRA + MRL (6.5 against 4.2 minutes per epoch in the table);
#   GradCache's extra forward pass cannot make a run faster than the same run without it.

# %%
m = combo["methods"]
r = lambda name, dim, k: m[name]["scores"][str(dim)][f"recall@{k}"]
mem = lambda name: round(m[name]["memory"]["total"] / 2**20)
# the figures quoted above, from the committed benchmark results
f3 = lambda *xs: [f"{x:.3f}" for x in xs]          # as the table prints them
assert f3(r("LoRA", 384, 10), r("full fine-tuning", 384, 10), r("LoRA", 384, 1), r("full fine-tuning", 384, 1)) == ["0.790", "0.796", "0.399", "0.389"]
assert f3(combo["untrained"]["384"]["recall@10"]) == ["0.727"]
assert [round(m[n]["memory"]["activations_peak"] / 2**20) for n in ("full fine-tuning", "LoRA")] == [3080, 2369]
assert (mem("full fine-tuning"), mem("LoRA"), mem("LoRA + GradCache"), mem("LoRA + MRL"), mem("LoRA + GradCache + MRL")) == (3425, 2458, 520, 2459, 520)
assert round(m["LoRA + GradCache"]["epoch_seconds"] / m["LoRA"]["epoch_seconds"] - 1, 2) == 0.51
assert [f'{m[n]["epoch_seconds"] / 60:.1f}' for n in ("LoRA + GradCache", "LoRA")] == ["6.7", "4.4"]
over_lora = lambda name: [f"{side['over_lora'][name][x]:.2f}" for x in ("ratio", "low", "high")]   # as printed
assert over_lora("LoRA + GradCache") == ["1.48", "1.45", "1.51"] and side["over_lora"]["LoRA + GradCache"]["verdict"] == "slower"
assert over_lora("LoRA + GradCache + MRL")[0] == "1.48" and over_lora("LoRA + MRL") == ["1.00", "0.97", "1.02"]
assert side["over_lora"]["LoRA + MRL"]["verdict"] == "within noise" and side["over_lora"]["LoRA + MRL"]["high"] < 1.25
# the target of at most 1.5 times LoRA's time: one run's epochs miss it, the side-by-side ratio meets it, its interval does not
assert {"FIGURE gradcache_over_lora_epoch_time: 1.51 (target <= 1.5) missed",
        "FIGURE gradcache_over_lora_step_time_paired: 1.48 (target <= 1.5) met",
        "FIGURE gradcache_over_lora_step_time_paired_95pct_high: 1.51 (target <= 1.5) missed"} <= set(combo["figures"])
assert f3(r("LoRA + GradCache", 384, 1), r("LoRA + MRL", 384, 1), r("LoRA + MRL", 384, 10)) == ["0.395", "0.371", "0.785"]
assert f3(r("LoRA + GradCache", 384, 10), r("LoRA + GradCache + MRL", 384, 10)) == ["0.792", "0.771"]
assert f3(*(r(n, 32, 10) for n in ("LoRA", "LoRA + MRL", "LoRA + GradCache", "LoRA + GradCache + MRL"))) == ["0.514", "0.547", "0.514", "0.555"]
assert f3(r("LoRA + MRL", 64, 10), r("LoRA", 64, 10)) == ["0.672", "0.656"]
assert [f'{m[n]["epoch_seconds"] / 60:.1f}' for n in ("LoRA", "LoRA + MRL", "LoRA + GradCache + MRL")] == ["4.4", "4.2", "6.5"]
assert f'{m["LoRA + MRL"]["epoch_seconds"] / m["LoRA"]["epoch_seconds"] - 1:.0%}' == "-5%"
f3s = lambda key: [f"{x:+.3f}" for x in diffs[key][:3]]   # a difference and its interval, as printed
assert f3s(("pretrained", "LoRA", 384, 10)) == ["+0.063", "+0.038", "+0.091"]
assert f3s(("full fine-tuning", "LoRA", 384, 10)) == ["-0.006", "-0.022", "+0.010"]
# a margin of 2 points: met by the difference, missed by its interval's lower end
assert {"FIGURE lora_minus_full_recall10_at_384: -0.0059 (target >= -0.02) met",
        "FIGURE lora_minus_full_recall10_at_384_95pct_low: -0.0217 (target >= -0.02) missed"} <= set(combo["figures"])
assert f3s(("full fine-tuning", "LoRA", 384, 1)) == ["+0.010", "-0.012", "+0.032"]
assert f3s(("LoRA", "LoRA + GradCache", 384, 1)) == ["-0.004", "-0.020", "+0.010"]
assert f3s(("LoRA", "LoRA + MRL", 384, 1)) == ["-0.028", "-0.051", "-0.004"]
assert f3s(("LoRA + GradCache", "LoRA + GradCache + MRL", 384, 10)) == ["-0.022", "-0.042", "-0.004"]
assert f3s(("LoRA", "LoRA + MRL", 32, 10)) == ["+0.034", "+0.008", "+0.057"]
assert f3s(("LoRA + GradCache", "LoRA + GradCache + MRL", 32, 10)) == ["+0.042", "+0.016", "+0.067"]
assert f3s(("LoRA", "LoRA + MRL", 64, 10)) == ["+0.016", "-0.008", "+0.040"]
# the verdicts: gains over the pretrained model; between methods, only MRL's differences go beyond noise
verdict = lambda key: diffs[key][3]
assert verdict(("pretrained", "LoRA", 384, 10)) == verdict(("pretrained", "full fine-tuning", 384, 10)) == "gain"
assert all(verdict(key) == "within noise" for key in diffs if "MRL" not in key[1] and key[0] != "pretrained")
assert [verdict(("LoRA", "LoRA + MRL", dim, 10)) for dim in (384, 128, 64, 32)] == ["within noise"] * 3 + ["gain"]
assert verdict(("LoRA", "LoRA + MRL", 384, 1)) == verdict(("LoRA + GradCache", "LoRA + GradCache + MRL", 384, 10)) == "loss"
assert verdict(("LoRA + GradCache", "LoRA + GradCache + MRL", 64, 10)) == "within noise"
assert verdict(("LoRA + GradCache", "LoRA + GradCache + MRL", 32, 10)) == "gain"
assert m["LoRA + GradCache"]["memory"]["total"] < 0.25 * m["LoRA"]["memory"]["total"]      # GradCache: a fraction of the memory
assert abs(m["LoRA + MRL"]["memory"]["total"] / m["LoRA"]["memory"]["total"] - 1) < 0.01  # MRL costs no memory
assert m["LoRA + GradCache + MRL"]["epoch_seconds"] > m["LoRA + MRL"]["epoch_seconds"]      # all three is not faster

# %% [markdown]
# ## What we measured

# %%
display(Markdown(f'''
| quantity | measured here |
|---|---|
| recall@10 at 384 → 64 → 32 numbers, LoRA without MRL | {r10["LoRA"][384]:.3f} → {r10["LoRA"][64]:.3f} → {r10["LoRA"][32]:.3f} |
| the same with MRL | {r10["LoRA + MRL"][384]:.3f} → {r10["LoRA + MRL"][64]:.3f} → {r10["LoRA + MRL"][32]:.3f} |
| MRL minus plain LoRA, recall@10 at 32 / 64 / 384 numbers (paired 95% interval) | {mrl_gain[32]} / {mrl_gain[64]} / {mrl_gain[384]} |
| pretrained model, recall@10 at 64 minus at 384 numbers (paired 95% interval) | {shrink["pretrained"]} |
| smallest shortlist (at {SHORTLIST_DIM} numbers) within 1% of brute force, {n_docs} documents | k = {enough[0]} |
| index bytes per vector: float32 384 / float32 64 / int8 64 / binary 64 | 1536 / 256 / 68 / 8 |
| two-stage speed-up at ≥ 99% of brute-force recall@10, {search["n_docs"]:,d} documents, one query at a time / all at once (benchmark) | {search["best_at_99pct"]["per_query"]["speedup_per_query"]:.2f}x / {search["best_at_99pct"]["batched"]["speedup_batched"]:.2f}x |
| one query at a time on {syn["n_docs"]:,d} synthetic vectors (benchmark, timing only) | {syn["speedup_per_query"]:.1f}x |
'''))


# %% [markdown]
# ## Exercises
#
# Each exercise has a check cell right after it; the solution is in the cell between
# `BEGIN SOLUTION` and `END SOLUTION` (on the site it is on the Solutions page).
#
# **Exercise 1 (build it): the Matryoshka loss.** Write
# `matryoshka_loss(q, d, dims, weights, scale=20.0)`:
#
# * `q`, `d`: float tensors of shape (n, D), row `i` of `d` the document that matches query `i`
#   (not necessarily unit length);
# * `dims`: the nested dimensions, in any order; `weights`: one weight per dimension,
#   `weights[i]` going with `dims[i]`; `scale`: the $s$ that multiplies the cosine similarities;
# * returns a scalar tensor (shape `()`), differentiable with respect to `q` and `d`:
#   $\sum_m w_m \mathcal L(\mathrm{norm}(q_{1:m}), \mathrm{norm}(d_{1:m}))$, where $\mathcal L$ is
#   the in-batch-negatives cross-entropy of the logits $s\cos(q_i, d_j)$ with labels
#   $0, 1, \dots, n-1$ (the formula at the top of the chapter).
#
# Use plain torch (slicing, `torch.nn.functional.normalize`, `@`, `cross_entropy` or your own
# log-softmax). Do not call `matryoshka.MatryoshkaLoss`, `matryoshka.matryoshka_loss`,
# `retrieval.in_batch_negatives_loss`, `gradcache.contrastive_loss` or sentence-transformers'
# `MatryoshkaLoss` / `MultipleNegativesRankingLoss`: the check makes them refuse to run. It
# compares your loss with a 2 × 2 case worked by hand, where at one number every unit prefix is
# ±1, and with plain algebra on random batches, values and gradients (after `.backward()`).

# %% tags=["solution"]
def matryoshka_loss(q, d, dims, weights, scale=20.0):
    # BEGIN SOLUTION
    labels = torch.arange(len(q))
    total = 0.0
    for m, w in zip(dims, weights):
        q_m = torch.nn.functional.normalize(q[:, :m], dim=-1)
        d_m = torch.nn.functional.normalize(d[:, :m], dim=-1)
        total = total + w * torch.nn.functional.cross_entropy(scale * q_m @ d_m.T, labels)
    return total
    # END SOLUTION

# %%
from course_lib.tooling.exercises.matryoshka import check_matryoshka_loss

check_matryoshka_loss(matryoshka_loss)

# %% [markdown]
# **Exercise 2: a prefix, re-normalised.** Write `prefix(emb, m)`: the first `m` numbers of each
# row of `emb`, rescaled to unit length. The check compares it with `matryoshka.truncate` and
# shows why the re-normalisation matters for cosine scores.

# %% tags=["solution"]
def prefix(emb, m):
    # BEGIN SOLUTION
    return torch.nn.functional.normalize(emb[:, :m], dim=-1)
    # END SOLUTION

# %%
g = torch.Generator().manual_seed(1)
x = torch.nn.functional.normalize(torch.randn(5, 384, generator=g), dim=-1)
print(tuple(prefix(x, 64).shape))
assert torch.allclose(prefix(x, 64), matryoshka.truncate(x, 64), atol=1e-6)
assert torch.allclose(prefix(x, 64).norm(dim=1), torch.ones(5), atol=1e-5)
assert (x[:, :64].norm(dim=1) < 0.9).all()      # without re-normalising, a prefix is far shorter than 1


# %% [markdown]
# **Exercise 3: two-stage search by hand.** Write `two_stage(q, docs, k, m)` returning, for each
# query, the index of its best document found by shortlisting `k` documents at the first `m`
# numbers and re-ranking them at full size. The check compares it with `matryoshka.two_stage_search`
# on the chapter's real embeddings.

# %% tags=["solution"]
def two_stage(q, docs, k, m):
    # BEGIN SOLUTION
    norm = torch.nn.functional.normalize
    shortlist = (norm(q[:, :m], dim=-1) @ norm(docs[:, :m], dim=-1).T).topk(k, dim=1).indices
    full = torch.einsum("qd,qkd->qk", norm(q, dim=-1), norm(docs, dim=-1)[shortlist])
    return shortlist.gather(1, full.argmax(dim=1, keepdim=True)).squeeze(1)
    # END SOLUTION

# %%
print(two_stage(q_emb[:3], d_emb, 20, 32).tolist())
expected = matryoshka.two_stage_search(q_emb[:50], d_emb, k=20, shortlist_dim=32, top=1).indices.squeeze(1)
assert torch.equal(two_stage(q_emb[:50], d_emb, 20, 32), expected)

# %% [markdown]
# **Exercise 4 (open).** Train LoRA + MRL with weights that favour the small prefixes
# (`matryoshka_weights=(1, 1, 1, 2, 4)`) and plot its recall curve beside the two above. What
# does the full-size recall pay for the gain at 32? Then try a binary shortlist index at 128
# numbers (16 bytes per vector): which `k` recovers brute force?
