"""Chapter 07's methods: the course's bottleneck adapter against its formula, every method of
peft_methods.METHODS trained a few steps (only its own parameters move), the generation fix for
prompt / prefix tuning, and the measurement helpers."""

import copy
import math

import pytest
import torch

from course_lib import adapters, lora, models, peft_methods, train


def _token_rows(n=8, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (length,), generator=g) for _ in range(n)]


def _lm_loss(model, rows):
    ids = torch.stack(rows)
    return model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss


# ---------------------------------------------------------------------------------------------
# bottleneck adapters
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("placement", "per_block"), [("houlsby", 2), ("pfeiffer", 1)])
def test_adapter_parameters_match_the_formula(placement, per_block):
    model = models.tiny_llama()
    adapters.inject_adapters(model, bottleneck_size=4, placement=placement)
    trainable, _ = lora.count_parameters(model)
    h, m, layers = 48, 4, 2                       # tiny_llama: hidden 48, 2 blocks
    assert trainable == adapters.adapter_parameter_count(model.config, 4, placement)
    assert trainable == per_block * layers * (2 * h * m + m + h)
    assert len(adapters.adapter_layers(model)) == per_block * layers
    assert all(".adapter." in name for name, p in model.named_parameters() if p.requires_grad)


def test_a_fresh_adapter_changes_nothing():
    """The up-projection starts at zero, so the adapted model computes exactly the base model."""
    base = models.tiny_llama()
    adapted = adapters.inject_adapters(copy.deepcopy(base), bottleneck_size=8)
    ids = torch.stack(_token_rows(3))
    with torch.no_grad():
        assert torch.equal(adapted(input_ids=ids).logits, base(input_ids=ids).logits)
        layer = next(iter(adapters.adapter_layers(adapted).values()))
        layer.up.weight.normal_()                 # a trained adapter does change the output
        assert not torch.allclose(adapted(input_ids=ids).logits, base(input_ids=ids).logits)


def test_adapter_bad_input():
    with pytest.raises(ValueError, match="bottleneck_size must be a positive integer"):
        adapters.inject_adapters(models.tiny_llama(), bottleneck_size=0)
    with pytest.raises(ValueError, match="unknown placement .*houlsby"):
        adapters.inject_adapters(models.tiny_llama(), bottleneck_size=4, placement="everywhere")
    with pytest.raises(ValueError, match="unknown activation"):
        adapters.BottleneckAdapter(8, 2, activation="tanh")
    with pytest.raises(ValueError, match="no linear layer named"):
        adapters.inject_adapters(models.tiny_bert(), bottleneck_size=4)


# ---------------------------------------------------------------------------------------------
# make_method: each method trains only its own parameters
# ---------------------------------------------------------------------------------------------
def test_unknown_method_and_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="unknown method 'adapter'; known methods: prompt_tuning, "
                                         "prefix_tuning, bottleneck_adapter, ia3, lora, dora, full"):
        peft_methods.make_method(models.tiny_llama(), "adapter")
    for method in ("prompt_tuning", "prefix_tuning"):
        for n in (0, -3):
            with pytest.raises(ValueError, match=f"num_virtual_tokens must be a positive integer \\(for {method}\\)"):
                peft_methods.make_method(models.tiny_llama(), method, num_virtual_tokens=n)
    with pytest.raises(ValueError, match="bottleneck_size must be a positive integer"):
        peft_methods.make_method(models.tiny_llama(), "bottleneck_adapter", bottleneck_size=-1)
    with pytest.raises(ValueError, match=r"r must be a positive integer \(for dora\), got 0"):
        peft_methods.make_method(models.tiny_llama(), "dora", r=0)
    with pytest.raises(ValueError, match="takes no settings"):
        peft_methods.make_method(models.tiny_llama(), "full", r=8)


def _expected_trainable(method: str, config) -> int:
    """Each method's trainable parameters on a Llama, from its definition."""
    h, layers, inter = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    kv = config.num_key_value_heads * config.head_dim            # GQA: keys and values are narrower
    n, r, m = 4, 2, 4
    return {"prompt_tuning": n * h,                               # n virtual token embeddings
            "prefix_tuning": n * layers * 2 * kv,                 # a key and a value per token and layer
            "bottleneck_adapter": 2 * layers * (2 * h * m + m + h),
            "ia3": layers * (kv + kv + inter),                   # k, v outputs and down_proj input scaled
            "lora": layers * r * ((h + h) + (h + kv)),            # q_proj: h→h, v_proj: h→kv
            "dora": layers * (r * ((h + h) + (h + kv)) + h + kv),  # + a magnitude per output feature
            "full": sum(p.numel() for p in models.tiny_llama().parameters())}[method]


