"""The instruction task's scoring: exact match by hand-made cases, perplexity against the loss
transformers computes, and the virtual tokens of a prompt-tuned model."""

import copy
import math

import pytest
import torch

from course_lib import instruct
from course_lib.models import set_gradient_checkpointing, tiny_llama


def test_exact_match_normalisation():
    preds = ["`dumps`", "json.loads()", "parse\nmore text", "Parse", "  split.  ",
             "The function is `os.path.abspath()`.", "The function is abspath."]
    answers = ["dumps", "loads", "parse", "parse", "split", "abspath", "abspath"]
    # case matters (Parse != parse) and a sentence without a quoted name is not parsed for one
    assert instruct.exact_match(preds, answers) == pytest.approx(5 / 7)
    assert instruct.exact_matches(preds, answers) == [True, True, True, False, True, True, False]
    with pytest.raises(ValueError):
        instruct.exact_match(["a"], ["a", "b"])


def _chat_tokenizer():
    """One token per character, with a chat template: ``<instruction/`` then the answer."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz_ <>|/")}
    raw = Tokenizer(tok_models.WordLevel(vocab, unk_token="_"))
    raw.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="_", pad_token="|", eos_token=">")
    tokenizer.chat_template = "{% for m in messages %}<{{ m['content'] }}/{% endfor %}"
    return tokenizer


def test_perplexity_equals_exp_of_the_transformers_loss():
    """Our answer-only perplexity equals exp(loss) that transformers computes from the same labels."""
    tokenizer = _chat_tokenizer()
    model = tiny_llama()
    instructions, answers = ["find the name"], ["parse"]
    batch = instruct.answer_batch(tokenizer, instructions, answers)
    with torch.no_grad():
        loss = model(**batch).loss.item()
    ppl = instruct.perplexity(model, tokenizer, instructions, answers)
    assert ppl == pytest.approx(math.exp(loss), rel=1e-5)
    with torch.no_grad():  # the training loss is log(perplexity) on one example
        train_loss = instruct.answer_loss(model, tokenizer, [{"instruction": "find the name", "answer": "parse"}])
    assert train_loss.item() == pytest.approx(math.log(ppl), rel=1e-5)

    n_answer_tokens = (batch["labels"] != -100).sum().item()
    assert n_answer_tokens == len("parse") + 1  # answer characters + end of turn


def test_text_perplexity_equals_transformers_loss_token_weighted():
    """Padding in a batch changes nothing: the batched perplexity is exp of the token-weighted mean
    of transformers' own per-text losses (labels = input_ids, computed one text at a time)."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz_ |")}
    raw = Tokenizer(tok_models.WordLevel(vocab, unk_token="_"))
    raw.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="_", pad_token="|")
    model = tiny_llama()
    texts = ["def parse the file", "ab", "return the sum of two numbers"]
    nll = tokens = 0.0
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            nll += model(input_ids=ids, labels=ids).loss.item() * (ids.shape[1] - 1)
            tokens += ids.shape[1] - 1
    assert instruct.text_perplexity(model, tokenizer, texts, batch_size=2) == pytest.approx(
        math.exp(nll / tokens), rel=1e-5)
    with pytest.raises(ValueError, match="two tokens"):
        instruct.text_perplexity(model, tokenizer, ["a"])


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_perplexity_of_virtual_tokens_equals_peft_loss(method):
    """A prompt-tuned model's logits are longer than its input by the virtual tokens (prefix
    tuning's are not): either way the perplexity is exp of the loss peft computes, which pads the
    labels over the virtual tokens, on a batch of two answers of different lengths."""
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

    tokenizer = _chat_tokenizer()
    config = (PromptTuningConfig if method == "prompt_tuning" else PrefixTuningConfig)(
        task_type="CAUSAL_LM", num_virtual_tokens=3)
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), config)
    instructions, answers = ["find the name", "add two numbers"], ["parse", "add"]
    batch = instruct.answer_batch(tokenizer, instructions, answers)
    with torch.no_grad():
        out = model(**batch)
    extra = 3 if method == "prompt_tuning" else 0
    assert out.logits.shape[1] == batch["input_ids"].shape[1] + extra
    assert instruct.perplexity(model, tokenizer, instructions, answers) == pytest.approx(
        math.exp(out.loss.item()), rel=1e-5)
    plain = instruct.perplexity(tiny_llama(), tokenizer, instructions, answers)
    assert instruct.perplexity(model, tokenizer, instructions, answers) != pytest.approx(plain, rel=1e-6)


