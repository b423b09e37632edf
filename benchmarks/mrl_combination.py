"""The seeds' combination table at the course's scale: full fine-tuning, LoRA, LoRA + GradCache,
LoRA + MRL and all three on MiniLM code search (chapter 04).

Every method sees the same training pairs in the same order (``--pairs`` of the training split,
batch ``--batch``), LoRA r=16 on query/value (the seeds' table uses r=16), GradCache with chunk
``--chunk``, MRL over dimensions 384/256/128/64/32 with weight 1 each. Reported per method:
recall@1/@10 and MRR on the code-search test split against its 506 documents plus
``--distractors`` distractors, at every MRL dimension; trainable parameters; the memory of one
training step by exact accounting (`course_lib.memory.measure_step`: parameters, gradients, AdamW
state, peak saved activations); seconds per step and the time of one epoch of the training split
(seconds per step × steps per epoch), from each method's own training run: five runs timed one after
the other, so their ratios move with whatever the machine did meanwhile. ``step_times`` times the
methods again side by side: fresh models, each round one step of every method on the same batch
in a rotating order (``--rounds`` rounds after one warm-up round), and records each method's time
per step over LoRA's as a ratio with a 95% interval over the paired rounds
(`course_lib.stats.time_ratio`).

Every model's per-query ranks are kept (the pretrained model's too): ``items[model][dim]`` is
each test query's 1-based rank of its own document at that many numbers
(`retrieval.relevant_ranks`), from which its recall@k and MRR follow. ``comparisons`` records, at
every dimension, each method with MRL minus the same method without it, LoRA minus full
fine-tuning, LoRA + GradCache minus LoRA, and each trained model minus the pretrained one:
recall@10, recall@1 and MRR with seeded 95% paired bootstrap intervals (`report.compare_rankings`),
each with its ``dim``.

Run:  .venv/bin/python -m benchmarks.mrl_combination [--pairs 2048] [--batch 64] [--distractors 2000]
(25 to 45 minutes on 2 CPU cores, by the machine). ``--n-test N`` scores only the first N test queries (a quick
check; the default is all of them). Writes benchmarks/runs/mrl_combination.json (``--save``: the committed
benchmarks/results/mrl_combination.json) and ends with its FIGURE lines; ``--figures-only`` recomputes them from that JSON, measuring nothing (a JSON
written before the ranks were kept, without ``items`` and ``comparisons``, works too).
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
    interval_figure,
    paired_line,
    recompute_figures,
    require_paired_rounds,
    save_result,
)
from course_lib import data, gradcache, lora, matryoshka, memory, models, retrieval, train
from course_lib.progress import progress
from course_lib.stats import time_ratio

RESULTS = RESULTS_DIR / "mrl_combination.json"
DIMS = (384, 256, 128, 64, 32)
METHODS = {  # name: (LoRA?, GradCache?, MRL?)
    "full fine-tuning": (False, False, False),
    "LoRA": (True, False, False),
    "LoRA + GradCache": (True, True, False),
    "LoRA + MRL": (True, False, True),
    "LoRA + GradCache + MRL": (True, True, True),
}
PRETRAINED = "pretrained"   # the name of the untrained model in "items" and "comparisons"
# the chapter's other paired comparisons, (A, B) for B minus A; MRL against no MRL and every
# method against the pretrained model are added to these (`comparison_pairs`)
COMPARED = [("full fine-tuning", "LoRA"), ("LoRA", "LoRA + GradCache")]
# The seeds' table (Flickr30k, CLIP, 3 epochs on a GPU): recall@1, memory, training time.
SEEDS = {
    "full fine-tuning": {"recall@1": 0.712, "memory_gb": 24, "hours": 3.5},
    "LoRA": {"recall@1": 0.710, "memory_gb": 8, "hours": 2.0},
    "LoRA + GradCache": {"recall@1": 0.709, "memory_gb": 5, "hours": 2.2},
    "LoRA + MRL": {"recall@1": 0.728, "memory_gb": 10, "hours": 2.5},
    "LoRA + GradCache + MRL": {"recall@1": 0.726, "memory_gb": 6, "hours": 2.1},
}


def build(base, use_lora: bool, r: int):
    model = copy.deepcopy(base)
    if use_lora:
        inject_seeded_lora(model, target_modules=["query", "value"], r=r, lora_alpha=2 * r)
    return model.train()


def method_step(name: str, tokenizer, chunk: int):
    """The training step of a method (`gradcache.code_search_step`): GradCache's chunk and the
    Matryoshka loss where the method uses them."""
    _, use_gc, use_mrl = METHODS[name]
    loss_fn = matryoshka.MatryoshkaLoss(matryoshka_dims=DIMS) if use_mrl else None
    return gradcache.code_search_step(tokenizer, chunk if use_gc else None, loss_fn)


def step_times(base, tokenizer, train_rows, args) -> dict:
    """Seconds of one training step of every method, measured side by side: a fresh model of each
    (seeded as for training), then ``args.rounds`` rounds after one warm-up round, each giving every
    method one step (`train.train`'s: forward, backward, clipping, AdamW) on the same batch, the
    order rotated by one method per round, so each method runs in each position equally often.
    A slow spell of the machine then falls on all methods of a round alike, and each method's time
    over LoRA's is a ratio of times paired by round, with its 95% interval
    (`course_lib.stats.time_ratio`)."""
    names = list(METHODS)
    contenders = {}
    for name in names:
        torch.manual_seed(0)
        model = build(base, METHODS[name][0], args.r)
        lr = args.lr_lora if METHODS[name][0] else args.lr_full
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        contenders[name] = model, method_step(name, tokenizer, args.chunk), optimizer
    stream = train.batches(train_rows, args.batch, seed=0)
    seconds = {name: [] for name in names}
    for i in progress(range(args.rounds + 1), desc="step times, paired rounds"):
        batch = next(stream)
        for name in names[i % len(names):] + names[:i % len(names)]:
            model, step, optimizer = contenders[name]
            history = train.train(model, step, [batch], steps=1, optimizer=optimizer, progress=False,
                                  loss_fn_does_backward=True)
            if i:  # round 0 warms every method up
                seconds[name].append(round(history.seconds[0], 4))
    return {"rounds": args.rounds, "batch": args.batch, "seconds": seconds,
            "median_seconds": {name: round(statistics.median(t), 3) for name, t in seconds.items()},
            "over_lora": {name: time_ratio(seconds[name], seconds["LoRA"]) for name in names if name != "LoRA"}}


def step_memory(model, step, rows, lr: float) -> dict:
    """One optimizer step of a copy of ``model`` on ``rows``, measured by exact accounting."""
    probe = copy.deepcopy(model).train()
    optimizer = torch.optim.AdamW([p for p in probe.parameters() if p.requires_grad], lr=lr)

    def one_step():
        step(probe, rows, 1.0)
        optimizer.step()

    return memory.measure_step(one_step, probe, optimizer)


def scores(model, tokenizer, test, distractors) -> tuple[dict, dict]:
    """recall@1/@10 and MRR at every dimension, and each query's rank of its own document there."""
    q, d = retrieval.embed_code_search(model, tokenizer, test, distractors)
    relevant = list(range(len(test)))
    by_dim = matryoshka.metrics_by_dim(q, d, relevant, DIMS)
    ranks = {str(dim): retrieval.relevant_ranks(matryoshka.truncate(q, dim), matryoshka.truncate(d, dim),
                                                relevant).tolist() for dim in DIMS}
    return {str(dim): {k: round(v, 4) for k, v in m.items()} for dim, m in by_dim.items()}, ranks


def comparison_pairs(names) -> list[tuple[str, str]]:
    """(A, B) for B minus A: each method with MRL against the same without, the chapter's other
    comparisons (`COMPARED`), then each trained model against the pretrained one."""
    flags = {flag: name for name, flag in METHODS.items() if name in names}
    pairs = [(flags[(lo, gc, False)], name) for name, (lo, gc, mrl) in METHODS.items()
             if mrl and name in names and (lo, gc, False) in flags]
    pairs += [(a, b) for a, b in COMPARED if a in names and b in names]
    return pairs + [(PRETRAINED, name) for name in METHODS if name in names]


def compare(a_name: str, a_ranks, b_name: str, b_ranks, dim: int) -> dict:
    """`report.compare_rankings` (recall@10, MRR) with recall@1 and the dimension added."""
    at1 = compare_rankings(a_name, a_ranks, b_name, b_ranks, k=1)["recall@1"]
    return compare_rankings(a_name, a_ranks, b_name, b_ranks, k=10) | {"recall@1": at1, "dim": dim}


def figures(result: dict) -> list[str]:
    """The FIGURE lines of a result of this script, from its recorded measurements alone."""
    m = result["methods"]
    r_at = lambda name, dim, k: m[name]["scores"][str(dim)][f"recall@{k}"]
    total = lambda name: m[name]["memory"]["total"]
    # each score difference again as its paired 95% interval's end nearest the target (interval_figure)
    paired = {(c["a"], c["b"], c["dim"]): c for c in result["comparisons"]}
    gradcache_r1 = paired["LoRA", "LoRA + GradCache", 384]["recall@1"]
    return [
        figure("lora_minus_full_recall10_at_384", r_at("LoRA", 384, 10) - r_at("full fine-tuning", 384, 10), ">=", -0.02),
        interval_figure("lora_minus_full_recall10_at_384", paired["full fine-tuning", "LoRA", 384]["recall@10"],
                        ">=", -0.02),
        figure("gradcache_minus_lora_recall1_at_384_abs",
               abs(r_at("LoRA + GradCache", 384, 1) - r_at("LoRA", 384, 1)), "<=", 0.02),
        # |difference| over the whole interval: its end farther from zero
        interval_figure("gradcache_minus_lora_recall1_at_384_abs",
                        {"high": max(abs(gradcache_r1["low"]), abs(gradcache_r1["high"]))}, "<=", 0.02),
        figure("gradcache_over_lora_step_memory", total("LoRA + GradCache") / total("LoRA"), "<=", 0.5),
        figure("mrl_over_lora_step_memory", total("LoRA + MRL") / total("LoRA"), "<=", 1.05),
        figure("mrl_minus_lora_recall10_at_64", r_at("LoRA + MRL", 64, 10) - r_at("LoRA", 64, 10), ">", 0),
        interval_figure("mrl_minus_lora_recall10_at_64", paired["LoRA", "LoRA + MRL", 64]["recall@10"], ">", 0),
        figure("mrl_minus_lora_recall10_at_384", r_at("LoRA + MRL", 384, 10) - r_at("LoRA", 384, 10), ">=", -0.01),
        interval_figure("mrl_minus_lora_recall10_at_384", paired["LoRA", "LoRA + MRL", 384]["recall@10"], ">=", -0.01),
        figure("gradcache_over_lora_epoch_time", m["LoRA + GradCache"]["epoch_seconds"] / m["LoRA"]["epoch_seconds"],
               "<=", 1.5),
    ] + ([] if "step_times" not in result else [  # the same target, from the steps timed side by side
        figure("gradcache_over_lora_step_time_paired", result["step_times"]["over_lora"]["LoRA + GradCache"]["ratio"],
               "<=", 1.5),
        interval_figure("gradcache_over_lora_step_time_paired", result["step_times"]["over_lora"]["LoRA + GradCache"],
                        "<=", 1.5),
    ])


def main() -> None:
    parser = argument_parser("mrl_combination", __doc__)
    parser.add_argument("--pairs", type=int, default=2048, help="training pairs seen by every method")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--lr-lora", type=float, default=1e-3)
    parser.add_argument("--lr-full", type=float, default=2e-5)
    parser.add_argument("--distractors", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=15,
                        help="paired rounds of the step timing, one step of every method each (after a warm-up round)")
    parser.add_argument("--n-test", type=int, default=None,
                        help="score only the first N test queries (default: all of them)")
    args = parser.parse_args()
    require_paired_rounds(parser, "--rounds", args.rounds)
    if args.figures_only:
        print("\n".join(recompute_figures(RESULTS, figures)))
        return
    run = Run("mrl_combination", args)

    base, tokenizer = models.load_minilm("cpu")
    train_rows = data.load_code_search("train")
    test = data.load_code_search("test")[:args.n_test]
    distractors = data.load_distractors(n=args.distractors, seed=0)
    steps = args.pairs // args.batch
    first_batch = next(train.batches(train_rows, args.batch, seed=0))
    untrained, pretrained_ranks = scores(base, tokenizer, test, distractors)
    items = {PRETRAINED: pretrained_ranks}
    result = {
        **run.fields(),
        "steps": steps, "steps_per_epoch": len(train_rows) // args.batch, "train_pairs": len(train_rows),
        "n_queries": len(test), "n_docs": len(test) + len(distractors), "dims": list(DIMS),
        "seeds_flickr30k": SEEDS,
        "untrained": untrained,
        "methods": {},
    }
    for name, (use_lora, use_gc, use_mrl) in METHODS.items():
        torch.manual_seed(0)
        model = build(base, use_lora, args.r)
        step = method_step(name, tokenizer, args.chunk)
        lr = args.lr_lora if use_lora else args.lr_full
        mem = step_memory(model, step, first_batch, lr)
        history = train.train(model, step, train.batches(train_rows, args.batch, seed=0), steps=steps, lr=lr,
                              warmup_steps=max(1, steps // 10), desc=name, loss_fn_does_backward=True)
        method_scores, items[name] = scores(model, tokenizer, test, distractors)
        result["methods"][name] = {
            "trainable": lora.count_parameters(model)[0],
            "memory": mem,
            "seconds_per_step": round(history.seconds_per_step, 3),
            "epoch_seconds": round(history.seconds_per_step * result["steps_per_epoch"]),
            "loss_first": round(history.loss[0], 4), "loss_last": round(history.loss[-1], 4),
            "scores": method_scores,
        }
        print(name, json.dumps(result["methods"][name]["scores"]["384"]), json.dumps(result["methods"][name]["scores"]["64"]))
        del model
    result["step_times"] = step_times(base, tokenizer, train_rows, args)
    comparisons = [compare(a, items[a][str(dim)], b, items[b][str(dim)], dim)
                   for a, b in comparison_pairs(list(result["methods"])) for dim in DIMS]
    result["comparisons"] = comparisons
    result["items"] = items
    result["seconds"] = run.seconds()
    lines = save_result(RESULTS, result, figures)
    print(json.dumps({k: v for k, v in result.items() if k not in ("comparisons", "items")}, indent=2))
    print("paired over the same queries, 95% intervals:")
    for c in comparisons:
        print(f"{c['dim']:3d} numbers: {paired_line(c, 'recall@10')} | {paired_line(c, 'mrr')}")
    print(f"seconds per step side by side ({args.rounds} paired rounds, batch {args.batch}), over LoRA's:")
    for name, ratio in result["step_times"]["over_lora"].items():
        print(f"  {name}: {ratio['ratio']:.3f} [{ratio['low']:.3f}, {ratio['high']:.3f}] ({ratio['verdict']})")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
