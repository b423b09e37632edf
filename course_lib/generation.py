"""Greedy generation with and without the KV cache, and what the cache costs in memory.

A causal LM predicts one token from all the tokens before it. Without a cache, every new token
runs the whole sequence through the model again: step t costs ~t token-passes. With the KV cache
each layer keeps the keys and values it computed for earlier positions, so a step feeds only the
newest token, at the price of memory that grows by `kv_cache_bytes_per_token` with every token:

    2 (key and value) × layers × kv_heads × head_dim × bytes per number

SmolLM2-135M (30 layers, 3 key/value heads of 64 dims: grouped-query attention shares each of
them among 3 query heads) adds 46,080 bytes per token in float32 (45 KiB); one sequence filling its
8,192-token context holds 377 MB of cache, 70% of the 538 MB the float32 weights take.

`generate` is the loop written out by hand, so the two modes are visible side by side; it runs a
transformers model or a `course_lib.export.OnnxCausalLM` alike, and the tests check it against
transformers' own ``model.generate``. Measured once on 2 CPU cores, 32 new tokens after a
42-token chat prompt: PyTorch 24 tokens/s with the cache and 7 without; onnxruntime 59 and 16.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass

import torch

from .checks import positive_int


def cache_shape(config) -> tuple[int, int, int]:
    """``(layers, kv_heads, head_dim)`` of a transformers decoder config: ``num_hidden_layers``,
    ``num_key_value_heads`` (= ``num_attention_heads`` without grouped-query attention) and
    ``head_dim`` (= ``hidden_size / num_attention_heads`` when the config does not say)."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads, head_dim


def kv_cache_bytes_per_token(config, dtype: torch.dtype = torch.float32) -> int:
    """Bytes the KV cache grows by per token of one sequence: ``2 · layers · kv_heads · head_dim · bytes``,
    read from a transformers config (see `cache_shape`); ``dtype`` is the cache's."""
    layers, kv_heads, head_dim = cache_shape(config)
    return 2 * layers * kv_heads * head_dim * dtype.itemsize


def cache_bytes(cache) -> int:
    """Bytes held by the key and value tensors of a KV cache, measured from the tensors.

    Accepts a transformers ``Cache`` (``DynamicCache``: ``.layers`` with ``.keys`` / ``.values``),
    the legacy tuple of ``(key, value)`` pairs, or `OnnxCausalLM`'s flat list of tensors.
    """
    if cache is None:
        return 0
    if hasattr(cache, "layers"):
        tensors = [t for layer in cache.layers for t in (layer.keys, layer.values) if t is not None]
    else:
        tensors, todo = [], list(cache)
        while todo:
            item = todo.pop()
            if torch.is_tensor(item):
                tensors.append(item)
            elif isinstance(item, (list, tuple)):
                todo.extend(item)
            else:
                raise TypeError(f"cannot read a KV cache made of {type(item).__name__}")
    return sum(t.numel() * t.element_size() for t in tensors)


def cache_keyword(model) -> str:
    """The name of the KV-cache argument: ``cache`` in the transformers installed here (5.24),
    ``past_key_values`` in older releases."""
    forward = getattr(model, "forward", model)
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def returned_cache(output):
    """The KV cache a forward pass returned: ``output.cache``, or ``output.past_key_values`` in older
    transformers."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


@dataclass
class Generation:
    """What `generate` produced and how fast: ``tokens_per_second`` counts new tokens over the
    whole call, prompt processing (prefill) included."""

    token_ids: list[int]
    text: str | None
    seconds: float
    tokens_per_second: float
    cache_bytes: int


@torch.no_grad()
def generate(model, tokenizer, prompt, max_new_tokens: int = 32, use_cache: bool = True,
             stop_at_eos: bool = True) -> Generation:
    """Greedy decoding of one prompt, with (``use_cache=True``) or without the KV cache.

    ``prompt`` is text (tokenized as is, no special tokens added: wrap an instruction with
    `course_lib.instruct.chat_prompt` first) or a list / 1-D tensor of token ids; ``tokenizer``
    may be None for ids. Both modes pick the same tokens, up to float rounding in near ties;
    they differ in time and memory. Stops early at the tokenizer's end-of-sequence token when
    ``stop_at_eos``. ``cache_bytes`` is the final cache's size (0 without the cache).
    """
    positive_int("max_new_tokens", max_new_tokens)
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("a text prompt needs the tokenizer; pass token ids to generate without one")
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    else:
        ids = torch.as_tensor(prompt, dtype=torch.long).reshape(1, -1)
    if ids.shape[1] == 0:
        raise ValueError("the prompt is empty: give at least one token")
    if hasattr(model, "parameters"):
        ids = ids.to(next(model.parameters()).device)
    eos = tokenizer.eos_token_id if (tokenizer is not None and stop_at_eos) else None
    new: list[int] = []
    past, step_input, sequence, keyword = None, ids, ids, cache_keyword(model)
    start = time.perf_counter()
    for _ in range(max_new_tokens):
        if use_cache:  # feed only what the cache has not seen: the prompt once, then one token
            out = model(input_ids=step_input, use_cache=True, **{keyword: past})
            past = returned_cache(out)
        else:  # recompute the whole sequence every step
            out = model(input_ids=sequence, use_cache=False)
        token = out.logits[0, -1].argmax()
        new.append(int(token))
        step_input = token.view(1, 1).to(ids.device)
        sequence = torch.cat([sequence, step_input], dim=1)
        if eos is not None and new[-1] == eos:
            break
    seconds = time.perf_counter() - start
    text = tokenizer.decode(new, skip_special_tokens=True) if tokenizer is not None else None
    return Generation(new, text, seconds, len(new) / seconds, cache_bytes(past))
