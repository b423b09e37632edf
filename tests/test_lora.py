"""course_lib.lora against hand arithmetic and against peft, on tiny and on the real models.

Nothing here compares our code with numbers it printed itself: expected values come from hand
arithmetic, from the adapters' own matrices, or from peft given the same A and B.
"""

import copy
import gc
import json

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from course_lib import lora, lora_combine, lora_io
from course_lib.models import tiny_bert, tiny_llama

CLOSE = {"rtol": 1e-5, "atol": 1e-6}


def _randomise_b(model, name="default", seed=0):
    """B starts at zero; give it values so that LoRA actually changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            if name in layer.lora_B:
                w = layer.lora_B[name].weight
                w.copy_(torch.randn(w.shape, generator=g) * 0.1)


def _copy_into_peft(ours, theirs, adapters=("default",)):
    """Give peft's layers exactly our A and B."""
    peft_modules = dict(theirs.base_model.model.named_modules())
    with torch.no_grad():
        for name, layer in lora.lora_layers(ours).items():
            for adapter in adapters:
                peft_modules[name].lora_A[adapter].weight.copy_(layer.lora_A[adapter].weight)
                peft_modules[name].lora_B[adapter].weight.copy_(layer.lora_B[adapter].weight)
    return peft_modules


def _lora_grads(model):
    return {n.replace("base_model.model.", ""): p.grad for n, p in model.named_parameters() if p.requires_grad}


def _assert_same_grads(ours, theirs, expected_count):
    g_ours, g_peft = _lora_grads(ours), _lora_grads(theirs)
    assert len(g_ours) == len(g_peft) == expected_count
    for name, grad in g_ours.items():
        torch.testing.assert_close(grad, g_peft[name], rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------------------------
def test_seed_worked_example():
    """W0 = [[1,2],[3,4]], A = [[0.1,0.2]], B = [[0.5],[0.6]], x = [1,2]: W0x + BAx = [5.25, 11.3]."""
    layer = lora.LoRALinear(nn.Linear(2, 2, bias=False), r=1, lora_alpha=1)
    with torch.no_grad():
        layer.base_layer.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        layer.lora_A["default"].weight.copy_(torch.tensor([[0.1, 0.2]]))
        layer.lora_B["default"].weight.copy_(torch.tensor([[0.5], [0.6]]))
    torch.testing.assert_close(layer(torch.tensor([1.0, 2.0])), torch.tensor([5.25, 11.3]))


def test_scaling_rslora_and_dropout_on_the_lora_branch_only():
    base = nn.Linear(6, 5)
    plain = lora.LoRALinear(base, r=4, lora_alpha=8)
    assert plain.scaling["default"] == 8 / 4
    assert lora.LoRALinear(nn.Linear(6, 5), r=4, lora_alpha=8, use_rslora=True).scaling["default"] == 8 / 2
    layer = lora.LoRALinear(nn.Linear(6, 5), r=4, lora_alpha=8, lora_dropout=0.5).train()
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    x = torch.randn(3, 6)
    torch.manual_seed(7)
    out = layer(x)
    torch.manual_seed(7)
    dropped = F.dropout(x, 0.5, training=True)  # the same mask: dropout touches the LoRA input only
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = x @ layer.base_layer.weight.T + layer.base_layer.bias + 2.0 * dropped @ a.T @ b.T
    torch.testing.assert_close(out, expected)


def test_new_adapter_leaves_the_model_unchanged_and_trains_only_lora():
    model = tiny_llama()
    x = torch.randint(0, 128, (2, 9))
    before = model(x).logits
    lora.inject_lora(model, ["q_proj", "v_proj"], r=4, lora_alpha=8)
    assert torch.equal(model(x).logits, before)  # B = 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)


def test_half_precision_base_keeps_float32_adapters_like_peft():
    base = tiny_llama().to(torch.bfloat16)
    ours = lora.inject_lora(copy.deepcopy(base), ["q_proj", "v_proj"], r=4, lora_alpha=8)
    _randomise_b(ours)
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    _copy_into_peft(ours, theirs)
    assert {p.dtype for n, p in ours.named_parameters() if "lora_" in n} == {torch.float32}
    x = torch.randint(0, 128, (2, 7))
    out = ours(x).logits
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, theirs(x).logits, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Same numbers as peft on the real models
# ---------------------------------------------------------------------------------------------
def _pair(base, targets, r=8, alpha=16, use_rslora=False):
    """Our model and peft's, holding identical A and (non-zero) B."""
    ours = lora.inject_lora(copy.deepcopy(base), targets, r=r, lora_alpha=alpha, use_rslora=use_rslora)
    _randomise_b(ours)
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                                            lora_dropout=0.0, use_rslora=use_rslora))
    _copy_into_peft(ours, theirs)
    return ours, theirs