def test_answer_nll_rows_give_the_perplexity_and_transformers_loss():
    """Per answer, [nll, tokens]: nll / tokens is transformers' loss on that example alone, and
    exp(Σ nll / Σ tokens) over the batch is instruct.perplexity (padding in the batch changes nothing)."""
    tokenizer, model = _chat_tokenizer(), tiny_llama()
    instructions, answers = ["find the name", "a", "split the text here"], ["parse", "ab", "x"]
    rows = instruct.answer_nll(model, tokenizer, instructions, answers, batch_size=3)
    assert rows.shape == (3, 2) and rows.dtype == torch.float64
    for i in range(3):
        batch = instruct.answer_batch(tokenizer, instructions[i:i + 1], answers[i:i + 1])
        with torch.no_grad():
            loss = model(**batch).loss.item()
        assert rows[i, 1].item() == len(answers[i]) + 1          # answer characters + end of turn
        assert rows[i, 0].item() / rows[i, 1].item() == pytest.approx(loss, rel=1e-5)
    ppl = instruct.perplexity(model, tokenizer, instructions, answers, batch_size=2)
    assert ppl == pytest.approx(math.exp(rows[:, 0].sum().item() / rows[:, 1].sum().item()), rel=1e-6)
    with pytest.raises(ValueError, match="one answer per instruction"):
        instruct.answer_nll(model, tokenizer, instructions, answers[:2])


def _nll_from_full_logits(model, tokenizer, instructions, answers):
    """The definition, written out: every position's logits, then the answer positions' NLL."""
    batch = instruct.answer_batch(tokenizer, instructions, answers)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, logits.shape[1] - batch["input_ids"].shape[1]:]     # after any virtual tokens
    targets = batch["labels"][:, 1:]
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                            ignore_index=-100, reduction="none").view(targets.shape)
    return torch.stack([nll.double().sum(1), (targets != -100).sum(1).double()], dim=1)


