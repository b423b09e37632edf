"""Chapter 05's build-it exercise: `check_training_memory` passes a correct step-memory estimate and
catches the shortcuts (course_lib's estimator, accelerate's) and a plausible mistake."""

import importlib

import pytest

from course_lib import budget, memory
from course_lib.tooling.exercises import ShortcutError
from course_lib.tooling.exercises.memory import HAND_WORKED, check_training_memory, course_lib_estimate


def reference(config):
    """A correct solution, written from the exercise's rules."""
    h, i, L, V = config["hidden"], config["intermediate"], config["layers"], config["vocab"]
    nh, r, full = config["heads"], config["r"], config["method"] == "full"
    d = h // nh
    hq, hkv = nh * d, config["kv_heads"] * d
    T = config["batch"] * config["seq"]
    P = L * (h * hq + 2 * h * hkv + hq * h + 3 * h * i + 2 * h) + V * h + h + (0 if config["tied"] else V * h)
    P_lora = 0 if full else L * r * ((h + hq) + (h + hkv))
    P_t = P if full else P_lora
    layer = (2 * (4 * h + 4) + (2 * 4 * h if full else 0) + 4 * (hq + 2 * hkv) + 4 * hq + 4 * nh + 12 * i
             + (4 * (2 * h + i) if full else 4 * h + 2 * r * 4))
    after = 4 * h + 4 + (8 * h if full else 0) + 4 * V + 8
    once = 2 * config["seq"] * d * 4 + (8 * T if full else 0)
    if config["checkpointing"]:
        activations = L * T * 4 * h + max(T * (layer - 4 * h), T * after) + once
    else:
        activations = L * T * layer + T * after + once
    return {"weights": 4 * (P + P_lora), "gradients": 4 * P_t,
            "optimizer_state": (8 if config["optimizer"] == "adamw" else 0) * P_t, "activations": activations}


def test_hand_worked_figures_are_course_libs():
    for config, expected in HAND_WORKED:
        assert course_lib_estimate(config) == expected == reference(config)


def test_a_correct_solution_passes():
    check_training_memory(reference)


def test_calling_course_libs_estimate_is_caught():
    with pytest.raises(ShortcutError):
        check_training_memory(course_lib_estimate)
    # the same function reached through another name (a notebook's `from course_lib.budget import estimate`)
    estimate = budget.estimate

    def through_alias(config):
        c = budget.ModelConfig("x", "llama", config["hidden"], config["layers"], config["heads"], config["kv_heads"],
                               config["intermediate"], config["vocab"], config["tied"], max_position_embeddings=4096)
        e = estimate(c, "full", weight_dtype="float32", batch_size=config["batch"], seq_len=config["seq"])
        return {"weights": e.weights, "gradients": e.gradients, "optimizer_state": e.optimizer_state,
                "activations": e.activations}
    with pytest.raises(ShortcutError):
        check_training_memory(through_alias)


def test_calling_accelerates_estimator_is_caught():
    from accelerate import init_empty_weights
    from accelerate.commands.estimate import calculate_maximum_sizes, estimate_training_usage
    from transformers import AutoModelForCausalLM, LlamaConfig

    def with_accelerate(config):
        cfg = LlamaConfig(hidden_size=config["hidden"], intermediate_size=config["intermediate"],
                          num_hidden_layers=config["layers"], num_attention_heads=config["heads"],
                          num_key_value_heads=config["kv_heads"], vocab_size=config["vocab"],
                          tie_word_embeddings=config["tied"])
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(cfg)
        total, _ = calculate_maximum_sizes(model)
        usage = estimate_training_usage(total, "float32")
        return {"weights": usage["model"], "gradients": usage["gradients"], "optimizer_state": usage["optimizer"],
                "activations": 0}
    with pytest.raises(ShortcutError):
        check_training_memory(with_accelerate)


def test_a_plausible_mistake_is_a_wrong_answer_not_a_shortcut():
    def forgets_the_loss(config):  # the loss's log-probabilities over the vocabulary: 4V per token, left out
        out = reference(config)
        T = config["batch"] * config["seq"]
        if not config["checkpointing"]:
            out["activations"] -= T * 4 * config["vocab"]
        return out

    def ignores_checkpointing(config):  # counts every layer's activations as if none were recomputed
        return reference(dict(config, checkpointing=False))

    for wrong in (forgets_the_loss, ignores_checkpointing):
        with pytest.raises(AssertionError) as caught:
            check_training_memory(wrong)
        assert not isinstance(caught.value, ShortcutError)


def test_the_shortcuts_work_again_afterwards():
    with pytest.raises(ShortcutError):
        check_training_memory(course_lib_estimate)
    estimate_module = importlib.import_module("course_lib.budget.estimate")
    assert budget.estimate is estimate_module.estimate and "ShortcutError" not in repr(budget.estimate.__code__)
    assert course_lib_estimate(HAND_WORKED[0][0]) == HAND_WORKED[0][1]
    assert budget.plan("smollm2-135m", "8GB").fits
    assert callable(memory.measure_step) and memory.SavedActivations.__name__ == "SavedActivations"
    assert budget.ModelConfig.parameters(budget.get_config("smollm2-135m")) == 134_515_008
    from accelerate.commands.estimate import estimate_training_usage
    assert estimate_training_usage(100, "float32")["optimizer"] == 200