@pytest.mark.parametrize("use_rslora", [False, True])
def test_same_outputs_and_gradients_as_peft_on_minilm(minilm, use_rslora):
    base, tokenizer = minilm
    ours, theirs = _pair(base, ["query", "value"], use_rslora=use_rslora)
    batch = tokenizer(["Return the sum of two numbers.", "def f(x):\n    return x + 1"], padding=True,
                      return_tensors="pt")
    out_ours = ours(**batch).last_hidden_state
    out_peft = theirs(**batch).last_hidden_state
    torch.testing.assert_close(out_ours, out_peft, **CLOSE)
    out_ours.pow(2).mean().backward()
    out_peft.pow(2).mean().backward()
    _assert_same_grads(ours, theirs, 6 * 2 * 2)


def test_same_outputs_and_gradients_as_peft_on_smollm2(smollm2):
    """Two adapters on the same two copies: plain LoRA, then rsLoRA (SmolLM2 is 540 MB a copy)."""
    base, tokenizer = smollm2
    ours, theirs = _pair(base, ["q_proj", "v_proj"])
    lora.inject_lora(ours, ["q_proj", "v_proj"], r=8, lora_alpha=16, adapter_name="rs", use_rslora=True)
    _randomise_b(ours, "rs", seed=1)
    theirs.add_adapter("rs", LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_rslora=True))
    _copy_into_peft(ours, theirs, ["rs"])
    ids = tokenizer(["def parse(text):\n    return"], return_tensors="pt")["input_ids"]
    for adapter in ("default", "rs"):
        lora.set_adapter(ours, adapter)
        theirs.set_adapter(adapter)
        ours.zero_grad(set_to_none=True)
        theirs.zero_grad(set_to_none=True)
        loss_ours = ours(input_ids=ids, labels=ids).loss
        loss_peft = theirs(input_ids=ids, labels=ids).loss
        torch.testing.assert_close(loss_ours, loss_peft, **CLOSE)
        loss_ours.backward()
        loss_peft.backward()
        _assert_same_grads(ours, theirs, 30 * 2 * 2)
    del ours, theirs
    gc.collect()


def test_trainable_count_matches_formula_and_peft():
    base = tiny_llama()
    ours = lora.inject_lora(copy.deepcopy(base), ["q_proj", "v_proj"], r=4, lora_alpha=8)
    c = base.config
    q_in, q_out = c.hidden_size, c.num_attention_heads * c.head_dim
    v_in, v_out = c.hidden_size, c.num_key_value_heads * c.head_dim
    formula = c.num_hidden_layers * (4 * (q_in + q_out) + 4 * (v_in + v_out))
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    assert lora.count_parameters(ours)[0] == formula
    assert lora.count_parameters(ours) == theirs.get_nb_trainable_parameters()
    assert lora.count_parameters(ours)[1] == sum(p.numel() for p in base.parameters()) + formula


@pytest.mark.parametrize("targets", ["all-linear", r".*\.0\..*(q_proj|down_proj)", ["o_proj", "gate_proj"]])
def test_target_modules_select_the_same_layers_as_peft(targets):
    base = tiny_llama()
    ours = lora.inject_lora(copy.deepcopy(base), targets, r=2, lora_alpha=4)
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=4, target_modules=targets))
    peft_layers = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if hasattr(m, "lora_A")}
    assert set(lora.lora_layers(ours)) == peft_layers
    assert "lm_head" not in peft_layers


