"""Scoring the SmolLM2 instruction task: exact match of greedy answers, and perplexity.

Every chapter that fine-tunes SmolLM2 scores it with these functions on the same test split
(`course_lib.data.load_instruct`), so numbers are comparable across chapters:

* `chat_prompt` wraps an instruction in the model's chat template; `generate_answers` answers it
  greedily; `normalize_answer` reduces an answer to a bare name and `exact_match` scores it.
* `answer_batch` tokenises prompt + answer with labels on the answer only; `answer_loss` is the
  training loss on it and `perplexity` the held-out answer perplexity, both prompt-excluded.
* `text_perplexity` is the perplexity of plain text (chapter 02 compares quantized copies by it).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .progress import progress as _progress
from .retrieval import model_device


# ---------------------------------------------------------------------------------------------
# Exact match of generated answers
# ---------------------------------------------------------------------------------------------
def normalize_answer(text: str) -> str:
    """Reduce a generated answer to a bare identifier.

    Takes the first backtick-quoted span if there is one (chat models like to write
    ``The function is `abspath`.``), else the first line; then drops quotes, trailing
    punctuation, a call's parentheses, and all but the last dotted component
    (``json.dumps()`` → ``dumps``). Nothing else is guessed: a sentence stays a sentence
    and does not match.
    """
    quoted = re.search(r"`([^`\n]+)`", text)
    line = quoted.group(1) if quoted else (text.strip().splitlines() or [""])[0]
    line = line.strip().strip("'\" ").rstrip(".:;,")
    line = re.sub(r"\(.*\)$", "", line).strip()
    return line.split(".")[-1].strip()


def exact_matches(predictions: Sequence[str], answers: Sequence[str]) -> list[bool]:
    """Per answer: does the normalised prediction equal it exactly (case-sensitive)? The right/wrong
    list that `course_lib.stats.mcnemar` compares between two models."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions but {len(answers)} answers")
    if not answers:
        raise ValueError("exact_match of zero examples is undefined")
    return [normalize_answer(p) == a for p, a in zip(predictions, answers)]


def exact_match(predictions: Sequence[str], answers: Sequence[str]) -> float:
    """Fraction of predictions whose normalised form equals the answer exactly (case-sensitive)."""
    matches = exact_matches(predictions, answers)
    return sum(matches) / len(matches)


def chat_prompt(tokenizer, instruction: str) -> str:
    """The instruction wrapped in the model's chat template, ending where the answer starts."""
    return tokenizer.apply_chat_template([{"role": "user", "content": instruction}],
                                         add_generation_prompt=True, tokenize=False)


@torch.no_grad()
def generate_answers(model, tokenizer, instructions: Sequence[str], max_new_tokens: int = 12,
                     batch_size: int = 16, progress: bool = False) -> list[str]:
    """Greedy answers to chat instructions, batched with left padding."""
    device = next(model.parameters()).device
    tokenizer.padding_side = "left"
    answers = []
    for start in _progress(range(0, len(instructions), batch_size), "generating", disable=not progress):
        prompts = [chat_prompt(tokenizer, x) for x in instructions[start:start + batch_size]]
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        answers += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return answers


# ---------------------------------------------------------------------------------------------
# Answer-only loss and perplexity
# ---------------------------------------------------------------------------------------------
def answer_batch(tokenizer, instructions: Sequence[str], answers: Sequence[str],
                 max_length: int = 256) -> dict:
    """Tokenised chat prompt + answer + end-of-turn, with ``labels`` = -100 on the prompt and
    padding, so a causal-LM loss (and perplexity) counts only the answer tokens."""
    rows, labels = [], []
    for instruction, answer in zip(instructions, answers, strict=True):
        prompt = tokenizer(chat_prompt(tokenizer, instruction), add_special_tokens=False)["input_ids"]
        target = tokenizer(answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        ids = (prompt + target)[-max_length:]
        n_target = min(len(target), len(ids))
        rows.append(ids)
        labels.append([-100] * (len(ids) - n_target) + ids[-n_target:])
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    return {  # right padding: positions stay 0..n-1 for every row
        "input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
        "labels": torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels]),
    }


def answer_loss(model, tokenizer, rows: Sequence[dict]) -> torch.Tensor:
    """The training loss of one batch of instruction rows: next-token cross-entropy on the
    answer tokens only (the prompt is context, not target)."""
    device = next(model.parameters()).device
    batch = answer_batch(tokenizer, [r["instruction"] for r in rows], [r["answer"] for r in rows])
    return model(**{k: v.to(device) for k, v in batch.items()}).loss


