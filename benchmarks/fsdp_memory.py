"""Beyond one device: what one process holds, and what it computes, when N processes share a run (chapter 08).

1. SmolLM2-135M (float32) trained for a few AdamW steps on the same global batches of packed
   instruction rows by N = 1, 2, 4 processes (gloo on the CPU, or one GPU each), full
   fine-tuning and LoRA (r=8, every linear layer), sharded with FSDP2 (``fully_shard``, ZeRO-3):
   the bytes of parameters, gradients and optimizer state each process holds (counted on its
   local shards), the seconds per step, the losses, and the largest difference of the trained
   weights from the single process's.
2. MiniLM's in-batch-negatives loss on 16 code-search pairs split over 2 processes: the gradient
   (averaged as DDP does) with each process's own negatives, with the documents gathered across
   processes, and gathered with GradCache chunks, against the single process's 16-pair gradient.

Run:  .venv/bin/python -m benchmarks.fsdp_memory [--processes 1 2 4] [--steps 3]
(about 3 minutes on 2 CPU cores: 4 processes share 2 cores, so their seconds per step show the
cost of communication and of a crowded machine, not what 4 GPUs would do). Writes
benchmarks/runs/fsdp_memory.json (``--save``: benchmarks/results/) and ends with its FIGURE lines; ``--figures-only``
recomputes them from that JSON, measuring nothing.
"""

from __future__ import annotations

import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.report import RESULTS_DIR, Run, argument_parser, figure, recompute_figures, save_result
from course_lib import distributed
from course_lib.tooling import fsdp_demo

RESULTS = RESULTS_DIR / "fsdp_memory.json"


def held(run: dict) -> int:
    """Parameter + gradient + optimizer-state bytes one rank held after its last step."""
    return sum(run["bytes"].values())


def sharded_training(processes: list[int], methods: list[str], steps: int, batch_size: int, seq_len: int,
                     timeout: float) -> list[dict]:
    rows, reference = [], {}
    for method in methods:
        for n in processes:
            start = time.perf_counter()
            results = distributed.launch(fsdp_demo.train_smollm2, n, method, "full", steps, batch_size, seq_len,
                                         timeout=timeout)
            seconds = time.perf_counter() - start
            first = results[0]
            if n == 1:
                reference[method] = first
            ref = reference.get(method)
            gap = None
            if ref is not None and n > 1:
                gap = max((first["trainable"][k] - ref["trainable"][k]).abs().max().item() for k in ref["trainable"])
            rows.append({
                "method": method, "processes": n,
                "bytes_per_rank": [r["bytes"] for r in results],
                "state_bytes_max_rank": max(held(r) for r in results),
                "losses": first["losses"],
                "seconds_per_step": round(min(first["step_seconds"][1:] or first["step_seconds"]), 3),
                "seconds_run": round(seconds, 1),
                "max_weight_gap_vs_one_process": gap,
            })
            print(json.dumps(rows[-1]), flush=True)
    return rows


def contrastive(batch_size: int, timeout: float) -> dict:
    one = distributed.launch(fsdp_demo.minilm_gradient, 1, "gathered", batch_size, timeout=timeout)[0]
    out = {"batch": batch_size, "processes": 2, "loss_one_process": one["loss"]}
    for mode in fsdp_demo.MINILM_MODES:
        r = distributed.launch(fsdp_demo.minilm_gradient, 2, mode, batch_size, timeout=timeout)[0]
        gap = ((r["gradient"] - one["gradient"]).norm() / one["gradient"].norm()).item()
        out[mode] = {"loss": r["loss"], "negatives_per_query": r["negatives_per_query"], "gradient_gap": gap}
    return out


def figures(result: dict) -> list[str]:
    """The FIGURE lines of a result of this script, from its recorded measurements alone."""
    lines = []
    for method in sorted({r["method"] for r in result["training"]}):
        by_n = {r["processes"]: r for r in result["training"] if r["method"] == method}
        if 1 in by_n and 2 in by_n:
            one, two = by_n[1], by_n[2]
            lines.append(figure(f"{method}_per_rank_state_bytes_2_over_1_processes",
                                two["state_bytes_max_rank"] / one["state_bytes_max_rank"], "<=", 0.55))
            gap = max(abs(a - b) / abs(b) for a, b in zip(two["losses"], one["losses"]))
            lines.append(figure(f"{method}_fsdp_loss_gap_relative", gap, "<=", 1e-5))
    c = result["contrastive"]
    lines.append(figure("gathered_negatives_gradient_gap_relative", c["gathered"]["gradient_gap"], "<=", 1e-5))
    lines.append(figure("per_process_negatives_gradient_gap_relative", c["per_process"]["gradient_gap"], ">", 1e-2))
    return lines


def main() -> None:
    parser = argument_parser("fsdp_memory", __doc__)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--methods", nargs="+", choices=["full", "lora"], default=["full", "lora"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8, help="packed rows per global batch (divisible by every N)")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--contrastive-batch", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args()
    if args.figures_only:
        print("\n".join(recompute_figures(RESULTS, figures)))
        return
    if 1 not in args.processes:
        parser.error("--processes must include 1: the single process is the reference")
    run = Run("fsdp_memory", args, skip=("timeout",))
    training = sharded_training(sorted(args.processes), args.methods, args.steps, args.batch, args.seq_len,
                                args.timeout)
    result = {**run.fields(), "training": training,
              "contrastive": contrastive(args.contrastive_batch, args.timeout)}
    result["seconds"] = run.seconds()
    lines = save_result(RESULTS, result, figures)
    print(json.dumps(result, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