# ---------------------------------------------------------------------------------------------
# Merge / unmerge
# ---------------------------------------------------------------------------------------------
def test_merge_is_exact_and_reversible():
    model = lora.inject_lora(tiny_bert(), ["query", "value"], r=4, lora_alpha=8)
    _randomise_b(model)
    original = {n: p.clone() for n, p in model.named_parameters() if "base_layer" in n}
    x = torch.randint(0, 128, (2, 10))
    runtime = model(x).last_hidden_state
    lora.merge(model)
    for layer in lora.lora_layers(model).values():  # W = W0 + scaling·B@A, from the matrices themselves
        expected = 2.0 * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        name = next(n for n, m in model.named_modules() if m is layer)
        torch.testing.assert_close(layer.base_layer.weight - original[f"{name}.base_layer.weight"], expected)
    torch.testing.assert_close(model(x).last_hidden_state, runtime, **CLOSE)
    with pytest.raises(ValueError, match="already merged.*unmerge"):
        lora.merge(model)
    lora.unmerge(model)
    for n, p in model.named_parameters():
        if n in original:
            torch.testing.assert_close(p, original[n], rtol=0, atol=1e-6)
    torch.testing.assert_close(model(x).last_hidden_state, runtime, **CLOSE)


def test_safe_merge_refuses_nan_and_leaves_the_weights_alone():
    layer = lora.LoRALinear(nn.Linear(4, 4), r=2, lora_alpha=2)
    with torch.no_grad():
        layer.lora_B["default"].weight.fill_(float("nan"))
    before = layer.base_layer.weight.clone()
    with pytest.raises(ValueError, match="NaN/inf"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, before) and layer.merged_adapters == []

    model = lora.inject_lora(tiny_bert(), ["query", "value"], r=2, lora_alpha=4)
    _randomise_b(model)
    with torch.no_grad():
        model.encoder.layer[1].attention.self.value.lora_B["default"].weight[0, 0] = float("inf")
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="NaN/inf"):
        lora.merge(model, safe_merge=True)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # no layer was merged
    assert not any(layer.merged_adapters for layer in lora.lora_layers(model).values())


def test_unload_and_merge_and_unload_give_plain_models():
    base = tiny_llama()
    x = torch.randint(0, 128, (1, 6))
    model = lora.inject_lora(copy.deepcopy(base), "all-linear", r=2, lora_alpha=4)
    _randomise_b(model)
    expected = model(x).logits
    plain = lora.merge_and_unload(copy.deepcopy(model))
    assert not lora.lora_layers(plain) and isinstance(plain.model.layers[0].self_attn.q_proj, nn.Linear)
    torch.testing.assert_close(plain(x).logits, expected, **CLOSE)
    lora.merge(model)
    unloaded = lora.unload(model)  # unmerges first: the base model comes back
    assert not lora.lora_layers(unloaded)
    torch.testing.assert_close(unloaded(x).logits, base(x).logits, **CLOSE)


# ---------------------------------------------------------------------------------------------
# Several adapters
# ---------------------------------------------------------------------------------------------
def test_several_adapters_switch_disable_delete():
    model = tiny_bert()
    x = torch.randint(0, 128, (2, 8))
    base_out = model(x).last_hidden_state
    for seed, name in enumerate(["one", "two"]):
        lora.inject_lora(model, ["query", "value"], r=2, lora_alpha=4, adapter_name=name)
        _randomise_b(model, name, seed=seed + 1)
    lora.set_adapter(model, "one")
    out_one = model(x).last_hidden_state
    lora.set_adapter(model, "two")
    out_two = model(x).last_hidden_state
    assert not torch.allclose(out_one, out_two) and not torch.allclose(out_one, base_out)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".two." in n for n in trainable)  # only the active adapter trains
    with lora.disable_adapters(model):
        torch.testing.assert_close(model(x).last_hidden_state, base_out)
    lora.merge(model)
    with lora.disable_adapters(model):  # a merged adapter is taken out, as peft does
        torch.testing.assert_close(model(x).last_hidden_state, base_out, **CLOSE)
    lora.delete_adapter(model, "two")
    assert not [n for n, _ in model.named_parameters() if ".two." in n]
    lora.set_adapter(model, "one")
    torch.testing.assert_close(model(x).last_hidden_state, out_one)
    with pytest.raises(ValueError, match=r"unknown adapter 'two'; this model has \['one'\]"):
        lora.set_adapter(model, "two")


