"""The parameter-efficient methods on one task and one budget: chapter 07 shows this file's JSON.

SmolLM2 on the course's instruction task, each method trained from the same base for the same
number of steps on the same batches (`course_lib.peft_methods.run_method`): prompt tuning, prefix
tuning, bottleneck adapters (course_lib), IA³, LoRA, DoRA (peft) and full fine-tuning. Reported
per method: trainable parameters, AdamW state, the memory of one training step (chapter 03's
tensor accounting), seconds per step, first / last loss, test exact match and answer perplexity.

Run:  .venv/bin/python -m benchmarks.peft_methods [--steps 24] [--batch 8] [--n-test 64]
(about 15 minutes on 2 CPU cores). Everything is measured in this one run, side by side.
Writes the JSON ``--out`` (benchmarks/results/peft_methods.json) and ends with its FIGURE lines;
``--figures-only`` recomputes them from that JSON, measuring nothing. A JSON written before the
bottleneck adapter's formula count was recorded gets no figure for it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from benchmarks.report import RESULTS_DIR, Run, argument_parser, figure, recompute_figures, save_result
from course_lib import adapters, data, models, peft_methods

FORMULA_KEY = "bottleneck_adapter_parameters_by_formula"


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
        lines.append(figure("dora_seconds_per_step_over_lora", by["dora"]["seconds_per_step"] / by["lora"]["seconds_per_step"], "<=", 1.5))
    if {"prompt_tuning", "lora"} <= set(by):
        lines.append(figure("prompt_tuning_perplexity_over_lora", by["prompt_tuning"]["perplexity"] / by["lora"]["perplexity"], "<=", 1.5))
    return lines


def main() -> int:
    parser = argument_parser("peft_methods", __doc__)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--n-test", type=int, default=64)
    parser.add_argument("--methods", nargs="+", default=list(peft_methods.METHODS), choices=peft_methods.METHODS)
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
    runs = []
    for method in args.methods:
        r = peft_methods.run_method(base, tok, method, train_rows, test_rows, steps=args.steps,
                                    batch_size=args.batch, progress=False)
        row = {k: v for k, v in r.items() if k not in ("history", "model", "predictions")}
        row["step_memory"] = r["step_memory"]
        row["losses"] = [round(x, 4) for x in r["history"].loss]
        row["examples"] = list(zip([t["answer"] for t in test_rows[:5]], r["predictions"][:5], strict=True))
        runs.append(row)
        print(f"{method:<20} trainable {row['trainable']:>11,}  state {row['optimizer_state_bytes'] / 2**20:8.2f} MiB  "
              f"step memory {row['step_memory']['total'] / 2**20:7.0f} MiB  {row['seconds_per_step']:5.2f} s/step  "
              f"loss {row['loss_first']:.2f}->{row['loss_last']:.2f}  exact match {row['exact_match']:.3f}  "
              f"perplexity {row['perplexity']:.2f}", flush=True)
    result = {**run.fields(), "steps": args.steps, "batch": args.batch, "n_test": len(test_rows)}
    if "bottleneck_adapter" in args.methods:
        bottleneck = peft_methods.DEFAULTS["bottleneck_adapter"]
        result[FORMULA_KEY] = adapters.adapter_parameter_count(base.config, bottleneck["bottleneck_size"],
                                                               bottleneck["placement"])
    result["runs"] = runs
    print("\n".join(save_result(args.out, result, figures, indent=1)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
