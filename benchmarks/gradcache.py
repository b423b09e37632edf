"""GradCache on MiniLM: memory and time side by side, and what a larger batch buys (chapter 03).

1. At batch 256 (MiniLM + LoRA r=8 on query/value, code-search pairs, documents cut to 128
   tokens): the peak of the activations saved for backward (`course_lib.memory.SavedActivations`)
   for GradCache with chunk 32, an ordinary step at batch 32 and at batch 256; seconds per step
   of GradCache, of the ordinary batch-256 step, and of sentence-transformers'
   ``CachedMultipleNegativesRankingLoss`` (mini-batch 32) on the same tokenized batch, timed side
   by side: ``--rounds`` rounds of one step of each, in a rotating order (`report.interleaved`),
   so GradCache's time over the other two is a ratio of times paired by round, with its 95%
   interval (`course_lib.stats.time_ratio`).
2. Recall@10 on the code-search test split after training on the same 2,048 training pairs
   (half an epoch) with batch 16, 64 and 256 (GradCache, chunk 16), LoRA r=8, the same
   learning rate: fewer, larger steps for larger batches.

Each test query's 1-based rank of its relevant document is kept under ``"items"``, for the
pretrained model (``"pretrained"``) and each batch size of the sweep (``"batch_16"``, ...), and
``"comparisons"`` records each batch size minus the pretrained model and each larger batch minus
the smallest: recall@10 and MRR with seeded 95% paired bootstrap intervals
(`report.compare_rankings`), printed after the results, before the FIGURE lines.

Run:  .venv/bin/python -m benchmarks.gradcache [--batch 256] [--chunk 32] [--rounds 7]
(25 to 40 minutes on 2 CPU cores, by the machine; ``--n-test`` scores only the first test
queries, for a quick try). Writes benchmarks/runs/gradcache.json (``--save``: the committed
benchmarks/results/gradcache.json) and ends with its FIGURE lines; ``--figures-only``
recomputes them from that JSON, measuring nothing (a JSON written before the per-query ranks
were kept has neither "items" nor "comparisons", and needs neither; one written before the steps
were timed in rounds gives the time ratios of the medians, without intervals).
"""

from __future__ import annotations

import copy
import json
import os
import statistics

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from benchmarks.report import (
    RESULTS_DIR,
    Run,
    argument_parser,
    compare_rankings,
    figure,
    inject_seeded_lora,
    interleaved,
    interval_figure,
    paired_line,
    recompute_figures,
    require_paired_rounds,
    save_result,
)
from course_lib import data, gradcache, models, retrieval, train
from course_lib.memory import SavedActivations
from course_lib.stats import time_ratio

RESULTS = RESULTS_DIR / "gradcache.json"


def _preprocess(model, texts):
    """sentence-transformers' tokenization: ``preprocess`` (``tokenize`` before 6.0, deprecated since)."""
    return (model.preprocess if hasattr(model, "preprocess") else model.tokenize)(texts)


def with_lora(base):
    model = copy.deepcopy(base)
    inject_seeded_lora(model, target_modules=["query", "value"], r=8, lora_alpha=16)
    return model.train()


def scored(model, tokenizer, test: list[dict]) -> tuple[dict, list[int]]:
    """`retrieval.evaluate_code_search`'s metrics of ``model`` on ``test`` (floats only), and each
    query's 1-based rank of its relevant document, both from the same embeddings."""
    q, d = retrieval.embed_code_search(model, tokenizer, test)
    relevant = list(range(len(test)))
    metrics = retrieval.retrieval_metrics(q, d, relevant)
    ranks = [int(r) for r in retrieval.relevant_ranks(q, d, relevant)]
    return {k: v for k, v in metrics.items() if isinstance(v, float)}, ranks


