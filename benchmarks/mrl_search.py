"""Two-stage Matryoshka search against full-dimension brute force (chapter 04).

1. Train MiniLM + LoRA r=16 with the Matryoshka loss (dimensions 384/256/128/64/32) on
   ``--pairs`` code-search training pairs, then embed the 506 test queries and a corpus of the
   506 test documents plus all 20,000 distractors.
2. Brute force: every query scored against every document at 384 dimensions, top 10. Two-stage
   (`course_lib.matryoshka.TwoStageIndex`): shortlist ``k`` at ``d`` dimensions, re-rank at 384,
   for each ``d`` in ``--shortlist-dims`` and ``k`` in ``--ks``. Recall@10 and times in two modes:
   all queries searched at once (batched: brute force is then one efficient matrix product that
   reads the corpus once for every query) and queries searched one at a time (a search service's
   latency: every query reads the whole corpus, which is where a small index pays). The first
   stage alone is timed too, in both modes (batched also without its top-k): brute force's time
   over it is the most any re-rank could leave, the measured limit printed beside the figures.
   Each setting times brute force, the search and its first stage side by side in ``--repeats``
   paired rounds per mode (`report.interleaved`); each speed-up and limit is the median over rounds
   of brute force's time over the other's, with its 95% interval (`course_lib.stats.speedup`),
   and brute force's own times are the medians of all its rounds. For each mode the fastest
   setting whose recall@10 is at least 99% of brute force's.
   Recall of the same shortlists from int8 and binary indexes, with their bytes per vector
   (their time is not measured: `course_lib.matryoshka` scores both in float32, so the time would
   be the emulation's, not the index's; PyTorch has no popcount kernel, and its int8 products,
   the private ``torch._int_mm`` or ``torch.ao``'s quantised layers, take int8 queries too, where
   this int8 index scores a float query).
3. The same timing on 1,000,000 synthetic random unit vectors (timing only: random vectors have
   no Matryoshka structure, so recall there means nothing) with the ``d`` and ``k`` chosen for
   one-at-a-time search.

Run:  .venv/bin/python -m benchmarks.mrl_search [--pairs 2048] [--repeats 9]
(7 to 12 minutes on 2 CPU cores, by the machine). Writes its JSON under benchmarks/runs/
(``--save``: replaces benchmarks/results/mrl_search.json) and ends with its FIGURE lines;
``--figures-only`` recomputes them from that JSON, measuring nothing.
"""

from __future__ import annotations

import copy
import os
import statistics
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from benchmarks.report import (
    RESULTS_DIR,
    Run,
    argument_parser,
    figure,
    inject_seeded_lora,
    interleaved,
    interval_figure,
    recompute_figures,
    require_paired_rounds,
    save_result,
    timed,
)
from course_lib import data, gradcache, matryoshka, models, retrieval, train
from course_lib.stats import speedup

RESULTS = RESULTS_DIR / "mrl_search.json"
DIMS = (384, 256, 128, 64, 32)
TOP = 10
QUERY_BATCH = 64   # queries per matrix product, as TwoStageIndex.search's default



def brute_force(q: torch.Tensor, full: torch.Tensor, top: int = TOP, query_batch: int = QUERY_BATCH) -> torch.Tensor:
    """Top ``top`` documents of each query by cosine similarity at full dimension (unit vectors)."""
    return torch.cat([(q[s:s + query_batch] @ full.T).topk(top, dim=1).indices for s in range(0, len(q), query_batch)])


def first_stage(index: matryoshka.TwoStageIndex, q: torch.Tensor, k: int, query_batch: int = QUERY_BATCH) -> list:
    """Stage 1 alone, in the query batches `TwoStageIndex.search` uses: its time is the least a
    two-stage search can take, so brute force's time over it bounds the speed-up."""
    return [index.first_stage(q[s:s + query_batch], k) for s in range(0, len(q), query_batch)]


def recall(indices: torch.Tensor, relevant: torch.Tensor) -> float:
    return (indices == relevant[:, None]).any(dim=1).float().mean().item()


def side_by_side(fns: dict, rounds: int, per: int = 1) -> tuple[dict[str, list[float]], dict[str, dict]]:
    """Brute force, a two-stage search and its first stage (``fns``' keys ``brute_force``,
    ``two_stage``, ``first_stage``) timed in ``rounds`` paired rounds (`report.interleaved`): each
    round's seconds divided by ``per`` (the queries a call searches one at a time), and the median
    over rounds of brute force's time over the search's (``speedup``) and over the first stage's
    (``limit``), each with its 95% interval and a verdict named for the faster side's time
    (`course_lib.stats.speedup`: ``"faster"`` when the whole interval lies above 1)."""
    times = {name: [t / per for t in ts] for name, ts in interleaved(fns, rounds).items()}
    return times, {"speedup": speedup(times["brute_force"], times["two_stage"]),
                   "limit": speedup(times["brute_force"], times["first_stage"])}