def test_two_active_adapters_add_their_updates():
    layer = lora.LoRALinear(nn.Linear(5, 3), r=2, lora_alpha=2, adapter_name="one")
    layer.add_adapter("two", r=1, lora_alpha=3)
    with torch.no_grad():
        for name in ("one", "two"):
            layer.lora_B[name].weight.normal_()
    layer.active_adapters = ["one", "two"]
    x = torch.randn(4, 5)
    w0, bias = layer.base_layer.weight, layer.base_layer.bias
    update = sum(layer.lora_B[n].weight @ layer.lora_A[n].weight * s for n, s in [("one", 1.0), ("two", 3.0)])
    torch.testing.assert_close(layer(x), x @ (w0 + update).T + bias, **CLOSE)


def _two_adapter_models(use_rslora=False, weights=(0.7, -0.3)):
    base = tiny_bert()
    targets = ["query", "value"]
    ours = lora.inject_lora(copy.deepcopy(base), targets, r=2, lora_alpha=4, adapter_name="one", use_rslora=use_rslora)
    lora.inject_lora(ours, targets, r=2, lora_alpha=8, adapter_name="two", use_rslora=use_rslora)
    _randomise_b(ours, "one", seed=1)
    _randomise_b(ours, "two", seed=2)
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=4, target_modules=targets,
                                                            use_rslora=use_rslora), adapter_name="one")
    theirs.add_adapter("two", LoraConfig(r=2, lora_alpha=8, target_modules=targets, use_rslora=use_rslora))
    peft_modules = _copy_into_peft(ours, theirs, ["one", "two"])
    for combo in ("cat", "linear"):
        lora_combine.add_weighted_adapter(ours, ["one", "two"], list(weights), combo, combination_type=combo)
        theirs.add_weighted_adapter(["one", "two"], list(weights), combo, combination_type=combo)
    return ours, theirs, peft_modules


def _delta(layer, name):
    """ΔW straight from the matrices: scaling · B @ A."""
    return layer.scaling[name] * layer.lora_B[name].weight @ layer.lora_A[name].weight


def test_exact_combination_is_the_weighted_sum_and_linear_is_not():
    """'cat' stacks the ranks, so B_new A_new = Σ w_i ΔW_i exactly. 'linear' mixes A and B
    separately, A_new = Σ ±sqrt(|w_i s_i|) A_i and B_new = Σ sqrt(|w_i s_i|) B_i, and their product
    (Σ c_i B_i)(Σ ±c_j A_j) holds cross terms c_i c_j B_i A_j (i ≠ j): not the weighted sum of the
    updates. Both give the same ΔW and the same output as peft's add_weighted_adapter."""
    weights = (0.7, -0.3)
    ours, theirs, peft_modules = _two_adapter_models(weights=weights)
    for name, layer in lora.lora_layers(ours).items():
        expected = sum(w * _delta(layer, a) for a, w in zip(["one", "two"], weights))
        torch.testing.assert_close(_delta(layer, "cat"), expected, rtol=1e-5, atol=1e-7)
        assert (_delta(layer, "linear") - expected).abs().max() > 1e-3
        for combo in ("cat", "linear"):
            torch.testing.assert_close(_delta(layer, combo), _delta(peft_modules[name], combo), rtol=1e-5, atol=1e-7)
    x = torch.randint(0, 128, (2, 8))
    for combo in ("cat", "linear"):
        lora.set_adapter(ours, combo)
        theirs.set_adapter(combo)
        torch.testing.assert_close(ours(x).last_hidden_state, theirs(x).last_hidden_state, **CLOSE)