def memory_and_time(base, tokenizer, st_model, batch: int, chunk: int, rounds: int) -> dict:
    rows = data.load_code_search("train")[:batch]
    queries, docs = [r["query"] for r in rows], [r["document"] for r in rows]
    model = with_lora(base)
    q_enc = lambda t: retrieval.encode_batch(model, tokenizer, t, retrieval.QUERY_MAX_TOKENS)
    d_enc = lambda t: retrieval.encode_batch(model, tokenizer, t, retrieval.DOC_MAX_TOKENS)

    def peak(step) -> int:
        with SavedActivations(model) as saved:
            step()
        model.zero_grad(set_to_none=True)
        return saved.peak

    result = {
        "activations_gradcache": peak(lambda: gradcache.gradcache_step(q_enc, queries, docs, chunk, doc_encoder=d_enc)),
        "activations_naive_small": peak(lambda: gradcache.naive_step(q_enc, queries[:chunk], docs[:chunk],
                                                                     doc_encoder=d_enc)),
        "activations_naive_full": peak(lambda: gradcache.naive_step(q_enc, queries, docs, doc_encoder=d_enc)),
    }

    # time: the same tokenized batch for all three, through the sentence-transformers model
    from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss
    inject_seeded_lora(st_model[0].auto_model, target_modules=["query", "value"], r=8, lora_alpha=16)
    st_model.train()
    st_model.max_seq_length = retrieval.DOC_MAX_TOKENS
    features = [_preprocess(st_model, queries), _preprocess(st_model, docs)]
    encode = lambda f: st_model(dict(f))["sentence_embedding"]
    cached = CachedMultipleNegativesRankingLoss(st_model, scale=20.0, mini_batch_size=chunk)

    def st_step():
        cached([dict(f) for f in features], None).backward()
        st_model.zero_grad(set_to_none=True)

    def ours():
        gradcache.gradcache_step(encode, dict(features[0]), dict(features[1]), chunk)
        st_model.zero_grad(set_to_none=True)

    def naive():
        gradcache.naive_step(encode, dict(features[0]), dict(features[1]))
        st_model.zero_grad(set_to_none=True)

    times = interleaved({"naive": naive, "gradcache": ours, "st_cached": st_step}, rounds)
    for name, seconds in times.items():
        result[f"seconds_{name}"] = round(statistics.median(seconds), 3)   # the median over rounds
    result["rounds"] = rounds
    result["seconds"] = {name: [round(t, 3) for t in seconds] for name, seconds in times.items()}
    result["gradcache_over_naive"] = time_ratio(times["gradcache"], times["naive"])
    result["ours_over_st_cached"] = time_ratio(times["gradcache"], times["st_cached"])
    return result


