"""Longer LoRA runs than a notebook's 4-minute budget allows: chapter 01 shows this file's JSON.

1. MiniLM on code search: a rank sweep r in {1, 2, 4, 8, 16, 32} (LoRA on query/value) and full
   fine-tuning, each for the same number of steps on the same batches; test recall@10 and MRR,
   trainable parameters, optimizer-state bytes, seconds per step.
2. SmolLM2 on the instruction task: LoRA r=8 on q_proj/v_proj vs full fine-tuning, same steps
   and batches; exact match and perplexity on the test instructions, seconds per step.

Every model's per-item scores are kept under ``"items"``, the untrained models' too: for MiniLM
each test query's 1-based rank of its relevant document (``"pretrained"``, ``"lora_r1"`` …
``"lora_r32"``, ``"full"``), for SmolLM2 each test instruction's ``[nll, tokens]`` and right/wrong
answer (``"base"``, ``"lora"``, ``"full"``). ``"comparisons"`` records paired differences, each
with its seeded 95% bootstrap interval and verdict (`report.compare_rankings`,
`report.compare_answers`, McNemar's p for exact match): for MiniLM, recall@10 and MRR of each
trained model minus the pretrained one, of each LoRA rank minus full fine-tuning, and along the
sweep (r=8 minus r=1, r=32 minus r=8, r=32 minus r=1); for SmolLM2, perplexity and exact match of
LoRA minus the base model, full fine-tuning minus the base model, and LoRA minus full
fine-tuning. Each comparison says which model it is about (``"model"``: ``"minilm"`` or
``"smollm2"``); the run prints them all before its FIGURE lines. Every step's seconds are kept
(``step_seconds``): full fine-tuning's step over LoRA's is the median of the step-by-step ratios
on the same batches, with its interval (`report.per_step_ratio`).

Run:  .venv/bin/python -m benchmarks.lora_training [--minilm-steps 40] [--smollm-steps 40]
(15 to 20 minutes on 2 CPU cores, by the machine). Everything is measured in this one run, side by side.
``--ranks`` and ``--n-queries`` shorten a trial run (default: the whole sweep, all test queries).
Writes benchmarks/runs/lora_training.json (``--save``: the committed benchmarks/results/lora_training.json)
and ends with its FIGURE lines; ``--figures-only`` recomputes them from that JSON, measuring nothing (a JSON written before the items were recorded
works too).
"""

from __future__ import annotations

import copy
import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from benchmarks.report import (
    RESULTS_DIR,
    Run,
    answer_items,
    argument_parser,
    compare_answers,
    compare_rankings,
    figure,
    inject_seeded_lora,
    interval_figure,
    paired_line,
    recompute_figures,
    save_result,
    step_ratio_figures,
    step_seconds,
)
from course_lib import data, instruct, lora, models, retrieval, train
from course_lib.memory import optimizer_state_bytes

RESULTS = RESULTS_DIR / "lora_training.json"
RANKS = (1, 2, 4, 8, 16, 32)
SWEEP_PAIRS = ((1, 8), (8, 32), (1, 32))   # (a, b): LoRA r=b minus r=a, what chapter 01 reads off the sweep


def score_code_search(model, tokenizer, test: list) -> tuple[dict, list[int]]:
    """`retrieval.evaluate_code_search`'s metrics (rounded to 4 places, floats only) and each test
    query's 1-based rank of its relevant document, from the same embeddings."""
    q, d = retrieval.embed_code_search(model, tokenizer, test)
    relevant = list(range(len(test)))
    metrics = retrieval.retrieval_metrics(q, d, relevant)
    ranks = retrieval.relevant_ranks(q, d, relevant)
    return {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)}, [int(r) for r in ranks]


