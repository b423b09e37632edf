"""The parameter-efficient methods side by side on one causal LM and one task (chapter 07).

`make_method` prepares a model for one of `METHODS`: prompt tuning, prefix tuning, IA³, LoRA and
DoRA through peft's configs, bottleneck adapters through `course_lib.adapters` (peft has no config
for them), and full fine-tuning. `run_method` trains one on the instruction task with
`course_lib.train.train` and reports what the chapter compares: trainable parameters, AdamW state,
the memory of one training step (`memory.measure_step`'s accounting), seconds per step, and the
test exact match and answer perplexity (`course_lib.instruct`'s scoring).

Generation with prompt / prefix tuning: peft 0.21's ``prepare_inputs_for_generation`` predates
transformers 5's ``cache`` argument (``past_key_values`` is deprecated). Under transformers 5.24
``generate`` then silently ignores a prefix (the answers are the base model's) and re-inserts the
virtual prompt before every new token. `make_method` therefore gives those models a ``generate``
that builds the virtual tokens itself and calls the base model's ``generate``
(`generate_with_virtual_tokens`); training (``forward``) is peft's own and is unaffected.
"""

from __future__ import annotations

import copy
import math
import time
import types
from collections.abc import Sequence

import torch
from torch import nn

from . import adapters, generation, instruct, lora, memory, train
from .checks import positive_int

METHODS = ("prompt_tuning", "prefix_tuning", "bottleneck_adapter", "ia3", "lora", "dora", "full")

# Hyperparameters each method gets unless the caller overrides them (make_method's **kwargs).
DEFAULTS: dict[str, dict] = {
    "prompt_tuning": {"num_virtual_tokens": 16, "prompt_tuning_init": "SAMPLE_VOCAB"},
    "prefix_tuning": {"num_virtual_tokens": 16},
    "bottleneck_adapter": {"bottleneck_size": 16, "placement": "houlsby"},
    "ia3": {},    # peft's Llama default: scale k_proj and v_proj outputs and down_proj inputs
    "lora": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
    "dora": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
    "full": {},
}
# AdamW learning rates: few parameters far from the data (a prompt, a prefix) need large steps,
# all of them (full fine-tuning) small ones.
LEARNING_RATES = {"prompt_tuning": 3e-2, "prefix_tuning": 1e-2, "bottleneck_adapter": 2e-3, "ia3": 1e-2,
                  "lora": 2e-3, "dora": 2e-3, "full": 5e-5}
# What prompt and prefix tuning start from in `run_method`: an instruction in the task's spirit.
INIT_TEXT = "Answer with the name of the Python function only, in snake_case, and nothing else."
# The names of the parameters each method trains (a substring of each trainable parameter's name).
TRAINABLE = {"prompt_tuning": ("prompt_encoder",), "prefix_tuning": ("prompt_encoder",),
             "bottleneck_adapter": (".adapter.",), "ia3": ("ia3_l",), "lora": ("lora_A", "lora_B"),
             "dora": ("lora_A", "lora_B", "lora_magnitude_vector"), "full": ("",)}


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known methods: {', '.join(METHODS)}")


def make_method(model: nn.Module, method: str, **kwargs) -> nn.Module:
    """``model`` (a transformers causal LM) prepared for ``method``, with only that method's
    parameters trainable. ``kwargs`` override `DEFAULTS` and go to the method's peft config
    (``PromptTuningConfig``, ``PrefixTuningConfig``, ``IA3Config``, ``LoraConfig``; DoRA is
    ``LoraConfig(use_dora=True)``) or to `adapters.inject_adapters`. Like ``get_peft_model`` it
    changes ``model`` in place: pass a copy to keep the original.
    """
    check_method(method)
    settings = {**DEFAULTS[method], **kwargs}
    if method == "full":
        if settings:
            raise ValueError(f"full fine-tuning takes no settings, got {sorted(settings)}")
        return model.requires_grad_(True)
    if method == "bottleneck_adapter":
        return adapters.inject_adapters(model, **settings)
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model

    if method in ("prompt_tuning", "prefix_tuning"):
        positive_int("num_virtual_tokens", settings.get("num_virtual_tokens"), f"for {method}")
        config_class = PromptTuningConfig if method == "prompt_tuning" else PrefixTuningConfig
    elif method == "ia3":
        config_class = IA3Config
    else:
        positive_int("r", settings.get("r", 1), f"for {method}")
        config_class, settings = LoraConfig, {**settings, "use_dora": method == "dora"}
    peft_model = get_peft_model(model, config_class(task_type="CAUSAL_LM", **settings))
    if method in ("prompt_tuning", "prefix_tuning"):
        # an instance attribute wins over PeftModel.generate; copy.deepcopy rebinds it to the copy
        peft_model.generate = types.MethodType(generate_with_virtual_tokens, peft_model)
    return peft_model