def batch_sweep(base, tokenizer, batches: list[int], chunk: int, lr: float, pairs: int,
                test: list[dict]) -> tuple[list[dict], dict[str, list[int]]]:
    """One row per batch size, and each batch size's per-query ranks (``"batch_<size>"``)."""
    train_rows = data.load_code_search("train")
    out, ranks = [], {}
    for batch in batches:
        model = with_lora(base)
        steps = pairs // batch
        step = gradcache.code_search_step(tokenizer, chunk)     # GradCache, queries and documents at their lengths
        history = train.train(model, step, train.batches(train_rows, batch, seed=0), steps=steps, lr=lr,
                              warmup_steps=max(1, steps // 10), desc=f"batch {batch}", loss_fn_does_backward=True)
        metrics, ranks[f"batch_{batch}"] = scored(model, tokenizer, test)
        out.append({"batch": batch, "steps": steps, "pairs_seen": steps * batch,
                    "seconds_per_step": round(history.seconds_per_step, 3),
                    "loss_first": round(history.loss[0], 4), "loss_last": round(history.loss[-1], 4),
                    **{k: round(v, 4) for k, v in metrics.items()}})
    return out, ranks


def comparisons(items: dict[str, list[int]], batches: list[int]) -> list[dict]:
    """Each batch size minus the pretrained model, then each larger batch minus the smallest."""
    out = [compare_rankings("pretrained", items["pretrained"], f"batch_{b}", items[f"batch_{b}"]) for b in batches]
    if batches:
        smallest = f"batch_{min(batches)}"
        out += [compare_rankings(smallest, items[smallest], f"batch_{b}", items[f"batch_{b}"])
                for b in sorted(batches) if b != min(batches)]
    return out


def figures(result: dict) -> list[str]:
    """The FIGURE lines of a result of this script, from its recorded measurements alone."""
    step, sweep = result["step"], result["sweep"]
    # times: the ratio over paired rounds and its interval; a JSON from before the rounds, the medians' ratio
    over = {key: step[key] if "rounds" in step else {"ratio": step["seconds_gradcache"] / step[f"seconds_{den}"]}
            for key, den in (("gradcache_over_naive", "naive"), ("ours_over_st_cached", "st_cached"))}
    lines = [
        figure("gradcache_over_naive_small_activation_peak",
               step["activations_gradcache"] / step["activations_naive_small"], "<=", 1.1),
        figure("naive_full_over_gradcache_activation_peak",
               step["activations_naive_full"] / step["activations_gradcache"], ">=", step["batch"] / step["chunk"] * 0.8),
        figure("gradcache_over_naive_seconds_per_step", over["gradcache_over_naive"]["ratio"], "<=", 1.35),
    ]
    if "rounds" in step:
        lines.append(interval_figure("gradcache_over_naive_seconds_per_step", over["gradcache_over_naive"], "<=", 1.35))
    lines.append(figure("ours_over_st_cached_seconds_per_step", over["ours_over_st_cached"]["ratio"], "<=", 1.0))
    if "rounds" in step:
        lines.append(interval_figure("ours_over_st_cached_seconds_per_step", over["ours_over_st_cached"], "<=", 1.0))
    if len(sweep) >= 2:
        lines.append(figure("largest_minus_smallest_batch_recall10", sweep[-1]["recall@10"] - sweep[0]["recall@10"], ">", 0))
        paired = {(c["a"], c["b"]): c for c in result.get("comparisons", [])}
        key = (f"batch_{sweep[0]['batch']}", f"batch_{sweep[-1]['batch']}")
        if key in paired:   # the same difference over the same test queries, with its interval
            lines.append(interval_figure("largest_minus_smallest_batch_recall10", paired[key]["recall@10"], ">", 0))
    return lines


def main() -> None:
    parser = argument_parser("gradcache", __doc__)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7,
                        help="paired rounds of the step timing, one step of each of the three (after a warm-up call each)")
    parser.add_argument("--sweep", type=int, nargs="*", default=[16, 64, 256])
    parser.add_argument("--sweep-chunk", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--pairs", type=int, default=2048, help="training pairs seen by every batch size")
    parser.add_argument("--n-test", type=int, default=None,
                        help="score only the first N test queries (default: the whole test split)")
    args = parser.parse_args()
    if len(set(args.sweep)) != len(args.sweep):
        parser.error(f"--sweep lists a batch size twice: {args.sweep}")
    require_paired_rounds(parser, "--rounds", args.rounds)
    if args.figures_only:
        print("\n".join(recompute_figures(RESULTS, figures)))
        return
    run = Run("gradcache", args)
    torch.manual_seed(0)

    base, tokenizer = models.load_minilm("cpu")
    st_model = models.load_minilm_sentence_transformer("cpu")
    test = data.load_code_search("test")[:args.n_test]
    baseline, pretrained_ranks = scored(base, tokenizer, test)
    step = memory_and_time(base, tokenizer, st_model, args.batch, args.chunk, args.rounds)
    sweep, sweep_ranks = batch_sweep(base, tokenizer, args.sweep, args.sweep_chunk, args.lr, args.pairs, test)
    items = {"pretrained": pretrained_ranks, **sweep_ranks}

    result = {
        **run.fields(),
        "step": {"batch": args.batch, "chunk": args.chunk, **step},
        "baseline": {k: round(v, 4) for k, v in baseline.items() if isinstance(v, float)},
        "sweep": sweep,
        "comparisons": comparisons(items, args.sweep),
        "items": items,
    }
    lines = save_result(RESULTS, result, figures)
    # the ranks and the intervals are in the file; the intervals are printed below as lines
    print(json.dumps({k: v for k, v in result.items() if k not in ("items", "comparisons")}, indent=2))
    for c in result["comparisons"]:
        print(paired_line(c, "recall@10"), "|", paired_line(c, "mrr"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
