"""course_lib.lora against hand arithmetic and against peft, on tiny and on the real models."""

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from course_lib import lora
from course_lib.models import tiny_bert, tiny_llama


def _randomise_b(model, name="default", seed=0):
    """B starts at zero; give it values so that LoRA actually changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            w = layer.lora_B[name].weight
            w.copy_(torch.randn(w.shape, generator=g) * 0.1)


def test_seed_worked_example():
    """W0 = [[1,2],[3,4]], A = [[0.1,0.2]], B = [[0.5],[0.6]], x = [1,2]: W0x + BAx = [5.25, 11.3]."""
    layer = lora.LoRALinear(nn.Linear(2, 2, bias=False), r=1, lora_alpha=1)
    with torch.no_grad():
        layer.base_layer.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        layer.lora_A["default"].weight.copy_(torch.tensor([[0.1, 0.2]]))
        layer.lora_B["default"].weight.copy_(torch.tensor([[0.5], [0.6]]))
    torch.testing.assert_close(layer(torch.tensor([1.0, 2.0])), torch.tensor([5.25, 11.3]))


def test_new_adapter_leaves_the_model_unchanged_and_trains_only_lora():
    model = tiny_llama()
    x = torch.randint(0, 128, (2, 9))
    before = model(x).logits
    lora.inject_lora(model, ["q_proj", "v_proj"], r=4, lora_alpha=8)
    assert torch.equal(model(x).logits, before)  # B = 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)


def _pair(base, targets, r=8, alpha=16, use_rslora=False):
    """Our model and peft's, holding identical A and (non-zero) B."""
    ours = lora.inject_lora(copy.deepcopy(base), targets, r=r, lora_alpha=alpha, use_rslora=use_rslora)
    _randomise_b(ours)
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                                            lora_dropout=0.0, use_rslora=use_rslora))
    peft_modules = dict(theirs.base_model.model.named_modules())
    with torch.no_grad():
        for name, layer in lora.lora_layers(ours).items():
            peft_layer = peft_modules[name]
            peft_layer.lora_A["default"].weight.copy_(layer.lora_A["default"].weight)
            peft_layer.lora_B["default"].weight.copy_(layer.lora_B["default"].weight)
    return ours, theirs