@torch.no_grad()
def init_virtual_tokens(model: nn.Module, token_ids: Sequence[int]) -> nn.Module:
    """Start a prompt- or prefix-tuned model from real text: afterwards it computes exactly what
    the base model computes with those tokens in front of its input.

    Prompt tuning: the virtual embeddings become the tokens' embeddings (peft's ``TEXT`` init,
    without its need for a tokenizer path). Prefix tuning: the prefix becomes the keys and values
    the base model caches for the tokens, in every layer (Li & Liang 2021 initialise "with
    activations of real words"; peft's default draws them from N(0, 1), far from a real key, and
    the first steps are spent undoing that). ``token_ids`` must be ``num_virtual_tokens`` long.
    """
    config = model.active_peft_config
    if len(token_ids) != config.num_virtual_tokens:
        raise ValueError(f"need {config.num_virtual_tokens} token ids (num_virtual_tokens), got {len(token_ids)}")
    weight = model.prompt_encoder[model.active_adapter].embedding.weight
    base = model.get_base_model()
    ids = torch.tensor([list(token_ids)], device=weight.device)
    if config.peft_type == "PROMPT_TUNING":
        weight.copy_(base.get_input_embeddings()(ids)[0])
        return model
    if config.peft_type != "PREFIX_TUNING" or config.prefix_projection:
        raise ValueError("init_virtual_tokens is for prompt tuning and prefix tuning without prefix_projection")
    was_training = base.training
    out = base.eval()(input_ids=ids, use_cache=True)      # the base model: a prefix only adds to its cache
    base.train(was_training)
    cache = out["cache"] if "cache" in out else out["past_key_values"]
    # peft reads the prefix as weight.view(n, layers * 2, kv_heads, head_dim): keys then values per layer
    columns = [tensor[0].transpose(0, 1).reshape(len(token_ids), -1)         # (n, kv_heads * head_dim)
               for layer in cache.layers for tensor in (layer.keys, layer.values)]
    weight.copy_(torch.cat(columns, dim=1))
    return model


@torch.no_grad()
def generate_with_virtual_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                                 **kwargs) -> torch.Tensor:
    """``generate`` for a prompt- or prefix-tuned peft model, returning prompt + new tokens as
    ``PeftModel.generate`` does (``return_dict_in_generate`` is not supported).

    Prompt tuning: the learned embeddings go in front of the prompt's token embeddings and the
    base model generates from ``inputs_embeds``. Prefix tuning: the learned keys and values fill
    the cache first, ``n`` placeholder tokens stand for them in ``input_ids`` (the cache already
    holds them, so they are never embedded), and the mask covers them. Either way positions are
    counted from the attention mask, as in training.
    """
    if kwargs.get("return_dict_in_generate"):
        raise ValueError("generate_with_virtual_tokens returns token ids only")
    config = self.active_peft_config
    n, batch = config.num_virtual_tokens, input_ids.shape[0]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    mask = torch.cat([attention_mask.new_ones(batch, n), attention_mask], dim=1)
    base = self.get_base_model()
    if config.peft_type == "PROMPT_TUNING":
        embeds = base.get_input_embeddings()(input_ids)
        prompts = self.get_prompt(batch_size=batch).to(embeds.dtype)
        new = base.generate(inputs_embeds=torch.cat([prompts, embeds], dim=1), attention_mask=mask, **kwargs)
        return torch.cat([input_ids, new], dim=1)
    if config.peft_type != "PREFIX_TUNING":
        raise ValueError(f"generate_with_virtual_tokens is for prompt or prefix tuning, not {config.peft_type}")
    prefix = self.get_prompt(batch_size=batch)
    placeholders = input_ids.new_zeros(batch, n)
    out = base.generate(input_ids=torch.cat([placeholders, input_ids], dim=1), attention_mask=mask,
                        **{generation.cache_keyword(base): prefix}, **kwargs)
    return out[:, n:]


