"""QLoRA vs 32-bit LoRA on SmolLM2 for more steps than chapter 02's 4-minute budget allows.

Three runs of the same adapter (LoRA r=8, alpha 16 on q_proj/v_proj, the same initial A and B,
the same batches of the instruction task, AdamW at 2e-3) on three bases:

1. ``lora_fp32``: the float32 SmolLM2 (chapter 01's LoRA);
2. ``qlora_course_lib``: `course_lib.qlora.prepare_model_for_qlora` (NF4 + double quantization);
3. ``qlora_bnb_peft``: transformers' ``BitsAndBytesConfig`` (NF4 + double quantization) with
   peft's ``prepare_model_for_kbit_training`` and ``get_peft_model``.

Each is scored on the test instructions by exact match of greedy answers and by answer
perplexity. All three run on this machine's CPU in float32 compute, in this one run. Every
model's per-instruction scores are kept (the untrained model's too), and the JSON records the
paired comparisons (95% bootstrap intervals, McNemar's p): each training against the untrained
model, QLoRA against 32-bit LoRA, and bitsandbytes + peft against course_lib. Every step's seconds
are kept too (``step_seconds``): the runs train on the same batch at each step, so the two QLoRA
steps' ratio is the median of the step-by-step ratios, with its interval (`report.per_step_ratio`).

Run:  .venv/bin/python -m benchmarks.qlora_training [--steps 40] [--n-instruct 100]
(about 7 minutes on 2 CPU cores). Writes benchmarks/runs/qlora_training.json (``--save``: the committed
benchmarks/results/qlora_training.json) and ends with its FIGURE lines; ``--figures-only`` recomputes them from that JSON, measuring nothing.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from benchmarks.report import (
    RESULTS_DIR,
    Run,
    answer_items,
    argument_parser,
    compare_answers,
    figure,
    interval_figure,
    paired_line,
    recompute_figures,
    save_result,
    step_ratio_figures,
    step_seconds,
)
from course_lib import data, instruct, lora, models, qlora, train
from course_lib.memory import optimizer_state_bytes

RESULTS = RESULTS_DIR / "qlora_training.json"


def adapter_state(model) -> dict[str, torch.Tensor]:
    """LoRA tensors by a name that peft's and course_lib's models share."""
    return {k.replace("base_model.model.", "").replace(".default", ""): v
            for k, v in model.state_dict().items() if "lora_" in k}


def bnb_peft_qlora(device: str = "cpu"):
    """The production QLoRA recipe on SmolLM2: transformers' ``BitsAndBytesConfig`` (NF4 + double
    quantization, compute in float32 on CPU and bfloat16 on CUDA, as `models.default_dtype`),
    peft's ``prepare_model_for_kbit_training`` and ``get_peft_model`` (LoRA r=8, alpha 16 on q_proj
    and v_proj, no dropout)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=models.default_dtype(device))
    model, _ = models.load_smollm2(device, quantization_config=config)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    train.seed_everything(0)   # peft draws lora_A from torch's generator, seeded at random per process
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                            lora_dropout=0.0, task_type="CAUSAL_LM"))


def course_lib_lora(base, quantized: bool, initial: dict[str, torch.Tensor]):
    """The same adapter with course_lib on a copy of ``base``: NF4 + double quantization first
    (`qlora.prepare_model_for_qlora`) if ``quantized``, then `lora.inject_lora`, its tensors set to
    ``initial`` (`adapter_state` of the bitsandbytes + peft model)."""
    model = copy.deepcopy(base)
    if quantized:
        qlora.prepare_model_for_qlora(model)
    lora.inject_lora(model, target_modules=["q_proj", "v_proj"], r=8, lora_alpha=16)
    with torch.no_grad():
        for k, v in adapter_state(model).items():
            v.copy_(initial[k])
    return model


