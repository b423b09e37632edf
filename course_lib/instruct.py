"""Scoring the SmolLM2 instruction task: exact match of greedy answers, and perplexity.

Every chapter that fine-tunes SmolLM2 scores it with these functions on the same test split
(`course_lib.data.load_instruct`), so numbers are comparable across chapters:

* `chat_prompt` wraps an instruction in the model's chat template; `generate_answers` answers it
  greedily; `normalize_answer` reduces an answer to a bare name and `exact_match` scores it.
* `answer_batch` tokenises prompt + answer with labels on the answer only; `answer_loss` is the
  training loss on it and `perplexity` the held-out answer perplexity, both prompt-excluded.
  Both run the prompt start every instruction shares (the chat template's system turn and the
  task's first words, 32 of SmolLM2's ~78 prompt tokens) once: the loss packs the rows after it
  into one sequence (`pack_after_prefix`), the perplexity runs each row from there on with the
  prefix's KV cache. The loss and its gradient, and each answer's NLL, stay the same up to float
  rounding (`shared_prefix_length`).
* `text_perplexity` is the perplexity of plain text (chapter 02 compares quantized copies by it).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .generation import cache_keyword, returned_cache
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


def answer_loss(model, tokenizer, rows: Sequence[dict], share_prefix: bool = True) -> torch.Tensor:
    """The training loss of one batch of instruction rows: next-token cross-entropy on the
    answer tokens only (the prompt is context, not target), the mean over all answer tokens of
    the batch.

    With ``share_prefix`` (the default) the batch goes in as one packed sequence
    (`pack_after_prefix`): the prompt start all rows share (`shared_prefix_length`, 32 tokens on
    the course's task) once, then each row's own tokens, no padding, and an attention mask
    (`prefix_sharing_mask`) that lets every row see the prefix and its own earlier tokens and
    nothing of the other rows. Each row's positions are those it has alone, so the loss and its
    gradient are the padded batch's up to float rounding, from one forward and one backward pass
    over fewer positions (on the course's training split about half). ``share_prefix=False``, a
    model that cannot take it (`_transformers_model`, or attention other than transformers'
    ``sdpa`` and ``eager``, which take a prepared mask) or a prefix under `MIN_SHARED_PREFIX`
    tokens: the whole padded batch."""
    device = next(model.parameters()).device
    batch = answer_batch(tokenizer, [r["instruction"] for r in rows], [r["answer"] for r in rows])
    runner = _transformers_model(model) if share_prefix else None
    attention = getattr(runner.config, "_attn_implementation", None) if runner is not None else None
    shared = shared_prefix_length(batch) if attention in ("sdpa", "eager") else 0
    if shared < MIN_SHARED_PREFIX:
        return model(**{k: v.to(device) for k, v in batch.items()}).loss
    packed = pack_after_prefix(batch, shared)
    mask = prefix_sharing_mask(packed["row"])
    if attention == "eager":   # eager attention adds the mask to the scores; sdpa takes True = may attend
        mask = torch.zeros(mask.shape).masked_fill_(~mask, torch.finfo(torch.float32).min)
    # transformers' loss is the mean over the labelled tokens (position t against token t + 1)
    return model(input_ids=packed["input_ids"].to(device), position_ids=packed["position_ids"].to(device),
                 attention_mask=mask[None, None].to(device), labels=packed["labels"].to(device)).loss


def pack_after_prefix(batch: dict, shared: int) -> dict:
    """An `answer_batch` as one sequence: its first ``shared`` tokens (the same in every row), then
    each row's tokens after them, padding left out. ``input_ids``, ``labels`` and ``position_ids``
    have shape ``(1, T)`` with ``T = shared + Σ (row length - shared)``; a row's tokens keep the
    positions they have in the row; ``row`` (shape ``(T,)``) says whose each token is: -1 for the
    prefix, else the row's index. No label points across rows: a row's first token after the
    prefix is never an answer token (`shared_prefix_length` stops before the earliest one's
    predecessor), so the label the previous row's last token would be scored on is -100. A
    ``shared`` that breaks either (rows that differ in their first ``shared`` tokens, or a labelled
    first token) raises ValueError."""
    lengths = batch["attention_mask"].sum(1).tolist()
    if shared > min(lengths) or (batch["input_ids"][:, :shared] != batch["input_ids"][:1, :shared]).any():
        raise ValueError(f"the rows do not all start with the same {shared} tokens: pass shared_prefix_length(batch)")
    pieces = {"input_ids": [batch["input_ids"][0, :shared]], "labels": [batch["labels"][0, :shared]],
              "position_ids": [torch.arange(shared)], "row": [torch.full((shared,), -1)]}
    for i, n in enumerate(lengths):
        pieces["input_ids"].append(batch["input_ids"][i, shared:n])
        pieces["labels"].append(batch["labels"][i, shared:n])
        pieces["position_ids"].append(torch.arange(shared, n))
        pieces["row"].append(torch.full((n - shared,), i))
    if (torch.cat([p[:1] for p in pieces["labels"][1:]]) != -100).any():
        raise ValueError(f"a row's first token after the {shared}-token prefix is labelled: the prefix must end "
                         "before the position that predicts the first answer token (use shared_prefix_length)")
    packed = {k: torch.cat(v) for k, v in pieces.items()}
    return {k: v if k == "row" else v[None] for k, v in packed.items()}


def prefix_sharing_mask(row: torch.Tensor) -> torch.Tensor:
    """``(T, T)`` boolean attention mask of a `pack_after_prefix` sequence, True where query ``q``
    may attend to key ``k``: ``k <= q`` (causal) and key ``k`` is the prefix's (``row == -1``) or
    the same row's as ``q``. So each row sees exactly what it would see alone."""
    causal = torch.ones(len(row), len(row), dtype=torch.bool).tril()
    return causal & ((row[None, :] == -1) | (row[None, :] == row[:, None]))


def _scored_logits(model, batch: dict, scored: torch.Tensor, **forward_kwargs) -> torch.Tensor:
    """The logits of ``batch`` at the positions ``scored`` marks (``(B, T-1)``: those whose next
    token is an answer token), shape ``(scored.sum(), vocabulary)``.

    The output layer (the LM head, a 576 x 49,152 matrix for SmolLM2: about a quarter of a forward
    pass) runs on those positions only: a pre-hook on ``model.get_output_embeddings()`` hands it
    the hidden states there instead of at every prompt and padding position. Each logit row is
    the same dot products either way: bit-identical to slicing the full logits on the AMD EPYC
    CPUs the course was first run on, the same to float32 rounding (about 1e-6 relative) on an
    Intel Xeon whose matrix library sums some rows in another order when it multiplies fewer of
    them (checked for the course's models in tests/test_instruct.py). A model without an output layer
    to hook (onnxruntime's `course_lib.export.OnnxCausalLM`), or one whose head the hook did not
    reach, gives full logits, sliced here. ``forward_kwargs`` go to the model as they are (a KV
    cache and the positions after it, `_answer_nll_after_shared_prefix`).
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
        logits = model(input_ids=ids, attention_mask=batch["attention_mask"], **forward_kwargs).logits
    finally:
        if handle is not None:
            handle.remove()
    return logits if logits.dim() == 2 else at_scored(logits)


MIN_SHARED_PREFIX = 8   # tokens: with a shorter common prompt start, rows are scored and trained whole as before


def _transformers_model(model):
    """The transformers model that takes a KV cache of a prompt start, or None: a peft model that
    adds virtual tokens (prompt or prefix tuning) puts its own in front, onnxruntime's
    `course_lib.export.OnnxCausalLM` is no transformers model, and a model training with
    activation checkpointing turns the cache off."""
    from transformers import PreTrainedModel

    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None:
        if peft_config.is_prompt_learning:
            return None
        model = model.get_base_model()
    if not isinstance(model, PreTrainedModel):
        return None
    if model.training and any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()):
        return None
    return model


def shared_prefix_length(batch: dict) -> int:
    """How many tokens every row of an `answer_batch` starts with, up to the position before the
    earliest answer token's (that position predicts it, so it must be scored after the prefix).
    SmolLM2's chat template and the course's task give 32: the system turn and the user turn's
    first words up to the module name."""
    lengths = batch["attention_mask"].sum(1).tolist()
    rows = [batch["input_ids"][i, :n].tolist() for i, n in enumerate(lengths)]
    first_answer = (batch["labels"] != -100).int().argmax(1)   # index of each row's first answer token
    return max(0, min(len(os.path.commonprefix(rows)), int(first_answer.min()) - 1))


def _prefix_states(model, prefix_ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's keys and values for one prefix sequence ``(1, P)``: one pass whose output layer
    runs on one position only (``logits_to_keep=1``: the prefix's own logits are not needed)."""
    cache = returned_cache(model(input_ids=prefix_ids, use_cache=True, logits_to_keep=1))
    return [(layer.keys, layer.values) for layer in cache.layers]


def _cache_for_rows(runner, prefix: list[tuple[torch.Tensor, torch.Tensor]], rows: int):
    """A fresh KV cache holding the prefix's keys and values for each of ``rows`` rows: views
    (``expand``), copied only when a pass appends its own positions, so every batch starts from
    the same prefix without running it again."""
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=[(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)) for k, v in prefix],
                        config=runner.config)