SETTINGS = {"prompt_tuning": {"num_virtual_tokens": 4}, "prefix_tuning": {"num_virtual_tokens": 4},
            "bottleneck_adapter": {"bottleneck_size": 4}, "lora": {"r": 2, "lora_alpha": 4},
            "dora": {"r": 2, "lora_alpha": 4}, "ia3": {}, "full": {}}


@pytest.mark.parametrize("method", peft_methods.METHODS)
def test_each_method_trains_only_its_own_parameters(method):
    torch.manual_seed(0)
    model = peft_methods.make_method(models.tiny_llama(), method, **SETTINGS[method])
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == _expected_trainable(method, model.config)
    assert all(any(key in name for key in peft_methods.TRAINABLE[method]) for name in trainable)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}

    lr = {"full": 1e-3, "prefix_tuning": 0.3, "ia3": 0.3}.get(method, 3e-2)
    history = train.train(model, _lm_loss, train.batches(_token_rows(), 8, seed=0), steps=8, lr=lr,
                          warmup_steps=1, progress=False)
    # the same 8 random rows every step: measured drops 0.06-0.11 (adapters), 0.4 (full)
    assert history.loss[-1] < history.loss[0] - 0.03, history.loss
    for name, p in model.named_parameters():
        if name in trainable:
            assert not torch.equal(p, before[name]), f"{name} did not train"
        else:
            assert torch.equal(p, before[name]), f"{name} is frozen but changed"


def _greedy(model, ids, steps):
    """Greedy decoding by full forward passes without a cache: peft's own forward, as in training."""
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def _untied_llama():
    """tiny_llama's shape with untied output embeddings and larger weights: its greedy answers
    depend on the context (tiny_llama's mostly repeat the last token), so a test of generation
    has something to see."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                         tie_word_embeddings=False, initializer_range=0.2)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_generation_uses_the_virtual_tokens(method):
    """make_method's generate agrees with greedy decoding by peft's own forward (the one training
    uses), on a left-padded batch as on each row alone, and differs from the base model's answers.
    peft 0.21's own generate under transformers 5 does not: it ignores a prefix and re-inserts the
    virtual prompt before every new token (if that assertion fails, peft has fixed it and
    make_method's workaround can go)."""
    torch.manual_seed(0)
    model = peft_methods.make_method(_untied_llama(), method, num_virtual_tokens=4)
    rows = _token_rows(3, length=10, seed=1)
    lengths = [10, 7, 9]
    ids = torch.zeros(3, 10, dtype=torch.long)
    mask = torch.zeros(3, 10, dtype=torch.long)
    for i, (row, n) in enumerate(zip(rows, lengths)):          # left padding, as generate_answers does
        ids[i, 10 - n:], mask[i, 10 - n:] = row[:n] % 127 + 1, 1     # no padding id inside
    settings = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    out = model.generate(input_ids=ids, attention_mask=mask, **settings)
    assert torch.equal(out[:, :10], ids)
    for i, n in enumerate(lengths):
        alone = _greedy(model, ids[i:i + 1, 10 - n:], 6)
        assert torch.equal(out[i, 10:], alone[0, n:]), (method, i)
    base = model.get_base_model().generate(input_ids=ids, attention_mask=mask, **settings)
    assert not torch.equal(out, base)
    unpadded = ids[:1]                                          # peft's own generate, even without padding
    assert not torch.equal(type(model).generate(model, input_ids=unpadded, attention_mask=torch.ones_like(unpadded),
                                                **settings), _greedy(model, unpadded, 6))


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_virtual_tokens_initialised_from_text_act_as_that_text(method):
    """After init_virtual_tokens(ids) the model computes what the base model computes on ids + x
    (prompt tuning: the tokens' embeddings; prefix tuning: their keys and values in every layer)."""
    base = _untied_llama()
    model = peft_methods.make_method(copy.deepcopy(base), method, num_virtual_tokens=5)
    text = [7, 99, 3, 42, 61]
    peft_methods.init_virtual_tokens(model, text)
    x = torch.stack(_token_rows(2, length=6, seed=2))
    with torch.no_grad():
        ours = model(input_ids=x, attention_mask=torch.ones_like(x)).logits[:, -6:]
        reference = base(input_ids=torch.cat([torch.tensor([text] * 2), x], dim=1)).logits[:, 5:]
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="need 5 token ids"):
        peft_methods.init_virtual_tokens(model, text[:3])