def test_rslora_blend_is_exact_here_while_peft_scales_it_by_sqrt_rank():
    """peft 0.21 builds the blend with lora_alpha = r_new and keeps use_rslora from the first
    adapter, so its scaling is r_new / sqrt(r_new) = sqrt(r_new): with rsLoRA its 'cat' blend is
    sqrt(r_new) · Σ w_i ΔW_i. Ours keeps scaling 1, so 'cat' stays Σ w_i ΔW_i."""
    weights = (0.5, 0.5)
    ours, _, peft_modules = _two_adapter_models(use_rslora=True, weights=weights)
    for name, layer in lora.lora_layers(ours).items():
        expected = sum(w * _delta(layer, a) for a, w in zip(["one", "two"], weights))
        torch.testing.assert_close(_delta(layer, "cat"), expected, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(_delta(peft_modules[name], "cat"), 4 ** 0.5 * expected, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Save / load in peft's layout
# ---------------------------------------------------------------------------------------------
def test_adapter_round_trips_with_peft(tmp_path):
    base = tiny_llama()
    x = torch.randint(0, 128, (2, 7))
    ours = lora.inject_lora(copy.deepcopy(base), ["q_proj", "v_proj"], r=4, lora_alpha=8, use_rslora=True)
    _randomise_b(ours)
    lora_io.save_adapter(ours, tmp_path / "ours", task_type="CAUSAL_LM")
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == ["adapter_config.json",
                                                                    "adapter_model.safetensors"]
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    assert loaded.peft_config["default"].use_rslora
    torch.testing.assert_close(loaded(x).logits, ours(x).logits, **CLOSE)

    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_B" in n:
                p.normal_()
    theirs.save_pretrained(tmp_path / "peft")
    back = lora_io.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(back(x).logits, theirs(x).logits, **CLOSE)


def test_per_layer_ranks_travel_as_peft_rank_and_alpha_patterns(tmp_path):
    base = tiny_llama()
    x = torch.randint(0, 128, (2, 7))
    ours = lora.inject_lora(copy.deepcopy(base), ["q_proj"], r=4, lora_alpha=8)
    lora.inject_lora(ours, r"model\.layers\.1\.self_attn\.v_proj", r=2, lora_alpha=16)  # same name, other layer
    _randomise_b(ours)
    lora_io.save_adapter(ours, tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    peft_layers = {n.removeprefix("base_model.model."): m for n, m in loaded.named_modules() if hasattr(m, "lora_A")}
    assert set(peft_layers) == set(lora.lora_layers(ours))
    torch.testing.assert_close(loaded(x).logits, ours(x).logits, **CLOSE)
    again = lora_io.load_adapter(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(again(x).logits, ours(x).logits, **CLOSE)


def test_real_minilm_adapter_round_trips_with_peft(minilm, tmp_path):
    base, tokenizer = minilm
    batch = tokenizer(["Parse a JSON document."], return_tensors="pt")
    ours = lora.inject_lora(copy.deepcopy(base), ["query", "value"], r=8, lora_alpha=16)
    _randomise_b(ours)
    lora_io.save_adapter(ours, tmp_path / "ours", task_type="FEATURE_EXTRACTION")
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(theirs(**batch).last_hidden_state, ours(**batch).last_hidden_state, **CLOSE)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_B" in n:
                p.mul_(-2.0)  # a different adapter, now saved by peft
    theirs.save_pretrained(tmp_path / "peft")
    del ours
    back = lora_io.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(back(**batch).last_hidden_state, theirs(**batch).last_hidden_state, **CLOSE)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, error, match", [
    ({"r": 0}, ValueError, "r must be a positive integer"),
    ({"r": 33}, ValueError, r"r=33 exceeds min\(in_features, out_features\) = 32.*smaller r"),
    ({"lora_alpha": 0}, ValueError, "lora_alpha must be a positive number"),
    ({"lora_dropout": 1.0}, ValueError, r"lora_dropout must be a number in \[0, 1\)"),
    ({"target_modules": ["nothing_like_this"]}, ValueError,
     r"matches no module.*encoder\.layer\.0\.attention\.self\.query.*'key', 'query', 'value'"),
    ({"target_modules": "query"}, ValueError, "matches no module"),  # a string is a regex on the full name
    ({"target_modules": ["LayerNorm"]}, TypeError, r"not linear layers.*LayerNorm"),
    ({"target_modules": 3}, TypeError, "list of module names, a regex string or 'all-linear'"),
    ({"adapter_name": "my.adapter"}, ValueError, "without '.'"),
])
def test_bad_input_is_refused_clearly(kwargs, error, match):
    model = tiny_bert()
    args = {"target_modules": ["query"], "r": 4, "lora_alpha": 8, **kwargs}
    with pytest.raises(error, match=match):
        lora.inject_lora(model, **args)
    assert not lora.lora_layers(model)  # nothing changed


def test_adapter_for_another_model_is_refused(tmp_path):
    ours = lora.inject_lora(tiny_llama(), ["q_proj"], r=4, lora_alpha=8)
    lora_io.save_adapter(ours, tmp_path)
    with pytest.raises(ValueError, match=r"names module 'model\.layers\.0\.self_attn\.q_proj'.*another base model"):
        lora_io.load_adapter(tiny_bert(), tmp_path)
    from transformers import LlamaConfig, LlamaForCausalLM

    wider = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=8, num_key_value_heads=2, head_dim=8))
    with pytest.raises(ValueError, match=r"q_proj\.lora_A: the adapter has shape \(4, 48\), this model needs \(4, 64\)"):
        lora_io.load_adapter(wider, tmp_path)
    assert not lora.lora_layers(wider)  # checked before anything changed
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(ValueError, match="'IA3' adapter, not 'LORA'"):
        lora_io.load_adapter(tiny_llama(), tmp_path)