class _WithoutOutputLayer(torch.nn.Module):
    """A runner with no output layer to hook (as onnxruntime's OnnxCausalLM): full logits come back."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, **inputs):
        return self.model(**inputs)


def test_answer_nll_computes_the_output_layer_at_answer_positions_only(smollm2):
    """SmolLM2, plain, prompt-tuned by peft (8 virtual tokens in front) and with no output layer to
    hook: answer_nll equals the NLL taken from every position's logits of the same batches, and the
    output layer sees only the answer positions' hidden states (one row per scored token).

    Bit for bit where nothing is hooked (the full logits, sliced). With the hook the output layer
    multiplies fewer rows, the same dot products: bit-identical on the AMD EPYC CPUs this was first
    run on, but on an Intel Xeon with AVX-512 and AMX the matrix library sums some rows in another
    order for another row count (up to 1.6e-6 relative there), so to float32 rounding (1e-5)."""
    from peft import PromptTuningConfig, get_peft_model

    from course_lib import data

    model, tok = smollm2
    rows = data.load_instruct("test")[:6]
    instructions, answers = [r["instruction"] for r in rows], [r["answer"] for r in rows]
    # on a copy: peft freezes the model it wraps, and the session's SmolLM2 stays as it was
    prompt_tuned = get_peft_model(copy.deepcopy(model), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8))
    with torch.no_grad():
        prompt_tuned.prompt_encoder["default"].embedding.weight.normal_(0, 0.02, generator=torch.Generator().manual_seed(0))
    for runner in (prompt_tuned, model, _WithoutOutputLayer(model)):
        head_rows = []
        head = (prompt_tuned if runner is prompt_tuned else model).get_output_embeddings()
        handle = head.register_forward_hook(lambda m, args, out, seen=head_rows: seen.append(tuple(args[0].shape[:-1])))
        try:
            fast = instruct.answer_nll(runner, tok, instructions, answers, batch_size=4, share_prefix=False)
        finally:
            handle.remove()
        # the definition on the same batches as answer_nll's (4 rows, then 2): a batch of another
        # size, or other padding, can move float32 sums on some CPUs
        reference = torch.cat([_nll_from_full_logits(runner, tok, instructions[s], answers[s])
                               for s in (slice(0, 4), slice(4, None))])
        if isinstance(runner, _WithoutOutputLayer):
            assert torch.equal(fast, reference)
        else:
            torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-6)
        if runner is not model:   # virtual tokens / no transformers model: scored whole even by default
            assert torch.equal(instruct.answer_nll(runner, tok, instructions, answers, batch_size=4), fast)
        if isinstance(runner, _WithoutOutputLayer):   # nothing to hook: every position, as before
            assert head_rows[0][1] == instruct.answer_batch(tok, instructions[:4], answers[:4])["input_ids"].shape[1]
        else:
            assert head_rows == [(int(fast[:4, 1].sum()),), (int(fast[4:, 1].sum()),)]


# ---------------------------------------------------------------------------------------------
# The shared prompt start, run once (answer_nll and answer_loss with share_prefix=True)
# ---------------------------------------------------------------------------------------------
def _two_row_batch():
    """Rows 5 6 7 8 9 and 5 6 7 3 4 2 (padded with 0), answers 9 and 4 2: a 3-token common start."""
    return {"input_ids": torch.tensor([[5, 6, 7, 8, 9, 0], [5, 6, 7, 3, 4, 2]]),
            "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]),
            "labels": torch.tensor([[-100, -100, -100, -100, 9, -100], [-100, -100, -100, -100, 4, 2]])}


def test_pack_after_prefix_by_hand():
    batch = _two_row_batch()
    assert instruct.shared_prefix_length(batch) == 3    # the first answer token is at 4, predicted from 3
    packed = instruct.pack_after_prefix(batch, 3)
    assert packed["input_ids"].tolist() == [[5, 6, 7, 8, 9, 3, 4, 2]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 4, 5]]
    assert packed["labels"].tolist() == [[-100, -100, -100, -100, 9, -100, 4, 2]]
    assert packed["row"].tolist() == [-1, -1, -1, 0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match="same 4 tokens"):   # the rows differ at their 4th token (8, 3)
        instruct.pack_after_prefix(batch, 4)
    same_start = {k: v.clone() for k, v in batch.items()}
    same_start["input_ids"][1, 3] = 8
    with pytest.raises(ValueError, match="labelled"):   # row 0's answer 9 would be scored at the previous piece's end
        instruct.pack_after_prefix(same_start, 4)


def test_prefix_sharing_mask_by_hand():
    mask = instruct.prefix_sharing_mask(torch.tensor([-1, -1, 0, 0, 1]))
    assert mask.int().tolist() == [[1, 0, 0, 0, 0],
                                   [1, 1, 0, 0, 0],
                                   [1, 1, 1, 0, 0],
                                   [1, 1, 1, 1, 0],
                                   [1, 1, 0, 0, 1]]   # row 1 sees the prefix and itself, not row 0


def _tokens_seen(model):
    """A hook on the input embedding that adds up the token positions each forward pass computes."""
    seen = []
    handle = model.get_input_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].numel()))
    return seen, handle


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_shared_prefix_gives_the_same_loss_gradient_and_nll_for_less_work(attention):
    """Four rows that share the prompt start '<find the name of ' (18 characters, one token each)
    and differ in length: the loss, every parameter's gradient and each row's NLL equal those of
    one pass over the padded batch (to float rounding), with either attention that takes a
    prepared mask, while the model computes fewer positions: in training the prefix once and
    each row's own tokens, no padding."""
    tokenizer, model = _chat_tokenizer(), tiny_llama()
    model.set_attn_implementation(attention)
    instructions = ["find the name of x", "find the name of yy", "find the name of a longer thing here", "find the name of z"]
    answers = ["ab", "c", "parse", "split"]
    rows = [{"instruction": i, "answer": a} for i, a in zip(instructions, answers)]
    batch = instruct.answer_batch(tokenizer, instructions, answers)
    shared = len("<find the name of ")
    assert instruct.shared_prefix_length(batch) == shared
    model.train()
    results = {}
    for share in (False, True):
        seen, handle = _tokens_seen(model)
        try:
            loss = instruct.answer_loss(model, tokenizer, rows, share_prefix=share)
        finally:
            handle.remove()
        loss.backward()
        results[share] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}, sum(seen))
        model.zero_grad(set_to_none=True)
    (plain_loss, plain_grads, plain_tokens), (loss, grads, tokens) = results[False], results[True]
    assert loss == pytest.approx(plain_loss, rel=1e-6)
    for name, g in plain_grads.items():
        assert torch.allclose(grads[name], g, rtol=1e-4, atol=1e-7), name
    lengths = batch["attention_mask"].sum(1).tolist()
    assert plain_tokens == batch["input_ids"].numel()
    assert tokens == shared + sum(n - shared for n in lengths) < sum(lengths) < plain_tokens
    model.eval()
    whole = instruct.answer_nll(model, tokenizer, instructions, answers, batch_size=3, share_prefix=False)
    assert torch.allclose(instruct.answer_nll(model, tokenizer, instructions, answers, batch_size=3), whole, rtol=1e-5)