# ---------------------------------------------------------------------------------------------
# Measuring and scoring one method on the instruction task
# ---------------------------------------------------------------------------------------------
def run_method(base: nn.Module, tokenizer, method: str, train_rows: Sequence[dict], test_rows: Sequence[dict],
               steps: int, batch_size: int = 8, lr: float | None = None, warmup_steps: int | None = None,
               grad_accum: int = 1, seed: int = 0, measure_memory: bool = True, progress: bool = True,
               keep_model: bool = False, init_text: str | None = INIT_TEXT, **method_kwargs) -> dict:
    """Train a copy of ``base`` with ``method`` for ``steps`` steps on the instruction task
    (`instruct.answer_loss`) and report, in one dict: ``trainable`` / ``total`` parameters,
    ``optimizer_state_bytes`` (AdamW after training), ``step_memory`` (the first training step's,
    `course_lib.train.train` with ``measure_memory``: its ``total`` is the peak to compare), ``seconds_per_step``, the
    first and last loss, the test ``exact_match`` (greedy answers) and answer ``perplexity``, and
    per test item ``correct`` (`instruct.exact_matches`) and ``answer_nll`` (`instruct.answer_nll`),
    what a paired comparison of two methods needs (`course_lib.stats`).
    ``base`` is not changed. ``lr`` defaults to `LEARNING_RATES`, ``warmup_steps`` to a tenth;
    with ``keep_model`` the trained model is returned too (``"model"``). Prompt and prefix tuning
    start from ``init_text`` (`init_virtual_tokens` with its tokens, repeated or cut to length;
    None keeps peft's initialisation)."""
    check_method(method)
    lr = LEARNING_RATES[method] if lr is None else lr
    warmup_steps = max(1, steps // 10) if warmup_steps is None else warmup_steps
    train.check_schedule(steps, grad_accum, warmup_steps)
    train.seed_everything(seed)   # prompt tuning samples its initial tokens, adapters their down-projection
    model = make_method(copy.deepcopy(base), method, **method_kwargs)
    if init_text is not None and method in ("prompt_tuning", "prefix_tuning"):
        ids = tokenizer(init_text, add_special_tokens=False)["input_ids"]
        n = model.active_peft_config.num_virtual_tokens
        init_virtual_tokens(model, (ids * math.ceil(n / len(ids)))[:n])
    trainable, total = lora.count_parameters(model)

    def loss_fn(m, rows):
        return instruct.answer_loss(m, tokenizer, rows)

    optimizer = torch.optim.AdamW(train.trainable_parameters(model), lr=lr)
    started = time.perf_counter()
    history = train.train(model, loss_fn, train.batches(train_rows, batch_size, seed=seed), steps=steps,
                          optimizer=optimizer, warmup_steps=warmup_steps, grad_accum=grad_accum, seed=seed,
                          progress=progress, desc=method, measure_memory=measure_memory)
    train_seconds = time.perf_counter() - started
    instructions = [r["instruction"] for r in test_rows]
    answers = [r["answer"] for r in test_rows]
    predictions = instruct.generate_answers(model, tokenizer, instructions)
    nll = instruct.answer_nll(model, tokenizer, instructions, answers)   # per answer: [nll, tokens]
    result = {"method": method, "trainable": trainable, "total": total, "lr": lr,
              "optimizer_state_bytes": memory.optimizer_state_bytes(optimizer), "step_memory": history.step_memory,
              "seconds_per_step": history.seconds_per_step, "train_seconds": train_seconds,
              "loss_first": history.loss[0], "loss_last": history.loss[-1], "history": history,
              "exact_match": instruct.exact_match(predictions, answers),
              "perplexity": math.exp(nll[:, 0].sum().item() / nll[:, 1].sum().item()),   # = instruct.perplexity
              "predictions": predictions, "correct": instruct.exact_matches(predictions, answers),
              "answer_nll": nll}
    if keep_model:
        result["model"] = model
    return result