def test_the_first_steps_memory_is_measured_in_the_run_without_changing_it():
    """`train.train(measure_memory=True)` (what `run_method` reports as ``step_memory``) measures its
    first optimizer step as `memory.measure_step` measures the same step written out by hand, with
    AdamW's two float32 moments and one float32 gradient per trainable number; the measured run takes
    the same steps as an unmeasured one (losses and weights equal)."""
    from course_lib import memory, train

    rows = _token_rows(8)
    batches = [rows[:4], rows[4:]]
    runs = {}
    for measure in (False, True):
        model = peft_methods.make_method(models.tiny_llama(), "lora", r=2, lora_alpha=4)
        optimizer = torch.optim.AdamW(train.trainable_parameters(model), lr=1e-2)
        history = train.train(model, _lm_loss, batches, steps=2, optimizer=optimizer, max_grad_norm=None,
                              progress=False, measure_memory=measure)
        runs[measure] = (history, model.state_dict())
    assert runs[False][0].step_memory is None
    assert runs[True][0].loss == runs[False][0].loss
    assert all(torch.equal(v, runs[False][1][k]) for k, v in runs[True][1].items())

    model = peft_methods.make_method(models.tiny_llama(), "lora", r=2, lora_alpha=4).train()
    optimizer = torch.optim.AdamW(train.trainable_parameters(model), lr=1e-2)
    by_hand = memory.measure_step(lambda: (_lm_loss(model, batches[0]).backward(), optimizer.step()), model, optimizer)
    measured = runs[True][0].step_memory
    assert measured == by_hand
    trainable, _ = lora.count_parameters(model)
    assert measured["optimizer_state"] == 8 * trainable and measured["gradients"] == 4 * trainable
    assert measured["activations_peak"] > 0
    assert measured["total"] == sum(measured[k] for k in ("parameters", "gradients", "optimizer_state", "activations_peak"))


# ---------------------------------------------------------------------------------------------
# the real model: SmolLM2 (GQA with 3 KV heads), prefix tuning and the task's scoring
# ---------------------------------------------------------------------------------------------
def test_prefix_tuning_and_scoring_on_smollm2(smollm2):
    from course_lib import data, instruct

    model, tok = smollm2
    rows = data.load_instruct("test")[:4]
    instructions, answers = [r["instruction"] for r in rows], [r["answer"] for r in rows]

    prefixed = peft_methods.make_method(copy.deepcopy(model), "prefix_tuning", num_virtual_tokens=8)
    trainable, _ = lora.count_parameters(prefixed)
    assert trainable == 8 * 30 * 2 * 3 * 64        # tokens × layers × (key, value) × KV heads × head dim
    loss = instruct.answer_loss(prefixed, tok, rows)
    loss.backward()
    # the answer perplexity from the logits is exp of peft's training loss (one batch of 4)
    assert instruct.perplexity(prefixed, tok, instructions, answers) == pytest.approx(math.exp(loss.item()), rel=1e-4)
    assert prefixed.prompt_encoder.default.embedding.weight.grad.abs().sum() > 0
    with torch.no_grad():
        prefixed.prompt_encoder.default.embedding.weight.mul_(3.0)   # move away from the random start
    prefixed.eval()
    predicted = instruct.generate_answers(prefixed, tok, instructions[:2], max_new_tokens=6)
    batch = tok([instruct.chat_prompt(tok, instructions[0])], return_tensors="pt", add_special_tokens=False)
    new_tokens = _greedy(prefixed, batch["input_ids"], 6)[0, batch["input_ids"].shape[1]:].tolist()
    if tok.eos_token_id in new_tokens:                              # generate stops there
        new_tokens = new_tokens[:new_tokens.index(tok.eos_token_id)]
    assert predicted[0] == tok.decode(new_tokens, skip_special_tokens=True)
    # prompt tuning too, although its logits are longer than the input by the virtual tokens
    prompted = peft_methods.make_method(copy.deepcopy(model), "prompt_tuning", num_virtual_tokens=4)
    with torch.no_grad():
        prompted_loss = instruct.answer_loss(prompted, tok, rows).item()
    assert instruct.perplexity(prompted, tok, instructions, answers) == pytest.approx(math.exp(prompted_loss), rel=1e-4)


def test_run_method_reports_per_item_scores_that_add_up_to_its_totals(smollm2):
    """The per-answer records a paired comparison needs agree with the method's own totals and with
    scoring the returned model again; the base model is left as it was."""
    from course_lib import data, instruct

    model, tok = smollm2
    before = model.model.layers[0].self_attn.q_proj.weight.clone()
    rows = data.load_instruct("test")[:3]
    instructions, answers = [r["instruction"] for r in rows], [r["answer"] for r in rows]
    r = peft_methods.run_method(model, tok, "lora", data.load_instruct("train"), rows, steps=1, batch_size=2,
                                measure_memory=False, progress=False, keep_model=True)
    assert r["answer_nll"].shape == (3, 2) and r["answer_nll"].dtype == torch.float64
    assert r["answer_nll"][:, 1].tolist() == [len(tok(a + tok.eos_token, add_special_tokens=False)["input_ids"])
                                           for a in answers]     # the answer and its end-of-text token
    assert r["perplexity"] == pytest.approx(instruct.perplexity(r["model"], tok, instructions, answers), rel=1e-12)
    assert r["correct"] == instruct.exact_matches(r["predictions"], answers)
    assert sum(r["correct"]) / 3 == r["exact_match"]
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, before)