def record_mode(row: dict, mode: str, times: dict[str, list[float]], ratios: dict[str, dict],
                suffix: str = "") -> None:
    """Store one mode's paired measurements in ``row``: the median seconds of the search and of its
    first stage, the speed-up and limit (rounded to 2 decimals as printed) with their intervals, and
    every round's seconds (``rounds``) from which a reader can recompute them."""
    row[f"seconds_{mode}{suffix}"] = statistics.median(times["two_stage"])
    row[f"seconds_{mode}_first_stage"] = statistics.median(times["first_stage"])
    for name, ratio in ratios.items():
        row[f"{name}_{mode}"] = round(ratio["ratio"], 2)
        row.setdefault("intervals", {})[f"{name}_{mode}"] = ratio
    row.setdefault("rounds", {})[mode] = times


def figures(result: dict) -> list[str]:
    """The FIGURE lines of a result of this script, from its recorded measurements alone. Where a
    setting records its paired rounds' intervals (the runs from 2026-12-06 11:59 UTC on), each
    speed-up's and limit's line is followed by its interval's (`report.interval_figure`)."""
    best, synthetic = result["best_at_99pct"], result["synthetic_timing_only"]
    lines = []

    def add(name: str, setting: dict | None, key: str) -> None:
        lines.append(figure(name, setting[key] if setting else 0.0, ">=", 4))
        if setting and key in setting.get("intervals", {}):
            lines.append(interval_figure(name, setting["intervals"][key], ">=", 4))

    for mode in ("per_query", "batched"):
        add(f"two_stage_{mode}_speedup_at_99pct_recall10", best[mode], f"speedup_{mode}")
        add(f"two_stage_{mode}_speedup_1m_synthetic", synthetic, f"speedup_{mode}")
    # the limit beside the figures: no re-ranking can beat the first stage alone
    good = [s for s in result["two_stage"] if s["recall@10"] >= 0.99 * result["brute_force"]["recall@10"]]
    for mode in ("batched", "per_query"):
        add(f"two_stage_{mode}_first_stage_limit_at_99pct_recall10",
            max(good, key=lambda s, mode=mode: s[f"limit_{mode}"], default=None), f"limit_{mode}")
        add(f"two_stage_{mode}_first_stage_limit_1m_synthetic", synthetic, f"limit_{mode}")
    return lines


