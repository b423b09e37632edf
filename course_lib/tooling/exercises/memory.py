"""Chapter 05's build-it exercise: the memory of one training step, from a model's config by hand.

The learner writes ``training_memory(config)``: the bytes of weights, gradients, optimizer state
and activations of one float32 training step of a Llama-style decoder (full fine-tuning, or LoRA
on q_proj and v_proj), with or without gradient checkpointing, by the accounting rules the
chapter states. `check_training_memory` compares it with

* three small configurations worked out by hand (the arithmetic is written out below), and
* `course_lib.budget.estimate` on the same configurations and on SmolLM2's, computed *before*
  the learner's function runs,

while the estimator, its planner, the memory measurements and accelerate's memory estimator
raise `ShortcutError`.
"""

from __future__ import annotations

import contextlib
import importlib

from . import ShortcutError, forbidden  # noqa: F401 (ShortcutError: what a shortcut raises)

TERMS = ("weights", "gradients", "optimizer_state", "activations")

# tiny: h = 8, i = 16, L = 2 layers, 2 heads of d = 4 (h_q = 8), 1 KV head (h_kv = 4), V = 32; B = 2, s = 3, T = 6.
TINY = {"hidden": 8, "intermediate": 16, "layers": 2, "heads": 2, "kv_heads": 1, "vocab": 32, "tied": True,
        "method": "full", "r": 0, "batch": 2, "seq": 3, "optimizer": "adamw", "checkpointing": False}
SMOLLM2 = {"hidden": 576, "intermediate": 1536, "layers": 30, "heads": 9, "kv_heads": 3, "vocab": 49152,
           "tied": True, "method": "lora", "r": 8, "batch": 4, "seq": 128, "optimizer": "adamw", "checkpointing": False}

# Parameters of one tiny layer: q 8·8 = 64, k and v 8·4 = 32 each, o 64, gate, up, down 8·16 = 128 each, two
# norms 2·8 = 16: 592. The model: 2·592 + embedding 32·8 = 256 + final norm 8 = 1448 (untied: + 256 = 1704).
# LoRA r = 2: q 2·(8+8) = 32, v 2·(8+4) = 24 per layer, 112 in all.
# Activations per token and layer, full: norms 2·(4·8+4) + 2·4·8 = 136, attention 4·(8+2·4) + 4·8 + 4·2 = 104,
# MLP 3·4·16 = 192, linear inputs 4·(8+8+16) = 128: 560. LoRA: 72 + 104 + 192 + 4·8 + A outputs 2·2·4 = 416.
# After the layers, per token: full 4·8+4 + 4·8 + 4·8 + 4·32 + 8 = 236; LoRA 36 + 128 + 8 = 172.
# Once: rotary 2·3·4·4 = 96; full fine-tuning's token ids 8·6 = 48.
HAND_WORKED = [
    # full, AdamW, no checkpointing: 4·1448; 4·1448; 8·1448; 2·6·560 + 6·236 + 96 + 48 = 6720 + 1416 + 144
    (dict(TINY), {"weights": 5792, "gradients": 5792, "optimizer_state": 11584, "activations": 8280}),
    # LoRA r = 2, AdamW, checkpointing: 4·(1448+112); 4·112; 8·112; kept inputs 2·6·4·8 = 384
    # + max(recomputed layer 6·(416 − 4·8) = 2304, after the layers 6·172 = 1032) + 96
    (dict(TINY, method="lora", r=2, checkpointing=True),
     {"weights": 6240, "gradients": 448, "optimizer_state": 896, "activations": 2784}),
    # full, SGD, untied, checkpointing: 4·1704; 4·1704; 0; 384 + max(6·(560 − 32) = 3168, 1416) + 96 + 48
    (dict(TINY, tied=False, optimizer="sgd", checkpointing=True),
     {"weights": 6816, "gradients": 6816, "optimizer_state": 0, "activations": 3696}),
]
ESTIMATOR_ONLY = [dict(SMOLLM2), dict(SMOLLM2, checkpointing=True), dict(SMOLLM2, method="full", r=0, checkpointing=True)]


def course_lib_estimate(config: dict) -> dict:
    """`course_lib.budget.estimate` for ``config`` (float32, sdpa attention), as the four terms."""
    from course_lib.budget import ModelConfig, estimate

    c = ModelConfig("exercise", "llama", config["hidden"], config["layers"], config["heads"], config["kv_heads"],
                    config["intermediate"], config["vocab"], config["tied"], max_position_embeddings=config["seq"])
    lora = {"r": config["r"], "target_modules": ["q_proj", "v_proj"]} if config["method"] == "lora" else {}
    e = estimate(c, config["method"], weight_dtype="float32", lora_dtype="float32", optimizer=config["optimizer"],
                 gradient_checkpointing=config["checkpointing"], batch_size=config["batch"], seq_len=config["seq"],
                 device="cpu", **lora)
    return {"weights": e.weights + e.lora_parameters, "gradients": e.gradients,
            "optimizer_state": e.optimizer_state, "activations": e.activations}


