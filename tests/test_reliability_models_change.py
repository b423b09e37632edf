"""A failing call leaves the model as it was (DESIGN.md, "nothing half-done"), and bad input fails loudly.

Each test puts a fault where the original code had already changed part of the model when it
noticed (a NaN in the *last* layer, a typo among good adapter names), then checks that the
model's module types, every weight and buffer, every ``requires_grad`` and the adapters' state
are exactly what they were before the call.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from course_lib import linear4bit, lora, lora_combine, qlora, quant, surgery
from course_lib.models import tiny_bert, tiny_llama

LAST_LLAMA_DOWN = "model.layers.1.mlp.down_proj"
LAST_BERT_QUERY = "encoder.layer.1.attention.self.query"


def snapshot(model: nn.Module) -> dict:
    """Everything a failed call must leave alone: module types, tensors, requires_grad, adapters."""
    return {
        "types": {name: type(m) for name, m in model.named_modules()},
        "tensors": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "adapters": lora.adapter_state(model),
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["types"] == before["types"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["adapters"] == before["adapters"]
    assert after["tensors"].keys() == before["tensors"].keys()
    for key, tensor in before["tensors"].items():
        assert after["tensors"][key].dtype == tensor.dtype, key
        assert torch.equal(after["tensors"][key].isnan(), tensor.isnan()), key
        assert torch.equal(after["tensors"][key].nan_to_num(), tensor.nan_to_num()), key


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def _randomise_B(model, std=0.02, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def _bert_with_adapter(**kwargs):
    model = lora.inject_lora(tiny_bert(), ["query", "value"], r=2, lora_alpha=4, **kwargs)
    _randomise_B(model)
    return model


# ---------------------------------------------------------------------------------------------
# Defect 4: quantizing a model with a NaN in a later layer
# ---------------------------------------------------------------------------------------------
def _llama_with_nan_in_last_layer():
    model = tiny_llama()
    with torch.no_grad():
        model.get_submodule(LAST_LLAMA_DOWN).weight[0, 0] = float("nan")
    return model


def test_quantize_model_with_nan_in_a_later_layer_leaves_the_model_unchanged():
    model = _llama_with_nan_in_last_layer()
    before = snapshot(model)
    with pytest.raises(ValueError) as error:
        linear4bit.quantize_model(model)
    assert_unchanged(model, before)
    assert LAST_LLAMA_DOWN in one_line(error) and "NaN" in one_line(error)


def test_prepare_model_for_qlora_with_nan_in_a_later_layer_leaves_the_model_unchanged():
    model = _llama_with_nan_in_last_layer().half()
    model.model.norm.weight.requires_grad_(True)
    before = snapshot(model)
    with pytest.raises(ValueError, match="NaN"):
        qlora.prepare_model_for_qlora(model)
    assert_unchanged(model, before)  # not quantized, not frozen, not cast to float32


def test_prepare_model_for_qlora_refuses_gradient_checkpointing_before_quantizing():
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    before = snapshot(model)
    with pytest.raises(ValueError, match="gradient checkpointing needs a transformers model") as error:
        qlora.prepare_model_for_qlora(model, skip=(), gradient_checkpointing=True)
    one_line(error)
    assert_unchanged(model, before)


# ---------------------------------------------------------------------------------------------
# Defect 5: merge and re-quantize with a NaN in the last layer's adapter
# ---------------------------------------------------------------------------------------------
def _qlora_llama():
    model = tiny_llama()
    qlora.prepare_model_for_qlora(model)
    lora.inject_lora(model, ["q_proj", "v_proj"], r=2, lora_alpha=4)
    _randomise_B(model)
    return model


@pytest.mark.parametrize("fault", ["nan", "inf", "no active adapter"])
def test_merge_and_requantize_fault_in_the_last_layer_leaves_the_model_unchanged(fault):
    model = _qlora_llama()
    last = lora.lora_layers(model)["model.layers.1.self_attn.v_proj"]
    with torch.no_grad():
        if fault == "no active adapter":
            last.active_adapters = []
        else:
            last.lora_B["default"].weight[0, 0] = float(fault)
    before = snapshot(model)
    with pytest.raises(ValueError) as error:
        qlora.merge_and_requantize(model)
    assert_unchanged(model, before)
    assert "model.layers.1.self_attn.v_proj" in one_line(error)


def test_merge_and_requantize_still_merges_every_layer():
    model = _qlora_llama()
    report = qlora.merge_and_requantize(model)
    assert report["layers"] == 4 and not lora.lora_layers(model)
    assert sum(isinstance(m, linear4bit.Linear4bit) for m in model.modules()) == 14


# ---------------------------------------------------------------------------------------------
# Defect 7: quantize_blockwise(layer.weight) on a parameter that requires grad
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_quantize_blockwise_of_a_parameter_round_trips(quant_type, double_quant):
    layer = nn.Linear(100, 48)  # 4800 values: a ragged last block at blocksize 64
    assert layer.weight.requires_grad
    state = quant.quantize_blockwise(layer.weight, quant_type, 64, double_quant)
    reference = quant.quantize_blockwise(layer.weight.detach(), quant_type, 64, double_quant)
    stored = (state.packed, state.absmax, state.absmax_offset, state.absmax_absmax)
    assert not any(t.requires_grad for t in stored if t is not None)
    restored = quant.dequantize_blockwise(state)
    assert not restored.requires_grad
    assert torch.equal(restored, quant.dequantize_blockwise(reference))
    assert (restored - layer.weight.detach()).abs().max() < 0.02


@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantize_blockwise_of_a_state_holding_tensors_that_require_grad(double_quant):
    """A `QuantState` built by hand (or by older code) from tensors that require grad still dequantizes."""
    weight = torch.randn(48, 100)
    reference = quant.quantize_blockwise(weight, "nf4", 64, double_quant)
    state = quant.quantize_blockwise(weight, "nf4", 64, double_quant)
    if not double_quant:
        state.absmax = state.absmax.clone().requires_grad_(True)
    else:
        state.absmax_offset = state.absmax_offset.clone().requires_grad_(True)
        state.absmax_absmax = state.absmax_absmax.clone().requires_grad_(True)
    assert torch.equal(quant.dequantize_blockwise(state), quant.dequantize_blockwise(reference))


# ---------------------------------------------------------------------------------------------
# Defect 8: adapter names that do not exist (or repeat)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("names", [["typo"], ["default", "typo"]])
def test_merge_with_an_unknown_adapter_name_raises_and_merges_nothing(names):
    model = _bert_with_adapter()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"unknown adapter 'typo'.*\['default'\]") as error:
        lora.merge(model, adapter_names=names)
    one_line(error)
    assert_unchanged(model, before)


def test_merge_adapter_names_must_be_a_list():
    model = _bert_with_adapter()
    before = snapshot(model)
    with pytest.raises(TypeError, match=r"adapter_names must be a list.*\['default'\]"):
        lora.merge(model, adapter_names="default")
    assert_unchanged(model, before)


def test_merge_refuses_a_repeated_adapter_name():
    model = _bert_with_adapter()
    before = snapshot(model)
    with pytest.raises(ValueError, match="'default' twice"):
        lora.merge(model, adapter_names=["default", "default"])  # would add its update twice
    with pytest.raises(ValueError, match="'default' twice"):
        lora.lora_layers(model)[LAST_BERT_QUERY].merge(["default", "default"])
    assert_unchanged(model, before)


def test_set_adapter_refuses_a_repeated_adapter_name():
    model = _bert_with_adapter()
    before = snapshot(model)
    with pytest.raises(ValueError, match="'default' twice"):
        lora.set_adapter(model, ["default", "default"])  # the layer would add the adapter's output twice
    assert_unchanged(model, before)


@pytest.mark.parametrize("call", [
    lambda m: lora.set_adapter(m, "typo"),
    lambda m: lora.set_adapter(m, ["default", "typo"]),
    lambda m: lora.delete_adapter(m, "typo"),
    lambda m: lora_combine.add_weighted_adapter(m, ["default", "typo"], [0.5, 0.5], "mix"),
], ids=["set_adapter", "set_adapter-list", "delete_adapter", "add_weighted_adapter"])
def test_other_functions_taking_adapter_names_refuse_unknown_ones(call):
    model = _bert_with_adapter()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"unknown adapter 'typo'.*\['default'\]"):
        call(model)
    assert_unchanged(model, before)


def test_delete_adapter_merged_in_a_later_layer_deletes_it_nowhere():
    model = _bert_with_adapter()
    lora.lora_layers(model)[LAST_BERT_QUERY].merge()
    before = snapshot(model)
    with pytest.raises(ValueError) as error:
        lora.delete_adapter(model, "default")
    assert_unchanged(model, before)
    assert LAST_BERT_QUERY in one_line(error) and "unmerge" in one_line(error)


# ---------------------------------------------------------------------------------------------
# Defect 9: non-finite hyperparameters, weights and adapter updates
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("argument", ["r", "lora_alpha", "lora_dropout"])
def test_non_finite_hyperparameters_are_refused(argument, bad):
    model = tiny_bert()
    before = snapshot(model)
    with pytest.raises(ValueError, match=argument) as error:
        lora.inject_lora(model, ["query"], **{argument: bad})
    one_line(error)
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match=argument):
        lora.LoRALinear(nn.Linear(8, 8), **{"r": 2, argument: bad})


def test_use_rslora_must_be_a_bool():
    model = tiny_bert()
    before = snapshot(model)
    with pytest.raises(TypeError, match="use_rslora must be True or False"):
        lora.inject_lora(model, ["query"], use_rslora="no")  # a non-empty string is truthy
    assert_unchanged(model, before)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "0.5", True])
def test_add_weighted_adapter_refuses_weights_that_are_not_finite_numbers(bad):
    model = _bert_with_adapter()
    lora.inject_lora(model, ["query", "value"], r=2, lora_alpha=4, adapter_name="other")
    before = snapshot(model)
    with pytest.raises(ValueError, match="weights must be finite numbers") as error:
        lora_combine.add_weighted_adapter(model, ["default", "other"], [0.5, bad], "mix")
    one_line(error)
    assert_unchanged(model, before)


def _nan_in_last_adapter(model, value=float("nan")):
    with torch.no_grad():
        lora.lora_layers(model)[LAST_BERT_QUERY].lora_B["default"].weight[0, 0] = value
    return model


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("safe_merge", [False, True])
@pytest.mark.parametrize("how", ["merge", "merge_and_unload"])
def test_merging_a_non_finite_adapter_is_refused_before_any_weight_changes(how, safe_merge, value):
    model = _nan_in_last_adapter(_bert_with_adapter(), value)
    before = snapshot(model)
    with pytest.raises(ValueError) as error:
        getattr(lora, how)(model, safe_merge=safe_merge)
    assert_unchanged(model, before)
    assert f"{LAST_BERT_QUERY}: adapter(s) ['default']" in one_line(error) and "NaN/inf" in one_line(error)


@pytest.mark.parametrize("safe_merge", [False, True])
def test_merging_a_non_finite_adapter_into_one_layer_is_refused(safe_merge):
    model = _nan_in_last_adapter(_bert_with_adapter())
    before = snapshot(model)
    with pytest.raises(ValueError, match="NaN/inf"):
        lora.lora_layers(model)[LAST_BERT_QUERY].merge(safe_merge=safe_merge)
    assert_unchanged(model, before)


def test_merge_refuses_an_update_that_overflows_the_base_dtype():
    """A float32 update too large for a float16 base would become inf when cast."""
    layer = lora.LoRALinear(nn.Linear(8, 8).half(), r=2, lora_alpha=2)
    with torch.no_grad():
        layer.lora_A["default"].weight.fill_(300.0)
        layer.lora_B["default"].weight.fill_(300.0)  # ΔW = 2 · 300 · 300 = 180000 > float16's 65504
    weight = layer.base_layer.weight.clone()
    with pytest.raises(ValueError, match="NaN/inf"):
        layer.merge()
    assert torch.equal(layer.base_layer.weight, weight) and layer.merged_adapters == []


def test_a_finite_merge_still_works_and_matches_the_unmerged_output():
    model = _bert_with_adapter()
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        expected = model(input_ids=ids).last_hidden_state
        lora.merge_and_unload(model)
        merged = model(input_ids=ids).last_hidden_state
    assert not lora.lora_layers(model)
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Defect 15 (part): a target_modules string that is not a regular expression
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pattern", ["[", "(query", "*query"])
def test_invalid_regex_target_modules_is_a_one_line_value_error(pattern):
    model = tiny_bert()
    before = snapshot(model)
    with pytest.raises(ValueError, match="not a valid regular expression") as error:
        lora.inject_lora(model, pattern)
    message = one_line(error)
    assert "list of module names" in message and "regex" in message
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match="not a valid regular expression"):
        lora.matches("encoder.layer.0.attention.self.query", pattern)


# ---------------------------------------------------------------------------------------------
# The promise "everything is checked before the model changes", function by function
# ---------------------------------------------------------------------------------------------
def test_inject_adapter_with_no_layers_changes_nothing():
    model = tiny_bert()
    before = snapshot(model)
    with pytest.raises(ValueError, match="no layer") as error:
        lora.inject_adapter(model, {}, "a")
    one_line(error)
    assert_unchanged(model, before)  # the original froze every parameter, then failed


def test_replace_modules_checks_every_name_before_replacing_any():
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4)))
    before = snapshot(model)
    with pytest.raises(ValueError, match="no submodule '1.5'"):
        surgery.replace_modules(model, {"0": nn.Identity(), "1.5": nn.Identity()})
    assert_unchanged(model, before)
    old = surgery.replace_modules(model, {"0": nn.Identity(), "1.0": nn.Identity()})
    assert [type(m) for m in old.values()] == [nn.Linear, nn.Linear]
    assert isinstance(model[0], nn.Identity) and isinstance(model[1][0], nn.Identity)