def _scored_logits(model, batch: dict, scored: torch.Tensor) -> torch.Tensor:
    """The logits of ``batch`` at the positions ``scored`` marks (``(B, T-1)``: those whose next
    token is an answer token), shape ``(scored.sum(), vocabulary)``.

    The output layer (the LM head, a 576 x 49,152 matrix for SmolLM2: about a quarter of a forward
    pass) runs on those positions only: a pre-hook on ``model.get_output_embeddings()`` hands it
    the hidden states there instead of at every prompt and padding position. Each logit row is
    the same computation either way, so the result is bit-identical to slicing the full logits
    (checked for the course's models in tests/test_instruct.py). A model without an output layer
    to hook (onnxruntime's `course_lib.export.OnnxCausalLM`), or one whose head the hook did not
    reach, gives full logits, sliced here.
    """
    ids = batch["input_ids"]

    def at_scored(hidden: torch.Tensor) -> torch.Tensor:
        # a prompt-tuned peft model has positions for its virtual tokens in front of the input's
        return hidden[:, hidden.shape[1] - ids.shape[1]:][:, :-1][scored]

    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    handle = None
    if isinstance(head, torch.nn.Module):
        handle = head.register_forward_pre_hook(
            lambda module, args: (at_scored(args[0]), *args[1:]) if args and args[0].dim() == 3 else None)
    try:
        logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits
    finally:
        if handle is not None:
            handle.remove()
    return logits if logits.dim() == 2 else at_scored(logits)


@torch.no_grad()
def answer_nll(model, tokenizer, instructions: Sequence[str], answers: Sequence[str],
               batch_size: int = 16) -> torch.Tensor:
    """Per answer: ``[summed negative log-likelihood of its tokens, number of its tokens]``, shape
    ``(len(answers), 2)`` float64, prompt tokens excluded. `perplexity` is
    ``exp(Σ nll / Σ tokens)`` over these rows; a paired comparison of two models resamples them
    (`course_lib.stats.paired_bootstrap` with ``stats.corpus_perplexity``).

    Only the answer positions' logits are computed (`_scored_logits`). A prompt-tuned peft model
    has positions for its virtual tokens in front of the input's; those are skipped, so the answer
    tokens are scored as for any other model (chapter 07 compares the methods by this).
    """
    if not answers:
        raise ValueError("perplexity of zero examples is undefined")
    if len(instructions) != len(answers):
        raise ValueError(f"{len(instructions)} instructions but {len(answers)} answers: give one answer per instruction")
    device = model_device(model)
    rows = []
    for start in range(0, len(answers), batch_size):
        batch = answer_batch(tokenizer, instructions[start:start + batch_size],
                             answers[start:start + batch_size])
        batch = {k: v.to(device) for k, v in batch.items()}
        targets = batch["labels"][:, 1:]       # position t predicts token t + 1
        scored = targets != -100
        # one softmax per scored position, over its contiguous row of the vocabulary
        nll = torch.zeros(targets.shape, dtype=torch.float32, device=device)
        nll[scored] = F.cross_entropy(_scored_logits(model, batch, scored).float(), targets[scored], reduction="none")
        rows.append(torch.stack([nll.double().sum(1), scored.sum(1).double()], dim=1).cpu())
    return torch.cat(rows)


def perplexity(model, tokenizer, instructions: Sequence[str], answers: Sequence[str],
               batch_size: int = 16) -> float:
    """exp(mean negative log-likelihood per answer token), prompt tokens excluded (over all
    answers together; `answer_nll` gives the per-answer parts)."""
    rows = answer_nll(model, tokenizer, instructions, answers, batch_size)
    return math.exp(rows[:, 0].sum().item() / rows[:, 1].sum().item())


@torch.no_grad()
def text_perplexity(model, tokenizer, texts: Sequence[str], max_length: int = 128, batch_size: int = 8) -> float:
    """exp(mean negative log-likelihood per predicted token) of plain ``texts`` under a causal LM.

    Each text is truncated to ``max_length`` tokens; every token after the first is predicted
    from those before it (padding excluded). This is the held-out-text perplexity used to
    compare quantized copies of one model (chapter 02).
    """
    if not texts:
        raise ValueError("perplexity of zero texts is undefined")
    device = model_device(model)
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(texts), batch_size):
        rows = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_length] for t in texts[start:start + batch_size]]
        if min(len(r) for r in rows) < 2:
            raise ValueError("every text needs at least two tokens to predict one")
        width, pad = max(len(r) for r in rows), tokenizer.pad_token_id
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        total_nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                     ignore_index=-100, reduction="sum").item()
        total_tokens += (labels != -100).sum().item()
    return math.exp(total_nll / total_tokens)