def _shortcuts() -> list[tuple[object, str]]:
    """What already computes a step's memory: course_lib's estimator, planner and measurements, accelerate's."""
    import accelerate.commands.estimate as accelerate_estimate
    import accelerate.utils
    import accelerate.utils.modeling
    from transformers import PreTrainedModel

    from course_lib import budget, memory
    from course_lib.budget import configs, multi_gpu, planner

    estimate_module = importlib.import_module("course_lib.budget.estimate")  # budget.estimate is the function
    return [(estimate_module, n) for n in ("estimate", "estimate_settings", "activation_parts", "_layer_bytes",
                                           "_head_bytes", "_optimizer_bytes")] + \
        [(budget, n) for n in ("estimate", "estimate_settings", "activation_parts", "plan", "plan_gpus")] + \
        [(planner, "plan"), (multi_gpu, "plan_gpus"), (configs.ModelConfig, "parameters")] + \
        [(memory, n) for n in ("measure_step", "measure_causal_lm_step", "SavedActivations", "parameter_bytes")] + \
        [(accelerate_estimate, "estimate_training_usage"), (accelerate_estimate, "calculate_maximum_sizes"),
         (accelerate_estimate, "create_empty_model"), (accelerate.utils, "calculate_maximum_sizes"),
         (accelerate.utils.modeling, "calculate_maximum_sizes"), (PreTrainedModel, "num_parameters")]


@contextlib.contextmanager
def _refused_everywhere(functions, hint: str):
    """Like `forbidden`, for plain functions a learner may have imported by name before the check:
    their code itself raises `ShortcutError` inside the block, whatever name they are called by."""
    saved = [(f, f.__code__) for f in functions]
    try:
        for f, _ in saved:
            message = (f"this exercise asks you to write it yourself: your solution called "
                       f"{f.__module__}.{f.__name__} ({hint})")
            source = ("def refused(*args, **kwargs):\n"
                      "    from course_lib.tooling.exercises import ShortcutError\n"
                      f"    raise ShortcutError({message!r})\n")
            namespace = {}
            exec(source, namespace)  # noqa: S102 (a fixed stub; only the message varies)
            f.__code__ = namespace["refused"].__code__
        yield
    finally:
        for f, code in saved:
            f.__code__ = code


def check_training_memory(learner_fn) -> None:
    """Check ``learner_fn(config) -> {"weights", "gradients", "optimizer_state", "activations"}`` (bytes).

    Six configurations: three hand-worked tiny ones and three of SmolLM2's size (LoRA with and
    without checkpointing, full fine-tuning with it), each compared term by term, exactly.
    """
    import accelerate.commands.estimate as accelerate_estimate

    cases = [(config, expected) for config, expected in HAND_WORKED]
    for config, expected in cases:  # the hand-worked figures and course_lib's estimate must agree before we start
        if course_lib_estimate(config) != expected:
            raise RuntimeError(f"course_lib.budget.estimate no longer matches the hand-worked figures for {config}")
    cases += [(config, course_lib_estimate(config)) for config in ESTIMATOR_ONLY]
    hint = "add up the terms from the config with the rules in the exercise"
    leaves = [accelerate_estimate.estimate_training_usage, accelerate_estimate.calculate_maximum_sizes]
    with forbidden(*_shortcuts(), hint=hint), _refused_everywhere(leaves, hint):
        answers = [learner_fn(dict(config)) for config, _ in cases]
    for (config, expected), got in zip(cases, answers):
        where = (f"{config['method']}, {config['optimizer']}, checkpointing {'on' if config['checkpointing'] else 'off'}, "
                 f"hidden {config['hidden']}, {config['layers']} layers, {'tied' if config['tied'] else 'untied'}")
        if not isinstance(got, dict) or not set(TERMS) <= set(got):
            raise AssertionError(f"{where}: return a dict with the keys {TERMS}, got {got!r}")
        for term in TERMS:  # exact: every term is a whole number of bytes
            if got[term] != expected[term]:
                off = f" (off by {got[term] - expected[term]:+,})" if isinstance(got[term], (int, float)) else ""
                raise AssertionError(f"{where}: {term} should be {expected[term]:,} bytes, got {got[term]!r}{off}")
    print(f"training_memory agrees with the hand-worked figures and the estimator on {len(cases)} configurations")