def test_no_shared_prefix_or_checkpointing_scores_the_whole_rows():
    """Under MIN_SHARED_PREFIX tokens in common, or a model training with activation checkpointing
    (transformers then keeps no cache), the rows go in whole: the same numbers bit for bit, and no
    warning."""
    import warnings

    tokenizer, model = _chat_tokenizer(), tiny_llama()
    rows = [{"instruction": "find the name", "answer": "ab"}, {"instruction": "split it", "answer": "c"}]
    instructions, answers = [r["instruction"] for r in rows], [r["answer"] for r in rows]
    assert instruct.shared_prefix_length(instruct.answer_batch(tokenizer, instructions, answers)) < instruct.MIN_SHARED_PREFIX
    assert torch.equal(instruct.answer_nll(model, tokenizer, instructions, answers),
                       instruct.answer_nll(model, tokenizer, instructions, answers, share_prefix=False))
    long_rows = [{"instruction": "find the name of " + x, "answer": "ab"} for x in ("x", "yy")]
    set_gradient_checkpointing(model, True)     # transformers 5's name; the old one warns
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        shared = instruct.answer_loss(model, tokenizer, long_rows)
    assert shared.item() == instruct.answer_loss(model, tokenizer, long_rows, share_prefix=False).item()


def test_smollm2_nll_with_the_shared_prefix_equals_whole_rows(smollm2):
    """SmolLM2 on the course's task: its chat template and the task's wording give every prompt the
    same first 32 tokens; the NLL rows match scoring each row whole to 1e-5 relative (measured
    2e-6 over 128 test instructions) while the model computes about half the positions."""
    from course_lib import data

    model, tok = smollm2
    test = data.load_instruct("test")[:8]
    instructions, answers = [r["instruction"] for r in test], [r["answer"] for r in test]
    assert instruct.shared_prefix_length(instruct.answer_batch(tok, instructions, answers)) == 32
    counts = {}
    for share in (False, True):
        seen, handle = _tokens_seen(model)
        try:
            counts[share] = (instruct.answer_nll(model, tok, instructions, answers, batch_size=4, share_prefix=share), sum(seen))
        finally:
            handle.remove()
    (whole, whole_tokens), (shared, shared_tokens) = counts[False], counts[True]
    assert torch.equal(shared[:, 1], whole[:, 1])
    assert torch.allclose(shared[:, 0], whole[:, 0], rtol=1e-5)
    assert shared_tokens < 0.75 * whole_tokens
