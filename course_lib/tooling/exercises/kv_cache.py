"""Chapter 06's build-it exercise: greedy decoding with the KV cache, written by the learner.

The learner writes ``greedy_with_cache(model, input_ids, max_new_tokens)``. ``input_ids`` is a
``(1, prompt_length)`` LongTensor; the function returns a 1-D LongTensor of exactly
``max_new_tokens`` new token ids (the prompt left out, no stop at the end-of-sequence token), each
the argmax of the model's last logits, computed with the KV cache: one forward pass on the prompt,
then one pass per new token that feeds only that token and the cache the previous pass returned.

:func:`check_greedy_with_cache` compares the tokens with transformers' own
``model.generate(do_sample=False)``, run before the learner's code, and records every forward pass
the learner's function makes: after the first, each must feed exactly one token and pass a cache
(re-running the whole sequence at every step picks the same tokens at quadratic cost, and is
caught here). While the learner's function runs, transformers' ``generate`` and course_lib's
``generation.generate`` raise `ShortcutError`, and so does a forward pass called from inside them.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys

import torch
from transformers.generation import utils as hf_generation

from course_lib import generation
from course_lib.tooling.exercises import ShortcutError, close, forbidden

CACHE_ARGUMENTS = ("cache", "past_key_values")     # transformers 5.24's name, and the older one
HINT = "run the model yourself: model(input_ids=..., use_cache=True, cache=...) and take the argmax"


def reference_tokens(model, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """The new tokens of transformers' greedy ``generate`` (end-of-sequence does not stop it)."""
    with torch.no_grad():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                             max_new_tokens=max_new_tokens, min_new_tokens=0, eos_token_id=None)
    return out[0, input_ids.shape[1]:]


def _in_a_generate() -> bool:
    """Whether the current call stack runs through transformers' or course_lib's generation code."""
    shortcut_files = {inspect.getfile(hf_generation), inspect.getfile(generation)}
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_filename in shortcut_files:
            return True
        frame = frame.f_back
    return False


@contextlib.contextmanager
def recording_forward(model, calls: list[tuple[int | None, bool]], shortcuts: list[str]):
    """Inside the block, each forward pass of ``model`` appends ``(tokens fed, cache passed)`` to
    ``calls``; one made from inside a ``generate`` is noted in ``shortcuts`` and refused. The
    model's own ``forward`` is put back on exit, whatever happens inside."""
    original = model.forward
    signature = inspect.signature(original)
    var_keyword = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)

    @functools.wraps(original)
    def recorded(*args, **kwargs):
        if _in_a_generate():
            shortcuts.append("a generate function")
            raise ShortcutError(f"this exercise asks you to write the decoding loop yourself: your solution "
                                f"ran the model through a generate function ({HINT})")
        try:
            arguments = dict(signature.bind_partial(*args, **kwargs).arguments)
        except TypeError:                              # let the model itself report the bad call
            return original(*args, **kwargs)
        arguments.update(arguments.pop(var_keyword, None) or {})
        ids = arguments.get("input_ids")
        cache_passed = any(arguments.get(name) is not None for name in CACHE_ARGUMENTS)
        calls.append((None if ids is None else int(ids.shape[-1]), cache_passed))
        return original(*args, **kwargs)

    had_own = "forward" in model.__dict__
    saved = model.__dict__.get("forward")
    model.forward = recorded
    try:
        yield
    finally:
        if had_own:
            model.forward = saved
        else:
            del model.forward


def check_greedy_with_cache(greedy_with_cache, model, input_ids=None, max_new_tokens: int = 6) -> None:
    """Check the learner's ``greedy_with_cache(model, input_ids, max_new_tokens)`` on a causal LM.

    ``model``: a transformers causal LM in eval mode (the chapter's SmolLM2, or a tiny random
    ``LlamaForCausalLM`` in the tests). ``input_ids``: a ``(1, prompt_length)`` prompt, by default
    6 seeded random token ids. Raises ``AssertionError`` (saying what differs) when the tokens
    differ from ``model.generate``'s or a step after the first feeds more than one token or no
    cache, and `ShortcutError` when the function calls a ``generate``. Prints one line when all passes.
    """
    if input_ids is None:
        input_ids = torch.randint(0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(0))
    input_ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(1, -1)
    prompt_length, n = input_ids.shape[1], max_new_tokens
    expected = reference_tokens(model, input_ids, n)            # before any of the learner's code runs

    calls, shortcuts = [], []
    with forbidden((hf_generation.GenerationMixin, "generate"), (generation, "generate"), hint=HINT), \
            recording_forward(model, calls, shortcuts):
        got = greedy_with_cache(model, input_ids.clone(), n)
    if shortcuts:                                              # raised inside, but the learner caught it
        raise ShortcutError(f"your solution ran the model through {shortcuts[0]} ({HINT})")

    if not calls:
        raise AssertionError("your function never ran the model: call model(input_ids=..., use_cache=True) "
                             "(model.forward(...) works too)")
    for step, (fed, cache_passed) in enumerate(calls[1:], start=2):
        if fed != 1:
            raise AssertionError(f"forward pass {step} fed {fed} tokens: after the first pass, feed only the "
                                 "newest token; the cache holds the keys and values of all the others")
        if not cache_passed:
            raise AssertionError(f"forward pass {step} passed no cache: give the model the cache the previous "
                                 "pass returned (out.cache; `past_key_values` in older transformers)")
    if len(calls) > n + 1:
        raise AssertionError(f"your function ran the model {len(calls)} times for {n} new tokens: "
                             "one pass on the prompt, then one per new token, is all it takes")
    got = torch.as_tensor(got).detach().cpu().long()
    if got.numel() == prompt_length + n and torch.equal(got.reshape(-1)[:prompt_length], input_ids[0].cpu()):
        raise AssertionError("your function returned the prompt and the new tokens: return only the "
                             f"{n} new token ids")
    close("new token ids", got, expected.cpu(), atol=0, rtol=0)
    print(f"greedy_with_cache: the same {n} tokens as model.generate, in {len(calls)} forward passes "
          "(one on the prompt, then one token each with the cache)")