def _answer_nll_after_shared_prefix(model, tokenizer, instructions, answers, batch_size) -> torch.Tensor | None:
    """`answer_nll` with the prompt start all rows share run once: its KV cache, repeated for each
    batch, holds positions ``0 .. P-1`` and the rows go in from position ``P`` on, shortest first
    (less padding). Mathematically the same logits as one pass over each whole row; numerically
    they differ in the last float32 digits (other matrix shapes). None when it does not apply
    (`_transformers_model`, or fewer than `MIN_SHARED_PREFIX` shared tokens before the first
    scored position): then the rows are scored whole."""
    runner = _transformers_model(model)
    if runner is None:
        return None
    full = answer_batch(tokenizer, instructions, answers)      # right padding: a row's positions are 0 .. n-1
    shared = shared_prefix_length(full)
    if shared < MIN_SHARED_PREFIX:
        return None
    device = model_device(model)
    lengths = full["attention_mask"].sum(1).tolist()
    full = {k: v.to(device) for k, v in full.items()}
    keyword = cache_keyword(runner)
    prefix = _prefix_states(model, full["input_ids"][:1, :shared])
    result = torch.zeros(len(answers), 2, dtype=torch.float64)
    order = sorted(range(len(answers)), key=lambda i: lengths[i])
    for start in range(0, len(order), batch_size):
        index = order[start:start + batch_size]
        end = max(lengths[i] for i in index)
        batch = {"input_ids": full["input_ids"][index, shared:end], "attention_mask": full["attention_mask"][index, :end]}
        targets = full["labels"][index, shared + 1:end]        # position t predicts token t + 1
        scored = targets != -100
        cache = _cache_for_rows(runner, prefix, len(index))
        positions = torch.arange(shared, end, device=device).expand(len(index), -1)
        nll = torch.zeros(targets.shape, dtype=torch.float32, device=device)
        logits = _scored_logits(model, batch, scored, position_ids=positions, use_cache=True, **{keyword: cache})
        nll[scored] = F.cross_entropy(logits.float(), targets[scored], reduction="none")
        result[index] = torch.stack([nll.double().sum(1), scored.sum(1).double()], dim=1).cpu()
    return result


