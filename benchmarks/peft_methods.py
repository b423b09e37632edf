"""The parameter-efficient methods on one task and one budget: chapter 07 shows this file's JSON.

SmolLM2 on the course's instruction task, each method trained from the same base for the same
number of steps on the same batches (`course_lib.peft_methods.run_method`): prompt tuning, prefix
tuning, bottleneck adapters (course_lib), IA³, LoRA, DoRA (peft) and full fine-tuning. Reported
per method: trainable parameters, AdamW state, the memory of the run's first training step (chapter
03's tensor accounting; results committed before 2026-12-05 measured an extra step on the first
rows instead), seconds per step, first / last loss, test exact match and answer perplexity.

Every model's per-instruction scores are kept (the base model's too), and the JSON records each
method minus the base model and minus LoRA: perplexity and exact match with 95% paired bootstrap
intervals and McNemar's p (`report.compare_answers`). Every step's seconds are kept too
(``step_seconds``): DoRA's step over LoRA's is the median of the step-by-step ratios on the same
batches, with its interval (`report.per_step_ratio`).

Where LoRA goes, at equal trainable parameters: ``lora_attention`` (r=53 on q/k/v/o_proj) against
``lora_all_linear`` (r=20 on those and the MLP's gate/up/down_proj), 30 × 3,840 × 53 = 30 × 10,176
× 20 = 6,105,600 parameters each, α = 2r, the same learning rate (``--placement-lr``): the claim
that LoRA should not go on the feed-forward layers, against the QLoRA paper's all linear layers.

Run:  .venv/bin/python -m benchmarks.peft_methods [--steps 24] [--batch 8] [--n-test 64]
(11 to 14 minutes on 2 CPU cores, by the machine). Everything is measured in this one run, side by side.
Writes the JSON ``--out`` (benchmarks/runs/peft_methods.json; ``--save``: the committed
benchmarks/results/peft_methods.json) and ends with its FIGURE lines;
``--figures-only`` recomputes them from that JSON, measuring nothing. A JSON written before the
bottleneck adapter's formula count was recorded gets no figure for it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from benchmarks.report import (
    RESULTS_DIR,
    Run,
    answer_items,
    argument_parser,
    compare_answers,
    figure,
    paired_line,
    recompute_figures,
    save_result,
    step_ratio_figures,
    step_seconds,
)
from course_lib import adapters, data, instruct, models, peft_methods

FORMULA_KEY = "bottleneck_adapter_parameters_by_formula"
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
# LoRA placement at one budget: r * (d_in + d_out) summed over a block's targets, times 30 blocks
PLACEMENTS = {"lora_attention": {"r": 53, "lora_alpha": 106, "target_modules": ATTENTION},
              "lora_all_linear": {"r": 20, "lora_alpha": 40,
                                  "target_modules": ATTENTION + ["gate_proj", "up_proj", "down_proj"]}}


def figures(result: dict) -> list[str]:
    """The FIGURE lines of a result of this script, from its recorded measurements alone.

    The bottleneck adapter's figure needs the formula's count (``FORMULA_KEY``), which the JSON
    records since --figures-only exists; without it that figure is left out.
    """
    by = {r["method"]: r for r in result["runs"]}
    lines = []
    if "bottleneck_adapter" in by and FORMULA_KEY in result:
        lines.append(figure("bottleneck_adapter_parameters_over_formula",
                            by["bottleneck_adapter"]["trainable"] / result[FORMULA_KEY], "<=", 1.0))
    if {"lora", "full"} <= set(by):
        lines.append(figure("lora_perplexity_over_full", by["lora"]["perplexity"] / by["full"]["perplexity"], "<=", 1.25))
        lines.append(figure("lora_step_memory_over_full", by["lora"]["step_memory"]["total"] / by["full"]["step_memory"]["total"], "<=", 0.75))
    if {"dora", "lora"} <= set(by):
        lines += step_ratio_figures("dora_seconds_per_step_over_lora", by["dora"], by["lora"], "<=", 1.5)
    if {"prompt_tuning", "lora"} <= set(by):
        lines.append(figure("prompt_tuning_perplexity_over_lora", by["prompt_tuning"]["perplexity"] / by["lora"]["perplexity"], "<=", 1.5))
    return lines


def main() -> int:
    parser = argument_parser("peft_methods", __doc__)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--n-test", type=int, default=64)
    parser.add_argument("--methods", nargs="+", default=list(peft_methods.METHODS), choices=peft_methods.METHODS)
    parser.add_argument("--placement-lr", type=float, default=1e-3)
    parser.add_argument("--no-placement", action="store_true", help="leave out the LoRA placement comparison")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "peft_methods.json")
    args = parser.parse_args()
    if args.figures_only:
        if FORMULA_KEY not in json.loads(args.out.read_text()):
            print(f"{args.out} records no {FORMULA_KEY}: bottleneck_adapter_parameters_over_formula is not recomputed")
        print("\n".join(recompute_figures(args.out, figures, indent=1)))
        return 0
    run = Run("peft_methods", args, skip=("out",))
    torch.manual_seed(0)
    base, tok = models.load_smollm2("cpu")
    train_rows, test_rows = data.load_instruct("train"), data.load_instruct("test")[:args.n_test]
    instructions, answers = [r["instruction"] for r in test_rows], [r["answer"] for r in test_rows]
    items = {"base": answer_items(instruct.answer_nll(base, tok, instructions, answers),
                                  instruct.exact_matches(instruct.generate_answers(base, tok, instructions), answers))}
    jobs = [(m, m, {}) for m in args.methods]
    if not args.no_placement:
        jobs += [(name, "lora", {**kw, "lr": args.placement_lr}) for name, kw in PLACEMENTS.items()]
    runs, placement = [], []
    for name, method, kwargs in jobs:
        r = peft_methods.run_method(base, tok, method, train_rows, test_rows, steps=args.steps,
                                    batch_size=args.batch, progress=False, **kwargs)
        items[name] = answer_items(r["answer_nll"], r["correct"])
        row = {k: v for k, v in r.items() if k not in ("history", "model", "predictions", "answer_nll", "correct")}
        row["method"] = name
        if name in PLACEMENTS:
            row["target_modules"] = kwargs["target_modules"]
            row["r"], row["lora_alpha"] = kwargs["r"], kwargs["lora_alpha"]
        row["losses"] = [round(x, 4) for x in r["history"].loss]
        row["step_seconds"] = step_seconds(r["history"])
        row["examples"] = list(zip(answers[:5], r["predictions"][:5], strict=True))
        (placement if name in PLACEMENTS else runs).append(row)
        print(f"{name:<20} trainable {row['trainable']:>11,}  state {row['optimizer_state_bytes'] / 2**20:8.2f} MiB  "
              f"step memory {row['step_memory']['total'] / 2**20:7.0f} MiB  {row['seconds_per_step']:5.2f} s/step  "
              f"loss {row['loss_first']:.2f}->{row['loss_last']:.2f}  exact match {row['exact_match']:.3f}  "
              f"perplexity {row['perplexity']:.2f}", flush=True)
    comparisons = [compare_answers("base", items["base"], m, items[m]) for m in args.methods]
    if "lora" in args.methods:
        comparisons += [compare_answers("lora", items["lora"], m, items[m]) for m in args.methods if m != "lora"]
    if placement:
        comparisons.append(compare_answers("lora_attention", items["lora_attention"],
                                           "lora_all_linear", items["lora_all_linear"]))
    for c in comparisons:
        print(paired_line(c, "perplexity"), "|", paired_line(c, "exact_match"), flush=True)
    result = {**run.fields(), "steps": args.steps, "batch": args.batch, "n_test": len(test_rows)}
    if "bottleneck_adapter" in args.methods:
        bottleneck = peft_methods.DEFAULTS["bottleneck_adapter"]
        result[FORMULA_KEY] = adapters.adapter_parameter_count(base.config, bottleneck["bottleneck_size"],
                                                               bottleneck["placement"])
    result["runs"] = runs
    result["placement"] = placement
    result["comparisons"] = comparisons
    result["items"] = items
    print("\n".join(save_result(args.out, result, figures, indent=1)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