def _lora_grads(model):
    return {n.replace("base_model.model.", ""): p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("use_rslora", [False, True])
def test_same_outputs_and_gradients_as_peft_on_minilm(minilm, use_rslora):
    base, tokenizer = minilm
    ours, theirs = _pair(base, ["query", "value"], use_rslora=use_rslora)
    batch = tokenizer(["Return the sum of two numbers.", "def f(x):\n    return x + 1"], padding=True,
                      return_tensors="pt")
    out_ours = ours(**batch).last_hidden_state
    out_peft = theirs(**batch).last_hidden_state
    torch.testing.assert_close(out_ours, out_peft, rtol=1e-5, atol=1e-6)
    out_ours.pow(2).mean().backward()
    out_peft.pow(2).mean().backward()
    g_ours, g_peft = _lora_grads(ours), _lora_grads(theirs)
    assert len(g_ours) == len(g_peft) == 6 * 2 * 2
    for name, grad in g_ours.items():
        torch.testing.assert_close(grad, g_peft[name], rtol=1e-5, atol=1e-7)


def test_same_outputs_and_gradients_as_peft_on_smollm2(smollm2):
    base, tokenizer = smollm2
    ours, theirs = _pair(base, ["q_proj", "v_proj"])
    ids = tokenizer(["def parse(text):\n    return"], return_tensors="pt")["input_ids"]
    loss_ours = ours(input_ids=ids, labels=ids).loss
    loss_peft = theirs(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(loss_ours, loss_peft, rtol=1e-5, atol=1e-6)
    loss_ours.backward()
    loss_peft.backward()
    g_ours, g_peft = _lora_grads(ours), _lora_grads(theirs)
    assert len(g_ours) == 30 * 2 * 2
    for name, grad in g_ours.items():
        torch.testing.assert_close(grad, g_peft[name], rtol=1e-5, atol=1e-7)
    del ours, theirs


def test_trainable_count_matches_formula_and_peft():
    base = tiny_llama()
    ours = lora.inject_lora(copy.deepcopy(base), ["q_proj", "v_proj"], r=4, lora_alpha=8)
    c = base.config
    per_layer = 4 * (c.hidden_size + c.num_attention_heads * c.head_dim) + 4 * (
        c.hidden_size + c.num_key_value_heads * c.head_dim)
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    assert lora.count_parameters(ours)[0] == c.num_hidden_layers * per_layer
    assert lora.count_parameters(ours) == theirs.get_nb_trainable_parameters()


def test_merge_is_exact_and_reversible():
    model = lora.inject_lora(tiny_bert(), ["query", "value"], r=4, lora_alpha=8)
    _randomise_b(model)
    original = {n: p.clone() for n, p in model.named_parameters() if "base_layer" in n}
    x = torch.randint(0, 128, (2, 10))
    runtime = model(x).last_hidden_state
    lora.merge(model)
    torch.testing.assert_close(model(x).last_hidden_state, runtime, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="already merged"):
        lora.merge(model)
    lora.unmerge(model)
    for n, p in model.named_parameters():
        if n in original:
            torch.testing.assert_close(p, original[n], rtol=0, atol=1e-6)
    torch.testing.assert_close(model(x).last_hidden_state, runtime, rtol=1e-5, atol=1e-6)


def test_safe_merge_refuses_nan_and_leaves_the_weight_alone():
    layer = lora.LoRALinear(nn.Linear(4, 4), r=2, lora_alpha=2)
    with torch.no_grad():
        layer.lora_B["default"].weight.fill_(float("nan"))
    before = layer.base_layer.weight.clone()
    with pytest.raises(ValueError, match="NaN/inf"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, before) and layer.merged_adapters == []


def test_merge_and_unload_gives_a_plain_model_with_the_same_output():
    model = lora.inject_lora(tiny_llama(), "all-linear", r=2, lora_alpha=4)
    _randomise_b(model)
    x = torch.randint(0, 128, (1, 6))
    expected = model(x).logits
    plain = lora.merge_and_unload(model)
    assert not lora.lora_layers(plain)
    assert isinstance(plain.lm_head, nn.Linear)  # the output layer was never wrapped
    torch.testing.assert_close(plain(x).logits, expected, rtol=1e-5, atol=1e-6)


def test_several_adapters_switch_disable_delete():
    model = tiny_bert()
    x = torch.randint(0, 128, (2, 8))
    base_out = model(x).last_hidden_state
    lora.inject_lora(model, ["query", "value"], r=2, lora_alpha=4, adapter_name="a")
    _randomise_b(model, "a", seed=1)
    lora.inject_lora(model, ["query", "value"], r=2, lora_alpha=4, adapter_name="b")
    _randomise_b(model, "b", seed=2)
    lora.set_adapter(model, "a")
    out_a = model(x).last_hidden_state
    lora.set_adapter(model, "b")
    out_b = model(x).last_hidden_state
    assert not torch.allclose(out_a, out_b) and not torch.allclose(out_a, base_out)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".b." in n for n in trainable)  # only the active adapter trains
    with lora.disable_adapters(model):
        torch.testing.assert_close(model(x).last_hidden_state, base_out)
    lora.delete_adapter(model, "b")
    assert not [n for n, _ in model.named_parameters() if ".b." in n]
    lora.set_adapter(model, "a")
    torch.testing.assert_close(model(x).last_hidden_state, out_a)
    with pytest.raises(ValueError, match="unknown adapter 'b'"):
        lora.set_adapter(model, "b")


def test_exact_combination_is_the_weighted_sum_and_linear_is_not():
    """'cat' stacks ranks, so B_new A_new = Σ w_i ΔW_i. 'linear' multiplies the mixed B by the
    mixed A, which adds cross terms B_a A_b + B_b A_a: not the weighted sum of the updates.
    Both match peft's add_weighted_adapter."""
    base = tiny_bert()
    ours = lora.inject_lora(copy.deepcopy(base), ["query", "value"], r=2, lora_alpha=4, adapter_name="a")
    lora.inject_lora(ours, ["query", "value"], r=2, lora_alpha=8, adapter_name="b")
    _randomise_b(ours, "a", seed=1)
    _randomise_b(ours, "b", seed=2)
    weights = [0.7, 0.3]
    lora.add_weighted_adapter(ours, ["a", "b"], weights, "cat", combination_type="cat")
    lora.add_weighted_adapter(ours, ["a", "b"], weights, "lin", combination_type="linear")

    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"]),
                            adapter_name="a")
    theirs.add_adapter("b", LoraConfig(r=2, lora_alpha=8, target_modules=["query", "value"]))
    peft_modules = dict(theirs.base_model.model.named_modules())
    with torch.no_grad():
        for name, layer in lora.lora_layers(ours).items():
            for adapter in ("a", "b"):
                peft_modules[name].lora_A[adapter].weight.copy_(layer.lora_A[adapter].weight)
                peft_modules[name].lora_B[adapter].weight.copy_(layer.lora_B[adapter].weight)
    theirs.add_weighted_adapter(["a", "b"], weights, "cat", combination_type="cat")
    theirs.add_weighted_adapter(["a", "b"], weights, "lin", combination_type="linear")

    for name, layer in lora.lora_layers(ours).items():
        expected = sum(w * layer.delta_weight(a) for a, w in zip(["a", "b"], weights))
        torch.testing.assert_close(layer.delta_weight("cat"), expected, rtol=1e-5, atol=1e-7)
        assert (layer.delta_weight("lin") - expected).abs().max() > 1e-4
        peft_layer = peft_modules[name]
        for combo in ("cat", "lin"):
            peft_delta = peft_layer.scaling[combo] * peft_layer.lora_B[combo].weight @ peft_layer.lora_A[combo].weight
            torch.testing.assert_close(layer.delta_weight(combo), peft_delta, rtol=1e-5, atol=1e-7)


