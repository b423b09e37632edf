"""Two-stage Matryoshka search against full-dimension brute force (chapter 04).

1. Train MiniLM + LoRA r=16 with the Matryoshka loss (dimensions 384/256/128/64/32) on
   ``--pairs`` code-search training pairs, then embed the 506 test queries and a corpus of the
   506 test documents plus all 20,000 distractors.
2. Brute force: every query scored against every document at 384 dimensions, top 10. Two-stage
   (`course_lib.matryoshka.TwoStageIndex`): shortlist ``k`` at ``d`` dimensions, re-rank at 384,
   for each ``d`` in ``--shortlist-dims`` and ``k`` in ``--ks``. Recall@10 and the median search
   time of all queries for each; the fastest setting whose recall@10 is at least 99% of brute
   force's, and its speed-up. Recall of the same shortlists from int8 and binary indexes, with
   their bytes per vector (their time is not measured: PyTorch has no int8 or popcount search
   kernel on CPU, so it would measure the emulation, not the index).
3. The same timing on 1,000,000 synthetic random unit vectors (timing only: random vectors have
   no Matryoshka structure, so recall there means nothing) with the chosen ``d`` and ``k``.

Run:  .venv/bin/python benchmarks/mrl_search.py [--pairs 2048] [--repeats 5]
(about 10 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F

from course_lib import data, gradcache, lora, matryoshka, models, retrieval, train

RESULTS = Path(__file__).parent / "results" / "mrl_search.json"
DIMS = (384, 256, 128, 64, 32)
TOP = 10


def timed(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs, after one warm-up run."""
    fn()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def brute_force(q: torch.Tensor, full: torch.Tensor, top: int = TOP, query_batch: int = 64) -> torch.Tensor:
    """Top ``top`` documents of each query by cosine similarity at full dimension (unit vectors)."""
    return torch.cat([(q[s:s + query_batch] @ full.T).topk(top, dim=1).indices for s in range(0, len(q), query_batch)])


def recall(indices: torch.Tensor, relevant: torch.Tensor) -> float:
    return (indices == relevant[:, None]).any(dim=1).float().mean().item()


def figure(name: str, value: float, op: str, target: float) -> str:
    ok = {"<=": value <= target, ">=": value >= target, ">": value > target, "<": value < target}[op]
    return f"FIGURE {name}: {value:.3g} (target {op} {target}) {'met' if ok else 'missed'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2048, help="training pairs of the LoRA + MRL model")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--shortlist-dims", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--ks", type=int, nargs="+", default=[10, 20, 50, 100, 200, 500, 1000])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--synthetic", type=int, default=1_000_000, help="vectors in the timing-only corpus")
    parser.add_argument("--synthetic-queries", type=int, default=256)
    args = parser.parse_args()
    started = time.time()

    # 1. a Matryoshka-trained encoder and the real corpus
    base, tokenizer = models.load_minilm("cpu")
    model = copy.deepcopy(base)
    lora.inject_lora(model, target_modules=["query", "value"], r=16, lora_alpha=32)
    steps = args.pairs // args.batch
    train.train(model, gradcache.code_search_step(tokenizer, None, matryoshka.MatryoshkaLoss(matryoshka_dims=DIMS)),
                train.batches(data.load_code_search("train"), args.batch, seed=0), steps=steps, lr=1e-3,
                warmup_steps=max(1, steps // 10), desc="LoRA + MRL", loss_fn_does_backward=True)
    test = data.load_code_search("test")
    distractors = data.load_distractors()
    q, d = retrieval.embed_code_search(model, tokenizer, test, distractors, progress=True)
    relevant = torch.arange(len(test))
    full = F.normalize(d, dim=-1)
    q = F.normalize(q, dim=-1)

    # 2. brute force vs two-stage on the real corpus
    brute_indices = brute_force(q, full)
    brute = {"recall@10": round(recall(brute_indices, relevant), 4),
             "seconds": timed(lambda: brute_force(q, full), args.repeats), "bytes_per_vector": 4 * d.shape[1]}
    target = 0.99 * brute["recall@10"]
    settings = []
    for dim in args.shortlist_dims:
        index = matryoshka.TwoStageIndex(d, dim)
        for k in args.ks:
            hits = index.search(q, k, TOP).indices
            row = {"dim": dim, "k": k, "recall@10": round(recall(hits, relevant), 4),
                   "seconds": timed(lambda index=index, k=k: index.search(q, k, TOP), args.repeats)}
            row["speedup"] = round(brute["seconds"] / row["seconds"], 2)
            for kind in ("int8", "binary"):
                other = matryoshka.TwoStageIndex(d, dim, kind)
                row[f"recall@10_{kind}"] = round(recall(other.search(q, k, TOP).indices, relevant), 4)
            settings.append(row)
            print(row)
    bytes_per_vector = {f"{kind}@{dim}": matryoshka.build_index(d[:1], dim, kind).nbytes
                        for dim in args.shortlist_dims for kind in matryoshka.INDEX_TYPES}
    good = [s for s in settings if s["recall@10"] >= target]
    best = max(good, key=lambda s: s["speedup"]) if good else None

    # 3. the chosen setting on a million synthetic vectors (timing only)
    synthetic = None
    if best is not None and args.synthetic:
        g = torch.Generator().manual_seed(0)
        big = F.normalize(torch.randn(args.synthetic, d.shape[1], generator=g), dim=-1)
        big_q = F.normalize(torch.randn(args.synthetic_queries, d.shape[1], generator=g), dim=-1)
        big_index = matryoshka.TwoStageIndex(big, best["dim"])
        synthetic = {"n_docs": args.synthetic, "n_queries": args.synthetic_queries, "dim": best["dim"], "k": best["k"],
                     "seconds_brute_force": timed(lambda: brute_force(big_q, big), max(1, args.repeats // 2)),
                     "seconds_two_stage": timed(lambda: big_index.search(big_q, best["k"], TOP), max(1, args.repeats // 2))}
        synthetic["speedup"] = round(synthetic["seconds_brute_force"] / synthetic["seconds_two_stage"], 2)
        del big, big_index

    result = {
        "command": "python benchmarks/mrl_search.py " + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items()),
        "date": str(date.today()), "seconds": round(time.time() - started),
        "device": "cpu", "threads": torch.get_num_threads(),
        "n_queries": len(test), "n_docs": d.shape[0], "train_steps": steps,
        "brute_force": brute, "two_stage": settings, "best_at_99pct": best,
        "bytes_per_vector": bytes_per_vector, "synthetic_timing_only": synthetic,
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(figure("two_stage_speedup_at_99pct_recall10", best["speedup"] if best else 0.0, ">=", 4))
    print(figure("two_stage_speedup_1m_synthetic", synthetic["speedup"] if synthetic else 0.0, ">=", 4))


if __name__ == "__main__":
    main()
