"""The ``course-lib`` command: memory budgets and plans, and the students' copies of the chapters.

    course-lib budget --model llama-3-8b --method qlora --gpu 24GB --seq 2048 --batch 4
    course-lib budget --model llama-3-8b --gpu 24GB --plan      (the same as `course-lib plan ...`)
    course-lib plan --model minilm --gpu 8GB
    course-lib plan llama-3-70b 80GB            (the same as --model llama-3-70b --gpu 80GB)
    course-lib budget --model llama-3-70b --method full --gpus 16 --sharding full --master-weights --gpu 80GB
    course-lib models
    course-lib student notebooks/ out/        (see course_lib.tooling.student)

With ``--gpus N`` the budget is one GPU's of N (``--sharding`` none / optimizer /
optimizer+gradients / full: ZeRO stages 0-3; ``--offload`` to CPU). ``plan`` for a causal LM
ends with how many GPUs of that memory full fine-tuning, LoRA and QLoRA need, and with which
sharding (`course_lib.budget.plan_gpus`; ``--max-gpus``, ``--offload``).

``--json`` prints the same numbers (bytes) for scripts. Exit status: 0 when the step fits the
GPU (or no GPU was given), 1 when it does not or the planner finds nothing that fits one GPU, 2 for
bad input, reported on one line of stderr, never as a traceback. ``student`` exits 0 when
every copy was written and 2 for bad input (a path that is not a notebook, unpaired solution
markers: the message names the file and the cell).

Each subcommand imports what it needs when it runs, so that ``course-lib budget`` starts at
once: `course_lib.budget` is plain Python, while ``student`` needs nbformat.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr with exit status 2."""

    def error(self, message: str):
        if message.endswith("expected one argument"):  # argparse read a value like -5GB as an option
            message += " (for a value that starts with '-', write the option and it as one word: --gpu=-5GB)"
        raise _UsageError(f"{message}; see {self.prog} --help")


class _UsageError(Exception):
    pass


