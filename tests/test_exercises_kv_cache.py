"""Chapter 06's build-it exercise (greedy decoding with the KV cache): its check passes a correct
solution, catches the shortcuts (transformers' and course_lib's ``generate``) and the wrong loops,
and leaves the model and the generate functions as they were."""

import contextlib

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from course_lib import generation
from course_lib.tooling.exercises import ShortcutError
from course_lib.tooling.exercises.kv_cache import check_greedy_with_cache, reference_tokens


@pytest.fixture(scope="module")
def tiny_llama():
    """A real Llama architecture (grouped-query attention: 4 query heads share 2 KV heads), random weights."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(config).eval()


def _step(model, ids, cache=None):
    return model(input_ids=ids, use_cache=True, **({} if cache is None else {generation.cache_keyword(model): cache}))


@torch.no_grad()
def correct(model, input_ids, max_new_tokens):
    out = _step(model, input_ids)
    token = out.logits[:, -1:].argmax(-1)
    new = [token]
    while len(new) < max_new_tokens:
        out = _step(model, token, generation.returned_cache(out))
        token = out.logits[:, -1:].argmax(-1)
        new.append(token)
    return torch.cat(new, dim=1)[0]


@torch.no_grad()
def without_cache(model, input_ids, max_new_tokens):
    """Right tokens, wrong method: the whole sequence again at every step."""
    sequence = input_ids
    for _ in range(max_new_tokens):
        token = model(input_ids=sequence, use_cache=False).logits[:, -1:].argmax(-1)
        sequence = torch.cat([sequence, token], dim=1)
    return sequence[0, input_ids.shape[1]:]


@torch.no_grad()
def one_token_no_cache(model, input_ids, max_new_tokens):
    """Feeds only the newest token but forgets to pass the cache: the model sees one token of context."""
    token = model(input_ids=input_ids).logits[:, -1:].argmax(-1)
    new = [token]
    while len(new) < max_new_tokens:
        token = model(input_ids=token, use_cache=False).logits[:, -1:].argmax(-1)
        new.append(token)
    return torch.cat(new, dim=1)[0]


def test_the_reference_is_plain_greedy_decoding(tiny_llama):
    # an independent reason for the expected tokens: argmax over a full recomputation, no cache at all
    ids = torch.tensor([[5, 17, 3, 42, 8, 60]])
    assert torch.equal(reference_tokens(tiny_llama, ids, 10), without_cache(tiny_llama, ids, 10))


def test_a_correct_solution_passes(tiny_llama, capsys):
    check_greedy_with_cache(correct, tiny_llama)
    check_greedy_with_cache(correct, tiny_llama, torch.tensor([[1, 2, 3]]), max_new_tokens=9)
    assert "the same 9 tokens as model.generate" in capsys.readouterr().out
    # positional arguments and a list of ints are fine too
    check_greedy_with_cache(lambda m, ids, n: correct(m, ids, n).tolist(), tiny_llama)


def test_calling_course_lib_generate_is_caught(tiny_llama):
    def shortcut(model, input_ids, max_new_tokens):
        return generation.generate(model, None, input_ids[0], max_new_tokens, stop_at_eos=False).token_ids

    with pytest.raises(ShortcutError, match="generation.generate"):
        check_greedy_with_cache(shortcut, tiny_llama)

    captured = generation.generate          # imported before the check, so not replaced by it

    def alias(model, input_ids, max_new_tokens):
        return captured(model, None, input_ids[0], max_new_tokens, stop_at_eos=False).token_ids

    with pytest.raises(ShortcutError, match="generate function"):
        check_greedy_with_cache(alias, tiny_llama)

    def swallowed(model, input_ids, max_new_tokens):
        try:
            return alias(model, input_ids, max_new_tokens)
        except Exception:  # noqa: BLE001 (the learner hides the refusal: the check still sees it)
            return correct(model, input_ids, max_new_tokens)

    with pytest.raises(ShortcutError):
        check_greedy_with_cache(swallowed, tiny_llama)


def test_calling_transformers_generate_is_caught(tiny_llama):
    def shortcut(model, input_ids, max_new_tokens):
        return model.generate(input_ids, do_sample=False, max_new_tokens=max_new_tokens)[0, input_ids.shape[1]:]

    with pytest.raises(ShortcutError, match="GenerationMixin.generate"):
        check_greedy_with_cache(shortcut, tiny_llama)

    bound = tiny_llama.generate             # a bound method taken before the check

    def alias(model, input_ids, max_new_tokens):
        return bound(input_ids, do_sample=False, max_new_tokens=max_new_tokens)[0, input_ids.shape[1]:]

    with pytest.raises(ShortcutError, match="generate function"):
        check_greedy_with_cache(alias, tiny_llama)


@pytest.mark.parametrize("wrong, message", [
    (without_cache, "fed 7 tokens"),                      # right tokens, quadratic work
    (one_token_no_cache, "passed no cache"),
    (lambda m, ids, n: torch.cat([ids[0], correct(m, ids, n)]), "returned the prompt"),
    (lambda m, ids, n: correct(m, ids, n)[:-1], "expected shape"),
    (lambda m, ids, n: correct(m, ids, n + 1), "expected shape"),
    (lambda m, ids, n: (correct(m, ids, n) + 1) % 64, "not equal"),
])
def test_wrong_solutions_fail_without_a_shortcut_error(tiny_llama, wrong, message):
    with pytest.raises(AssertionError, match=message) as info:
        check_greedy_with_cache(wrong, tiny_llama)
    assert not isinstance(info.value, ShortcutError)


def test_everything_is_restored_even_when_the_learner_raises(tiny_llama):
    ids = torch.tensor([[4, 9, 2, 33]])
    before = reference_tokens(tiny_llama, ids, 5)
    for learner in (correct, without_cache, lambda m, i, n: m.generate(i), lambda m, i, n: 1 / 0):
        with contextlib.nullcontext() if learner is correct else pytest.raises((AssertionError, ZeroDivisionError)):
            check_greedy_with_cache(learner, tiny_llama)
        assert "forward" not in tiny_llama.__dict__
        assert torch.equal(reference_tokens(tiny_llama, ids, 5), before)
        assert generation.generate(tiny_llama, None, ids[0], 5, stop_at_eos=False).token_ids == before.tolist()