def score_answers(model, tokenizer, test: list) -> tuple[dict, dict]:
    """Exact match and answer perplexity on the test instructions, and the per-instruction record
    (`report.answer_items`) they are computed from."""
    instructions = [r["instruction"] for r in test]
    answers = [r["answer"] for r in test]
    predictions = instruct.generate_answers(model, tokenizer, instructions)
    nll = instruct.answer_nll(model, tokenizer, instructions, answers)
    metrics = {"exact_match": round(instruct.exact_match(predictions, answers), 4),
               # = instruct.perplexity(model, tokenizer, instructions, answers), from the same rows
               "perplexity": round(math.exp(nll[:, 0].sum().item() / nll[:, 1].sum().item()), 3)}
    return metrics, answer_items(nll, instruct.exact_matches(predictions, answers))


def run_minilm(base, tokenizer, method: str, r: int | None, steps: int, batch: int,
               test: list) -> tuple[dict, list[int]]:
    model = copy.deepcopy(base)
    if method == "lora":
        inject_seeded_lora(model, target_modules=["query", "value"], r=r, lora_alpha=2 * r)
        lr = 1e-3
    else:
        lr = 2e-5
    trainable, total = lora.count_parameters(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    rows = data.load_code_search("train")
    history = train.train(model, lambda m, b: retrieval.code_search_loss(m, tokenizer, b),
                          train.batches(rows, batch, seed=0), steps=steps, optimizer=optimizer,
                          warmup_steps=steps // 10, desc=f"MiniLM {method} r={r}")
    metrics, ranks = score_code_search(model, tokenizer, test)
    return {"method": method, "r": r, "trainable": trainable, "total": total,
            "optimizer_state_bytes": optimizer_state_bytes(optimizer),
            "seconds_per_step": round(history.seconds_per_step, 3), "step_seconds": step_seconds(history),
            "loss_first": round(history.loss[0], 4), "loss_last": round(history.loss[-1], 4),
            **metrics}, ranks


def run_smollm(base, tokenizer, method: str, steps: int, batch: int, test: list) -> tuple[dict, dict]:
    model = copy.deepcopy(base)
    if method == "lora":
        inject_seeded_lora(model, target_modules=["q_proj", "v_proj"], r=8, lora_alpha=16)
        lr = 2e-3
    else:
        lr = 2e-5
    trainable, total = lora.count_parameters(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    rows = data.load_instruct("train")
    history = train.train(model, lambda m, b: instruct.answer_loss(m, tokenizer, b),
                          train.batches(rows, batch, seed=0), steps=steps, optimizer=optimizer,
                          warmup_steps=steps // 10, desc=f"SmolLM2 {method}")
    metrics, items = score_answers(model, tokenizer, test)
    result = {"method": method, "trainable": trainable, "total": total,
              "optimizer_state_bytes": optimizer_state_bytes(optimizer),
              "seconds_per_step": round(history.seconds_per_step, 3), "step_seconds": step_seconds(history),
              "loss_first": round(history.loss[0], 4), "loss_last": round(history.loss[-1], 4),
              **metrics}
    del model, optimizer
    return result, items


def minilm_name(row: dict) -> str:
    return f"lora_r{row['r']}" if row["method"] == "lora" else row["method"]


def comparisons_of(items: dict) -> list[dict]:
    """The paired comparisons this script records, from its per-item scores (see the docstring)."""
    minilm, smollm = items["minilm"], items["smollm2"]
    trained = [name for name in minilm if name != "pretrained"]
    loras = [name for name in trained if name.startswith("lora_r")]
    pairs = [("pretrained", name) for name in trained] + [("full", name) for name in loras]
    pairs += [(f"lora_r{a}", f"lora_r{b}") for a, b in SWEEP_PAIRS if {f"lora_r{a}", f"lora_r{b}"} <= set(minilm)]
    comparisons = [{"model": "minilm", **compare_rankings(a, minilm[a], b, minilm[b])} for a, b in pairs]
    comparisons += [{"model": "smollm2", **compare_answers(a, smollm[a], b, smollm[b])}
                    for a, b in (("base", "lora"), ("base", "full"), ("full", "lora"))]
    return comparisons


def figures(result: dict) -> list[str]:
    """The FIGURE lines of a result of this script, from its recorded measurements alone."""
    minilm = result["minilm"]
    r8 = next(x for x in minilm if x["r"] == 8)
    full = minilm[-1]
    lora_lm, full_lm = result["smollm2"]
    gain = next(c for c in result["comparisons"] if (c.get("model"), c["a"], c["b"]) == ("minilm", "pretrained", "lora_r8"))
    return [
        figure("minilm_lora_r8_recall10_gain", r8["recall@10"] - result["minilm_baseline"]["recall@10"], ">", 0),
        interval_figure("minilm_lora_r8_recall10_gain", gain["recall@10"], ">", 0),   # paired over the same queries
        # full fine-tuning's step over LoRA's, against the seed's "15-20x faster"
        *step_ratio_figures("minilm_full_over_lora_r8_seconds_per_step", full, r8, ">=", 15),
        *step_ratio_figures("smollm2_full_over_lora_seconds_per_step", full_lm, lora_lm, ">=", 15),
        figure("smollm2_lora_exact_match", lora_lm["exact_match"], ">", 0.02),
    ]


def main() -> None:
    parser = argument_parser("lora_training", __doc__)
    parser.add_argument("--minilm-steps", type=int, default=40)
    parser.add_argument("--minilm-batch", type=int, default=32)
    parser.add_argument("--smollm-steps", type=int, default=40)
    parser.add_argument("--smollm-batch", type=int, default=8)
    parser.add_argument("--n-instruct", type=int, default=100)
    parser.add_argument("--ranks", type=int, nargs="+", default=list(RANKS),
                        help="LoRA ranks of the MiniLM sweep (default: %(default)s; the FIGURE lines need 8)")
    parser.add_argument("--n-queries", type=int, default=None,
                        help="score MiniLM on the first N test queries only (default: all of them)")
    args = parser.parse_args()
    if args.figures_only:
        print("\n".join(recompute_figures(RESULTS, figures)))
        return
    run = Run("lora_training", args)

    encoder, tokenizer = models.load_minilm("cpu")
    test = data.load_code_search("test")[:args.n_queries]
    baseline, baseline_ranks = score_code_search(encoder, tokenizer, test)
    minilm, minilm_items = [], {"pretrained": baseline_ranks}
    for method, r in [("lora", r) for r in args.ranks] + [("full", None)]:
        row, ranks = run_minilm(encoder, tokenizer, method, r, args.minilm_steps, args.minilm_batch, test)
        minilm.append(row)
        minilm_items[minilm_name(row)] = ranks
    del encoder

    lm, lm_tokenizer = models.load_smollm2("cpu")
    instruct_test = data.load_instruct("test")[:args.n_instruct]
    smollm2_base, base_items = score_answers(lm, lm_tokenizer, instruct_test)
    smollm, smollm_items = [], {"base": base_items}
    for method in ("lora", "full"):
        row, answers = run_smollm(lm, lm_tokenizer, method, args.smollm_steps, args.smollm_batch, instruct_test)
        smollm.append(row)
        smollm_items[method] = answers

    items = {"minilm": minilm_items, "smollm2": smollm_items}
    comparisons = comparisons_of(items)
    result = {
        **run.fields(),
        "minilm_baseline": baseline,
        "minilm": minilm, "smollm2": smollm, "smollm2_base": smollm2_base,
        "comparisons": comparisons, "items": items,
    }
    lines = save_result(RESULTS, result, figures)
    print(json.dumps({k: v for k, v in result.items() if k != "items"}, indent=2))
    for c in comparisons:
        if c["model"] == "minilm":
            print("MiniLM:", paired_line(c, "recall@10"), "|", paired_line(c, "mrr"))
        else:
            print("SmolLM2:", paired_line(c, "perplexity"), "|", paired_line(c, "exact_match"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