def test_other_misuse_is_refused_clearly():
    model = lora.inject_lora(tiny_bert(), ["query"], r=2, lora_alpha=4)
    with pytest.raises(ValueError, match=r"unknown adapter 'nope'; this model has \['default'\]"):
        lora.set_adapter(model, "nope")
    with pytest.raises(ValueError, match="already has an adapter 'default'"):
        lora.inject_lora(model, ["query"], r=2, lora_alpha=4)
    lora.inject_lora(model, ["query"], r=3, lora_alpha=4, adapter_name="three")
    with pytest.raises(ValueError, match="'linear' needs adapters of equal rank.*use 'cat'"):
        lora_combine.add_weighted_adapter(model, ["default", "three"], [0.5, 0.5], "mix", combination_type="linear")
    with pytest.raises(ValueError, match="one weight per adapter"):
        lora_combine.add_weighted_adapter(model, ["default", "three"], [1.0], "mix")
    with pytest.raises(ValueError, match="combination_type must be 'cat'"):
        lora_combine.add_weighted_adapter(model, ["default", "three"], [0.5, 0.5], "mix", combination_type="svd")
    lora.inject_lora(model, ["query"], r=30, lora_alpha=4, adapter_name="thirty")
    with pytest.raises(ValueError, match=r"'cat' of ranks \[3, 30\] gives rank 33 > min\(in_features, out_features\) = 32"):
        lora_combine.add_weighted_adapter(model, ["three", "thirty"], [0.5, 0.5], "mix")
    with pytest.raises(ValueError, match=r"unknown adapter 'mix'"):  # nothing was added
        lora.set_adapter(model, "mix")


def test_public_view_of_a_models_adapters():
    """What `course_lib.export` reads: adapter names, and per layer the active and merged ones."""
    model = tiny_bert()
    assert "encoder.layer.0.attention.self.query" in lora.linear_layers(model)
    assert lora.matches("encoder.layer.0.attention.self.query", ["query"])
    assert not lora.matches("encoder.layer.0.attention.self.query", "query")  # a regex must match it all
    lora.inject_lora(model, ["query"], r=2, lora_alpha=4, adapter_name="a")
    lora.inject_adapter(model, {"encoder.layer.0.attention.self.query": (3, 6, 0.0, False)}, "b")
    assert lora.adapter_names(model) == ["a", "b"]
    state = lora.adapter_state(model)
    assert state["encoder.layer.0.attention.self.query"] == {"adapters": ["a", "b"], "active": ["b"], "merged": []}
    assert state["encoder.layer.1.attention.self.query"] == {"adapters": ["a"], "active": [], "merged": []}
    lora.set_adapter(model, "a")
    lora.merge(model)
    assert all(s["merged"] == ["a"] for s in lora.adapter_state(model).values())
    with pytest.raises(ValueError, match="name no linear layer"):
        lora.inject_adapter(model, {"encoder.layer.0.attention.self": (2, 4, 0.0, False)}, "c")
    assert lora.adapter_names(model) == ["a", "b"]