def main() -> None:
    parser = argument_parser("mrl_search", __doc__)
    parser.add_argument("--pairs", type=int, default=2048, help="training pairs of the LoRA + MRL model")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--shortlist-dims", type=int, nargs="+", default=[32, 64, 96, 128])
    parser.add_argument("--ks", type=int, nargs="+", default=[10, 20, 50, 100, 200, 500, 1000])
    parser.add_argument("--repeats", type=int, default=9, help="paired rounds of each timing")
    parser.add_argument("--latency-queries", type=int, default=50, help="queries timed one at a time")
    parser.add_argument("--synthetic", type=int, default=1_000_000, help="vectors in the timing-only corpus")
    parser.add_argument("--synthetic-queries", type=int, default=256)
    parser.add_argument("--cache", default="", help="safetensors file to keep the embeddings in between runs")
    args = parser.parse_args()
    require_paired_rounds(parser, "--repeats", args.repeats)
    if args.figures_only:
        print("\n".join(recompute_figures(RESULTS, figures)))
        return
    run = Run("mrl_search", args, skip=("cache",))

    # 1. a Matryoshka-trained encoder and the real corpus
    test = data.load_code_search("test")
    steps = args.pairs // args.batch
    if args.cache and Path(args.cache).is_file():
        saved = load_file(args.cache)
        q, d = saved["queries"], saved["documents"]
    else:
        base, tokenizer = models.load_minilm("cpu")
        model = copy.deepcopy(base)
        inject_seeded_lora(model, target_modules=["query", "value"], r=16, lora_alpha=32)
        loss_fn = matryoshka.MatryoshkaLoss(matryoshka_dims=DIMS)
        train.train(model, gradcache.code_search_step(tokenizer, None, loss_fn),
                    train.batches(data.load_code_search("train"), args.batch, seed=0), steps=steps, lr=1e-3,
                    warmup_steps=max(1, steps // 10), desc="LoRA + MRL", loss_fn_does_backward=True)
        q, d = retrieval.embed_code_search(model, tokenizer, test, data.load_distractors(), progress=True)
        if args.cache:
            save_file({"queries": q.contiguous(), "documents": d.contiguous()}, args.cache)
    relevant = torch.arange(len(test))
    full = F.normalize(d, dim=-1)
    q = F.normalize(q, dim=-1)
    one_by_one = q[:args.latency_queries]

    def one_at_a_time(search, queries: torch.Tensor):
        """One call that searches ``queries`` one at a time, as a search service receives them."""
        return lambda: [search(queries[i:i + 1]) for i in range(len(queries))]

    # 2. brute force vs two-stage on the real corpus, all queries at once and one at a time, side by side
    brute = {"recall@10": round(recall(brute_force(q, full), relevant), 4),
             "seconds_batched_scores_only": timed(lambda: [q[s:s + QUERY_BATCH] @ full.T for s in range(0, len(q), QUERY_BATCH)], args.repeats),
             "bytes_per_vector": 4 * d.shape[1]}
    target = 0.99 * brute["recall@10"]
    settings = []
    for dim in args.shortlist_dims:
        index = matryoshka.TwoStageIndex(d, dim)
        # the first stage's matrix product alone (no top-k): what the ratio of dimensions buys
        scores_only = timed(lambda index=index: [index.shortlist.scores(q[s:s + QUERY_BATCH]) for s in range(0, len(q), QUERY_BATCH)],
                            args.repeats)
        for k in args.ks:
            row = {"dim": dim, "k": k, "recall@10": round(recall(index.search(q, k, TOP).indices, relevant), 4),
                   "seconds_batched_scores_only": scores_only}
            record_mode(row, "batched", *side_by_side(
                {"brute_force": lambda: brute_force(q, full), "two_stage": lambda index=index, k=k: index.search(q, k, TOP),
                 "first_stage": lambda index=index, k=k: first_stage(index, q, k)}, args.repeats))
            record_mode(row, "per_query", *side_by_side(
                {"brute_force": one_at_a_time(lambda x: brute_force(x, full), one_by_one),
                 "two_stage": one_at_a_time(lambda x, index=index, k=k: index.search(x, k, TOP), one_by_one),
                 "first_stage": one_at_a_time(lambda x, index=index, k=k: index.first_stage(x, k), one_by_one)},
                args.repeats, per=len(one_by_one)))
            for kind in ("int8", "binary"):
                other = matryoshka.TwoStageIndex(d, dim, kind)
                row[f"recall@10_{kind}"] = round(recall(other.search(q, k, TOP).indices, relevant), 4)
            settings.append(row)
            print({key: value for key, value in row.items() if key not in ("rounds", "intervals")})
    for mode in ("batched", "per_query"):   # brute force's time: the median of all its rounds beside the settings
        brute[f"seconds_{mode}"] = statistics.median(t for s in settings for t in s["rounds"][mode]["brute_force"])
    bytes_per_vector = {f"{kind}@{dim}": matryoshka.build_index(d[:1], dim, kind).nbytes
                        for dim in args.shortlist_dims for kind in matryoshka.INDEX_TYPES}
    good = [s for s in settings if s["recall@10"] >= target]
    best = {mode: max(good, key=lambda s, mode=mode: s[f"speedup_{mode}"]) if good else None
            for mode in ("batched", "per_query")}

    # 3. the per-query setting on a million synthetic vectors (timing only)
    synthetic = None
    if best["per_query"] is not None and args.synthetic:
        chosen = best["per_query"]
        g = torch.Generator().manual_seed(0)
        big = F.normalize(torch.randn(args.synthetic, d.shape[1], generator=g), dim=-1)
        big_q = F.normalize(torch.randn(args.synthetic_queries, d.shape[1], generator=g), dim=-1)
        big_index = matryoshka.TwoStageIndex(big, chosen["dim"])
        k = chosen["k"]
        synthetic = {"n_docs": args.synthetic, "n_queries": args.synthetic_queries, "dim": chosen["dim"], "k": k}
        record_mode(synthetic, "batched", *side_by_side(
            {"brute_force": lambda: brute_force(big_q, big), "two_stage": lambda: big_index.search(big_q, k, TOP),
             "first_stage": lambda: first_stage(big_index, big_q, k)}, args.repeats), suffix="_two_stage")
        big_one_by_one = big_q[:args.latency_queries]
        record_mode(synthetic, "per_query", *side_by_side(
            {"brute_force": one_at_a_time(lambda x: brute_force(x, big), big_one_by_one),
             "two_stage": one_at_a_time(lambda x: big_index.search(x, k, TOP), big_one_by_one),
             "first_stage": one_at_a_time(lambda x: big_index.first_stage(x, k), big_one_by_one)},
            args.repeats, per=len(big_one_by_one)), suffix="_two_stage")
        for mode in ("batched", "per_query"):
            synthetic[f"seconds_{mode}_brute_force"] = statistics.median(synthetic["rounds"][mode]["brute_force"])
        del big, big_index

    result = {
        **run.fields(),
        "n_queries": len(test), "n_docs": d.shape[0], "train_steps": steps, "latency_queries": len(one_by_one),
        "rounds": args.repeats,
        "brute_force": brute, "two_stage": settings, "best_at_99pct": best,
        "bytes_per_vector": bytes_per_vector, "synthetic_timing_only": synthetic,
    }
    lines = save_result(RESULTS, result, figures)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