def _memory(text: str) -> int:
    from . import budget
    try:
        return budget.parse_memory(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _modules(text: str):
    """``all-linear`` or a list of module names; nothing to adapt, or all-linear beside names, is refused here,
    so that ``budget`` and ``plan`` refuse it alike."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"no module names in {text!r}; give comma-separated names such as "
                                         "q_proj,v_proj, or all-linear")
    if "all-linear" in names:
        if len(names) > 1:
            raise argparse.ArgumentTypeError(f"all-linear already adapts every linear layer; give it alone, "
                                             f"or list names without it, not {text!r}")
        return "all-linear"
    return names


def build_parser() -> argparse.ArgumentParser:
    from . import budget  # plain Python, no torch: its names are the options' choices
    parser = _Parser(prog="course-lib", description="Memory budget of a fine-tuning step, from the model's config.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    common = _common(budget, model_required=True)

    b = commands.add_parser("budget", parents=[common], help="estimate one configuration")
    b.add_argument("--method", default="lora", choices=budget.METHODS)
    b.add_argument("--r", type=int, help="LoRA rank (default 8)")
    b.add_argument("--lora-dtype", default="float32", choices=sorted(budget.DTYPE_BYTES))
    b.add_argument("--quant", dest="quant_type", choices=("nf4", "fp4"), help="4-bit type (qlora; default nf4)")
    b.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=None,
                   help="double quantization of the absmax constants (qlora; default on)")
    b.add_argument("--quant-storage", choices=budget.QUANT_STORAGE,
                   help="dtype the 4-bit codes are packed in (qlora; default uint8, or --dtype with --sharding full)")
    b.add_argument("--checkpointing", action="store_true", help="gradient checkpointing")
    b.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    b.add_argument("--chunk", type=int, help="GradCache chunk size (encoders)")
    b.add_argument("--attention", default="sdpa", choices=budget.ATTENTION)
    b.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    b.add_argument("--master-weights", action="store_true",
                   help="mixed precision: a float32 master copy of the 16-bit trained weights")
    b.add_argument("--gpus", type=int, default=1, help="data-parallel GPUs, each with --batch sequences (default 1)")
    b.add_argument("--sharding", default="none", choices=budget.SHARDING,
                   help="ZeRO stage 0-3: none (DDP), optimizer, optimizer+gradients, full (FSDP)")
    b.add_argument("--offload", action="store_true", help="optimizer state (and with full sharding, weights) on CPU")
    b.add_argument("--plan", action="store_true", help="ignore the method settings and plan for --gpu instead")

    p = commands.add_parser("plan", parents=[_common(budget, model_required=False)],
                            help="find settings that fit --gpu, and how many such GPUs each method needs")
    p.add_argument("model_name", nargs="?", metavar="MODEL", help="the model (or --model)")
    p.add_argument("gpu_memory", nargs="?", type=_memory, metavar="GPU_MEMORY", help="e.g. 80GB (or --gpu)")
    p.add_argument("--headroom", type=float, default=0.1, help="fraction of the GPU memory kept free (default 0.1)")
    p.add_argument("--max-gpus", type=int, default=budget.MAX_GPUS,
                   help=f"the most GPUs to consider (default {budget.MAX_GPUS})")
    p.add_argument("--offload", action="store_true", help="let the GPU count plan offload states to the CPU")

    commands.add_parser("models", help="list the known model configs")

    s = commands.add_parser("student", help="write student copies of the chapters (solutions replaced by stubs)")
    s.add_argument("source", help="a chapter notebook, or a folder of them (e.g. notebooks/)")
    s.add_argument("out", help="the folder for the copies; put it beside notebooks/ (chapters read ../benchmarks)")
    s.add_argument("--overwrite", action="store_true", help="replace copies already in the folder")
    return parser


def _common(budget, model_required: bool) -> argparse.ArgumentParser:
    """The options ``budget`` and ``plan`` share (``plan`` also takes the model and memory as words)."""
    common = _Parser(add_help=False)
    common.add_argument("--model", required=model_required, help="a known model (see `course-lib models`)")
    common.add_argument("--gpu", type=_memory, help="GPU memory, e.g. 24GB (read as GiB, as cards are sold)")
    common.add_argument("--seq", type=int, default=512, help="tokens per sequence (default 512)")
    common.add_argument("--batch", type=int, help="sequences per step (budget: default 1; plan: the effective batch)")
    common.add_argument("--dtype", default="bfloat16", choices=sorted(budget.DTYPE_BYTES),
                        help="dtype of the weights that are not quantized, and of the activations")
    common.add_argument("--optimizer", default="adamw", choices=list(budget.OPTIMIZERS))
    common.add_argument("--target-modules", type=_modules, help="comma-separated module names, or all-linear")
    common.add_argument("--json", action="store_true", help="print JSON (bytes) instead of a table")
    return common


def _words_or_options(budget, args) -> None:
    """``plan MODEL GPU_MEMORY`` or ``plan --model MODEL --gpu GPU_MEMORY``: one of each, not both."""
    for word, option, flag in (("model_name", "model", "--model"), ("gpu_memory", "gpu", "--gpu")):
        given = getattr(args, word, None)
        if given is not None and getattr(args, option) is not None and given != getattr(args, option):
            shown = [budget.format_bytes(v) if option == "gpu" else v for v in (getattr(args, option), given)]
            raise ValueError(f"{flag} {shown[0]} and {shown[1]} disagree; give it once")
        if given is not None:
            setattr(args, option, given)
    if args.model is None:
        raise ValueError("planning needs a model: course-lib plan MODEL GPU_MEMORY, e.g. plan llama-3-8b 24GB")


def _plan(args) -> int:
    from . import budget
    _words_or_options(budget, args)
    if args.gpu is None:
        raise ValueError("planning needs the GPU's memory: add --gpu, e.g. --gpu 24GB (or plan MODEL 24GB)")
    headroom = getattr(args, "headroom", 0.1)
    result = budget.plan(args.model, args.gpu, batch_size=args.batch, seq_len=args.seq, headroom=headroom,
                         weight_dtype=args.dtype, optimizer=args.optimizer, target_modules=args.target_modules)
    several = {}
    if budget.get_config(args.model).architecture != "bert":  # an encoder's contrastive batch is not split so
        several = {method: budget.plan_gpus(args.model, args.gpu, method, seq_len=args.seq, headroom=headroom,
                                            weight_dtype=args.dtype, optimizer=args.optimizer,
                                            target_modules=None if method == "full" else args.target_modules,
                                            offload=args.offload, max_gpus=getattr(args, "max_gpus", budget.MAX_GPUS))
                   for method in budget.METHODS}
    if args.json:
        out = result.to_dict()
        if several:
            out["gpus"] = {method: gpu_plan.to_dict() for method, gpu_plan in several.items()}
        print(json.dumps(out, indent=2))
    else:
        lines = [result.summary()]
        if several:
            lines += ["", (f"how many GPUs of {budget.format_bytes(args.gpu)}, each with one sequence of {args.seq} "
                           "tokens and checkpointing (full fine-tuning in mixed precision, float32 master weights):")]
            lines += [f"  {gpu_plan.line()}" for gpu_plan in several.values()]
        print("\n".join(lines))
    return 0 if result.fits else 1


def _budget(args) -> int:
    if args.plan:
        return _plan(args)
    from . import budget
    estimate = budget.estimate(
        args.model, args.method, r=args.r, target_modules=args.target_modules, weight_dtype=args.dtype,
        lora_dtype=args.lora_dtype, quant_type=args.quant_type, double_quant=args.double_quant,
        optimizer=args.optimizer, gradient_checkpointing=args.checkpointing,
        batch_size=1 if args.batch is None else args.batch, seq_len=args.seq,
        gradient_accumulation_steps=args.grad_accum, chunk_size=args.chunk, attention=args.attention,
        device=args.device, gpus=args.gpus, sharding=args.sharding, offload=args.offload,
        master_weights=args.master_weights, quant_storage=args.quant_storage)
    fits = args.gpu is None or estimate.peak <= args.gpu
    if args.json:
        out = estimate.to_dict()
        if args.gpu is not None:
            out.update(gpu_memory=args.gpu, fits=fits)
        print(json.dumps(out, indent=2))
    else:
        print(estimate.table(args.gpu))
    return 0 if fits else 1


def _models(args) -> int:
    from . import budget
    for name, c in budget.MODELS.items():
        print(f"{name:<14} {c.architecture:<6} {c.parameters() / 1e9:8.3f}B  {c.source}")
    return 0


def _student(args) -> int:
    from .tooling import student  # nbformat: imported only for this command
    copies = student.write_student_copies(args.source, args.out, overwrite=args.overwrite)
    for path, result in copies.items():
        checks = ", ".join(result.nbval_names(result.exercise_cells)) or "none"
        print(f"{path}: {result.regions} solution(s) replaced by stubs; an unsolved copy fails at {checks}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
        return {"budget": _budget, "plan": _plan, "models": _models, "student": _student}[args.command](args)
    except (_UsageError, ValueError, FileExistsError) as error:
        print(f"course-lib: error: {error}", file=sys.stderr)
        return 2
    except SystemExit as exit_:  # --help
        return int(exit_.code or 0)
    except BrokenPipeError:  # `course-lib ... | head` closed the pipe: not an error (Python's docs' recipe)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as error:  # (after BrokenPipeError, an OSError too) a folder that cannot be written, a full disk
        print(f"course-lib: error: {error}; check the path and its permissions", file=sys.stderr)
        return 2
    except Exception as error:  # noqa: BLE001 (a bug: still one line, as DESIGN.md promises, but say so)
        print(f"course-lib: internal error ({type(error).__name__}: {error}); please report it", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