def test_adapter_round_trips_with_peft(tmp_path):
    base = tiny_llama()
    x = torch.randint(0, 128, (2, 7))
    ours = lora.inject_lora(copy.deepcopy(base), ["q_proj", "v_proj"], r=4, lora_alpha=8)
    _randomise_b(ours)
    lora.save_adapter(ours, tmp_path / "ours")
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == ["adapter_config.json",
                                                                    "adapter_model.safetensors"]
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(loaded(x).logits, ours(x).logits, rtol=1e-6, atol=1e-6)

    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_B" in n:
                p.normal_()
    theirs.save_pretrained(tmp_path / "peft")
    back = lora.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(back(x).logits, theirs(x).logits, rtol=1e-6, atol=1e-6)


def test_real_minilm_adapter_loads_in_peft(minilm, tmp_path):
    base, tokenizer = minilm
    ours = lora.inject_lora(copy.deepcopy(base), ["query", "value"], r=8, lora_alpha=16)
    _randomise_b(ours)
    lora.save_adapter(ours, tmp_path)
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    batch = tokenizer(["Parse a JSON document."], return_tensors="pt")
    torch.testing.assert_close(theirs(**batch).last_hidden_state, ours(**batch).last_hidden_state,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"r": 0}, ValueError, "r must be a positive integer"),
    ({"r": 33}, ValueError, "exceeds min"),
    ({"lora_alpha": 0}, ValueError, "lora_alpha must be positive"),
    ({"lora_dropout": 1.0}, ValueError, "lora_dropout"),
    ({"target_modules": ["nothing_like_this"]}, ValueError, "matches no linear layer.*query"),
    ({"target_modules": ["LayerNorm"]}, TypeError, "not nn.Linear"),
])
def test_bad_input_is_refused_clearly(kwargs, error, match):
    args = {"target_modules": ["query"], "r": 4, "lora_alpha": 8, **kwargs}
    with pytest.raises(error, match=match):
        lora.inject_lora(tiny_bert(), **args)


def test_adapter_for_another_model_is_refused(tmp_path):
    ours = lora.inject_lora(tiny_llama(), ["q_proj"], r=4, lora_alpha=8)
    lora.save_adapter(ours, tmp_path)
    with pytest.raises(ValueError, match="lacks"):
        lora.load_adapter(tiny_bert(), tmp_path)
    from transformers import LlamaConfig, LlamaForCausalLM

    wider = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=8, num_key_value_heads=2, head_dim=8))
    with pytest.raises(ValueError, match="shape"):
        lora.load_adapter(wider, tmp_path)