@torch.no_grad()
def answer_nll(model, tokenizer, instructions: Sequence[str], answers: Sequence[str],
               batch_size: int = 16, share_prefix: bool = True) -> torch.Tensor:
    """Per answer: ``[summed negative log-likelihood of its tokens, number of its tokens]``, shape
    ``(len(answers), 2)`` float64, prompt tokens excluded. `perplexity` is
    ``exp(Σ nll / Σ tokens)`` over these rows; a paired comparison of two models resamples them
    (`course_lib.stats.paired_bootstrap` with ``stats.corpus_perplexity``).

    Only the answer positions' logits are computed (`_scored_logits`). With ``share_prefix`` (the
    default) the prompt start every instruction shares is run once and the rest of each row after
    it with its KV cache (`_answer_nll_after_shared_prefix`): SmolLM2's 128-instruction scoring
    of chapters 00 and 01 takes about 0.6 of the time, with the same NLL to about 1e-6 relative.
    ``share_prefix=False`` scores each row whole: the NLL of a full forward pass of the same batch,
    to float32 rounding (bit for bit where the output layer's sums do not depend on its row count). A
    prompt-tuned peft model has positions for its virtual tokens in front of the input's; those
    are skipped, so the answer tokens are scored as for any other model (chapter 07 compares the
    methods by this); such a model, and onnxruntime's, is always scored whole.
    """
    if not answers:
        raise ValueError("perplexity of zero examples is undefined")
    if len(instructions) != len(answers):
        raise ValueError(f"{len(instructions)} instructions but {len(answers)} answers: give one answer per instruction")
    if share_prefix:
        rows = _answer_nll_after_shared_prefix(model, tokenizer, instructions, answers, batch_size)
        if rows is not None:
            return rows
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