def train_and_score(label: str, model, tokenizer, steps: int, batch: int, test: list) -> dict:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    history = train.train(model, lambda m, b: instruct.answer_loss(m, tokenizer, b),
                          train.batches(data.load_instruct("train"), batch, seed=0), steps=steps,
                          optimizer=optimizer, warmup_steps=max(1, steps // 10), seed=0, desc=label)
    instructions = [r["instruction"] for r in test]
    answers = [r["answer"] for r in test]
    predictions = instruct.generate_answers(model, tokenizer, instructions)
    nll = instruct.answer_nll(model, tokenizer, instructions, answers)
    return {"method": label, "trainable": lora.count_parameters(model)[0],
            "optimizer_state_bytes": optimizer_state_bytes(optimizer),
            "seconds_per_step": round(history.seconds_per_step, 3),
            "step_seconds": step_seconds(history),
            "loss": [round(x, 5) for x in history.loss],
            "exact_match": round(instruct.exact_match(predictions, answers), 4),
            "perplexity": round(math.exp(nll[:, 0].sum().item() / nll[:, 1].sum().item()), 3),
            "items": answer_items(nll, instruct.exact_matches(predictions, answers))}


def zero_shot(model, tokenizer, test: list) -> dict:
    """The untrained model's per-instruction record, the reference each training is compared with."""
    instructions, answers = [r["instruction"] for r in test], [r["answer"] for r in test]
    return answer_items(instruct.answer_nll(model, tokenizer, instructions, answers),
                        instruct.exact_matches(instruct.generate_answers(model, tokenizer, instructions), answers))


def figures(result: dict) -> list[str]:
    """The FIGURE lines of a result of this script, from its recorded measurements alone."""
    lora32, ours4, bnb4 = result["runs"]
    paired = next(c for c in result["comparisons"] if (c["a"], c["b"]) == ("lora_fp32", "qlora_course_lib"))
    return [
        figure("qlora_minus_lora_exact_match", ours4["exact_match"] - lora32["exact_match"], ">=", -0.05),
        interval_figure("qlora_minus_lora_exact_match", paired["exact_match"], ">=", -0.05),   # the same instructions
        figure("qlora_over_lora_answer_perplexity", ours4["perplexity"] / lora32["perplexity"], "<=", 1.15),
        figure("qlora_course_lib_vs_bnb_max_loss_gap",
               max(abs(a - b) for a, b in zip(ours4["loss"], bnb4["loss"])), "<=", 1e-2),
        # issue 22's target: course_lib's QLoRA step no slower than bitsandbytes + peft's (it was
        # 1.5 here until 2026-12-04, looser than the issue asks; a miss is reported, not hidden)
        *step_ratio_figures("qlora_course_lib_over_bnb_seconds_per_step", ours4, bnb4, "<=", 1.0),
    ]


def main() -> None:
    parser = argument_parser("qlora_training", __doc__)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--n-instruct", type=int, default=100)
    args = parser.parse_args()
    if args.figures_only:
        print("\n".join(recompute_figures(RESULTS, figures)))
        return
    run = Run("qlora_training", args)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    base, tokenizer = models.load_smollm2("cpu")
    test = data.load_instruct("test")[:args.n_instruct]
    theirs = bnb_peft_qlora()
    initial = {k: v.clone() for k, v in adapter_state(theirs).items()}
    runs = [train_and_score("lora_fp32", course_lib_lora(base, False, initial), tokenizer, args.steps, args.batch,
                            test),
            train_and_score("qlora_course_lib", course_lib_lora(base, True, initial), tokenizer, args.steps,
                            args.batch, test),
            train_and_score("qlora_bnb_peft", theirs, tokenizer, args.steps, args.batch, test)]
    import peft

    items = {"base": zero_shot(base, tokenizer, test)} | {r["method"]: r.pop("items") for r in runs}
    comparisons = [compare_answers("base", items["base"], m, items[m]) for m in ("lora_fp32", "qlora_course_lib")]
    comparisons += [compare_answers("lora_fp32", items["lora_fp32"], "qlora_course_lib", items["qlora_course_lib"]),
                    compare_answers("qlora_course_lib", items["qlora_course_lib"], "qlora_bnb_peft", items["qlora_bnb_peft"])]
    result = {**run.fields(peft=peft.__version__), "runs": runs, "comparisons": comparisons, "items": items}
    lines = save_result(RESULTS, result, figures)
    print(json.dumps({k: v for k, v in result.items() if k != "items"}, indent=2))
    for c in comparisons:
        print(paired_line(c, "perplexity"), "|", paired_line(c, "exact_match"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
