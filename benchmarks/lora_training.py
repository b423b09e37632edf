"""Longer LoRA runs than a notebook's 4-minute budget allows: chapter 01 shows this file's JSON.

1. MiniLM on code search: a rank sweep r in {1, 2, 4, 8, 16, 32} (LoRA on query/value) and full
   fine-tuning, each for the same number of steps on the same batches; test recall@10 and MRR,
   trainable parameters, optimizer-state bytes, seconds per step.
2. SmolLM2 on the instruction task: LoRA r=8 on q_proj/v_proj vs full fine-tuning, same steps
   and batches; exact match and perplexity on the test instructions, seconds per step.

Run:  .venv/bin/python -m benchmarks.lora_training [--minilm-steps 40] [--smollm-steps 40]
(about 20 minutes on 2 CPU cores). Everything is measured in this one run, side by side.
Writes benchmarks/results/lora_training.json and ends with its FIGURE lines; ``--figures-only``
recomputes them from that JSON, measuring nothing.
"""

from __future__ import annotations

import copy
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from benchmarks.report import RESULTS_DIR, Run, argument_parser, figure, recompute_figures, save_result
from course_lib import data, instruct, lora, models, retrieval, train
from course_lib.memory import optimizer_state_bytes

RESULTS = RESULTS_DIR / "lora_training.json"


def run_minilm(base, tokenizer, method: str, r: int | None, steps: int, batch: int, test: list) -> dict:
    model = copy.deepcopy(base)
    if method == "lora":
        lora.inject_lora(model, target_modules=["query", "value"], r=r, lora_alpha=2 * r)
        lr = 1e-3
    else:
        lr = 2e-5
    trainable, total = lora.count_parameters(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    rows = data.load_code_search("train")
    history = train.train(model, lambda m, b: retrieval.code_search_loss(m, tokenizer, b),
                          train.batches(rows, batch, seed=0), steps=steps, optimizer=optimizer,
                          warmup_steps=steps // 10, desc=f"MiniLM {method} r={r}")
    metrics = retrieval.evaluate_code_search(model, tokenizer, test)
    return {"method": method, "r": r, "trainable": trainable, "total": total,
            "optimizer_state_bytes": optimizer_state_bytes(optimizer),
            "seconds_per_step": round(history.seconds_per_step, 3),
            "loss_first": round(history.loss[0], 4), "loss_last": round(history.loss[-1], 4),
            **{k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)}}


def run_smollm(base, tokenizer, method: str, steps: int, batch: int, test: list) -> dict:
    model = copy.deepcopy(base)
    if method == "lora":
        lora.inject_lora(model, target_modules=["q_proj", "v_proj"], r=8, lora_alpha=16)
        lr = 2e-3
    else:
        lr = 2e-5
    trainable, total = lora.count_parameters(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    rows = data.load_instruct("train")
    history = train.train(model, lambda m, b: instruct.answer_loss(m, tokenizer, b),
                          train.batches(rows, batch, seed=0), steps=steps, optimizer=optimizer,
                          warmup_steps=steps // 10, desc=f"SmolLM2 {method}")
    instructions = [r["instruction"] for r in test]
    answers = [r["answer"] for r in test]
    predictions = instruct.generate_answers(model, tokenizer, instructions)
    result = {"method": method, "trainable": trainable, "total": total,
              "optimizer_state_bytes": optimizer_state_bytes(optimizer),
              "seconds_per_step": round(history.seconds_per_step, 3),
              "loss_first": round(history.loss[0], 4), "loss_last": round(history.loss[-1], 4),
              "exact_match": round(instruct.exact_match(predictions, answers), 4),
              "perplexity": round(instruct.perplexity(model, tokenizer, instructions, answers), 3)}
    del model, optimizer
    return result


def figures(result: dict) -> list[str]:
    """The FIGURE lines of a result of this script, from its recorded measurements alone."""
    minilm = result["minilm"]
    r8 = next(x for x in minilm if x["r"] == 8)
    full = minilm[-1]
    lora_lm, full_lm = result["smollm2"]
    return [
        figure("minilm_lora_r8_recall10_gain", r8["recall@10"] - result["minilm_baseline"]["recall@10"], ">", 0),
        figure("minilm_full_over_lora_r8_seconds_per_step",
               full["seconds_per_step"] / r8["seconds_per_step"], ">=", 15),  # the seed's "15-20x faster"
        figure("smollm2_full_over_lora_seconds_per_step",
               full_lm["seconds_per_step"] / lora_lm["seconds_per_step"], ">=", 15),
        figure("smollm2_lora_exact_match", lora_lm["exact_match"], ">", 0.02),
    ]


def main() -> None:
    parser = argument_parser("lora_training", __doc__)
    parser.add_argument("--minilm-steps", type=int, default=40)
    parser.add_argument("--minilm-batch", type=int, default=32)
    parser.add_argument("--smollm-steps", type=int, default=40)
    parser.add_argument("--smollm-batch", type=int, default=8)
    parser.add_argument("--n-instruct", type=int, default=100)
    args = parser.parse_args()
    if args.figures_only:
        print("\n".join(recompute_figures(RESULTS, figures)))
        return
    run = Run("lora_training", args)

    encoder, tokenizer = models.load_minilm("cpu")
    test = data.load_code_search("test")
    baseline = retrieval.evaluate_code_search(encoder, tokenizer, test)
    minilm = [run_minilm(encoder, tokenizer, "lora", r, args.minilm_steps, args.minilm_batch, test)
              for r in (1, 2, 4, 8, 16, 32)]
    minilm.append(run_minilm(encoder, tokenizer, "full", None, args.minilm_steps, args.minilm_batch, test))
    del encoder

    lm, lm_tokenizer = models.load_smollm2("cpu")
    instruct = data.load_instruct("test")[:args.n_instruct]
    smollm = [run_smollm(lm, lm_tokenizer, m, args.smollm_steps, args.smollm_batch, instruct)
              for m in ("lora", "full")]

    result = {
        **run.fields(),
        "minilm_baseline": {k: round(v, 4) for k, v in baseline.items() if isinstance(v, float)},
        "minilm": minilm, "smollm2": smollm,
    }
    lines = save_result(RESULTS, result, figures)
    print(json.dumps(result, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
