"""course_lib.qlora and LoRA over 4-bit layers, against transformers + bitsandbytes + peft and against math.

References from outside our code: a SmolLM2 loaded by transformers with ``BitsAndBytesConfig`` and
wrapped by peft after ``prepare_model_for_kbit_training`` (the production QLoRA); bitsandbytes'
documented 8-bit optimizer layout (one byte per moment for tensors of at least 4096 values,
32-bit state below); and plain float arithmetic for the merge paths.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings

import pytest
import torch
from torch import nn

from course_lib import linear4bit, lora, memory, qlora
from course_lib.models import tiny_llama

bnb = pytest.importorskip("bitsandbytes")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def _randomise_B(model, std=0.02, seed=0):
    """Give every LoRA B a non-zero value so adapters change the output (B starts at zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


@pytest.fixture(scope="module")
def qlora_pair(smollm2):
    """(ours, peft's, tokenizer): SmolLM2 as NF4+double-quant with LoRA r=8 on q,v, same A and B."""
    from transformers import BitsAndBytesConfig

    from course_lib.models import load_smollm2

    warnings.filterwarnings("ignore", category=FutureWarning)
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    theirs, tokenizer = load_smollm2("cpu", quantization_config=config)
    theirs = prepare_model_for_kbit_training(theirs, use_gradient_checkpointing=False)
    theirs = get_peft_model(theirs, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                               lora_dropout=0.0))
    _randomise_B(theirs)
    ours = copy.deepcopy(smollm2[0])
    qlora.prepare_model_for_qlora(ours)
    lora.inject_lora(ours, target_modules=["q_proj", "v_proj"], r=8, lora_alpha=16)
    peft_lora = {k.replace("base_model.model.", "").replace(".default", ""): v
                 for k, v in theirs.state_dict().items() if "lora_" in k}
    ours_lora = {k.replace(".default", ""): v for k, v in ours.state_dict().items() if "lora_" in k}
    assert peft_lora.keys() == ours_lora.keys() and len(ours_lora) == 30 * 2 * 2
    with torch.no_grad():
        for key, value in ours_lora.items():
            value.copy_(peft_lora[key])
    return ours, theirs, tokenizer


def test_qlora_on_smollm2_matches_bitsandbytes_and_peft(qlora_pair):
    ours, theirs, tokenizer = qlora_pair
    batch = tokenizer(["def add(a, b): return a + b", "Return the name of the function that sorts"],
                      return_tensors="pt", padding=True)
    # same 4-bit layers, same bytes: bitsandbytes' quantize_4bit and ours agree bit for bit
    ours_4bit = {n: m for n, m in ours.named_modules() if isinstance(m, linear4bit.Linear4bit)}
    theirs_4bit = {n.replace("base_model.model.", ""): m for n, m in theirs.named_modules()
                   if isinstance(m, bnb.nn.Linear4bit)}
    assert ours_4bit.keys() == theirs_4bit.keys() and len(ours_4bit) == 30 * 7
    layer = "model.layers.3.mlp.down_proj"
    assert torch.equal(ours_4bit[layer].weight.view(-1), theirs_4bit[layer].weight.data.view(-1))

    losses = []
    for model in (ours, theirs):
        # training mode, as in QLoRA training: in eval mode, on a CPU with AVX512-BF16, bitsandbytes
        # repacks the 4-bit weights for its inference kernel with bfloat16 block scales (lossy, ~1e-3)
        model.train()
        model.zero_grad(set_to_none=True)
        out = model(**batch, labels=batch["input_ids"])
        out.loss.backward()
        losses.append((out.logits.detach(), out.loss.item()))
    torch.testing.assert_close(losses[0][0], losses[1][0], rtol=1e-4, atol=1e-4)
    assert abs(losses[0][1] - losses[1][1]) < 1e-5 * abs(losses[1][1]) + 1e-6

    ours_grads = {n.replace(".default", ""): p.grad for n, p in ours.named_parameters() if p.requires_grad}
    theirs_grads = {n.replace("base_model.model.", "").replace(".default", ""): p.grad
                    for n, p in theirs.named_parameters() if p.requires_grad}
    assert ours_grads.keys() == theirs_grads.keys()
    for name, grad in ours_grads.items():
        torch.testing.assert_close(grad, theirs_grads[name], rtol=1e-3, atol=1e-6, msg=name)


def test_qlora_trains_only_the_adapters(qlora_pair):
    ours = qlora_pair[0]
    trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # the frozen 4-bit storage is uint8 buffers, not parameters: nothing there can be trained
    assert all(not isinstance(m.weight, nn.Parameter) for m in ours.modules() if isinstance(m, linear4bit.Linear4bit))


def test_prepare_model_for_qlora_report_and_freeze():
    model = tiny_llama()
    report = qlora.prepare_model_for_qlora(model, blocksize=64)
    assert not any(p.requires_grad for p in model.parameters())
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [type(m) for m in linear] == [nn.Linear] and model.lm_head in linear  # only the tied output layer left
    assert report["layers_replaced"] == 2 * 7
    # the paper's accounting, layer by layer: 4 bits per weight, 8 bits per block of 64, one float32
    # per 256 blocks (a whole one even for a small layer) and the float32 mean subtracted first
    sizes = [m.in_features * m.out_features for m in model.modules() if isinstance(m, linear4bit.Linear4bit)]
    bits = sum(4 * n + 8 * math.ceil(n / 64) + 32 * math.ceil(n / 64 / 256) + 32 for n in sizes)
    assert report["bits_per_parameter"] == pytest.approx(bits / sum(sizes), rel=1e-12)
    with pytest.raises(ValueError, match="prepare .* first"):
        qlora.prepare_model_for_qlora(lora.inject_lora(tiny_llama(), ["q_proj"], r=2))


def test_prepare_model_for_qlora_casts_half_precision_to_float32():
    model = tiny_llama().to(torch.bfloat16)
    qlora.prepare_model_for_qlora(model)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (2, 10))
    grads = []
    for checkpointing in (False, True):
        model = tiny_llama()
        qlora.prepare_model_for_qlora(model, gradient_checkpointing=checkpointing)
        assert getattr(model, "is_activation_checkpointing", None) is checkpointing
        lora.inject_lora(model, ["q_proj", "v_proj"], r=4, lora_alpha=8)
        _randomise_B(model)
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Deployment: merging into a 4-bit base
# ---------------------------------------------------------------------------------------------
def _trained_tiny_qlora(std):
    model = tiny_llama()
    qlora.prepare_model_for_qlora(model)
    lora.inject_lora(model, "all-linear", r=4, lora_alpha=8)
    _randomise_B(model, std=std)
    return model


def test_merging_into_a_4bit_base_is_refused_with_the_alternatives():
    model = _trained_tiny_qlora(0.02)
    with pytest.raises(TypeError, match="dequantize_model"):
        lora.merge(model)
    with pytest.raises(TypeError, match="merge_and_requantize"):
        lora.merge_and_unload(model)
    assert not any(layer.merged_adapters for layer in lora.lora_layers(model).values())  # left unchanged


def test_dequantize_then_merge_is_exact():
    model = _trained_tiny_qlora(0.02)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        runtime = model(input_ids=ids).logits
    expected = {n: m.base_layer.dequantize(torch.float32) + m.delta_weight("default")
                for n, m in lora.lora_layers(model).items()}
    merged = lora.merge_and_unload(qlora.dequantize_model(model))
    assert not lora.lora_layers(merged) and not any(isinstance(m, linear4bit.Linear4bit) for m in merged.modules())
    for name, weight in expected.items():
        torch.testing.assert_close(merged.get_submodule(name).weight, weight, rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, runtime, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("std, lost", [(1e-4, True), (0.5, False)])
def test_merge_and_requantize_loses_small_updates(std, lost):
    """Re-quantizing rounds each weight to the nearest of 16 levels (gaps of ~0.1 x absmax):
    an update far smaller than a gap is mostly lost, a large one mostly survives."""
    model = _trained_tiny_qlora(std)
    bases = {n: m.base_layer for n, m in lora.lora_layers(model).items()}
    deltas = {n: m.delta_weight("default") for n, m in lora.lora_layers(model).items()}
    report = qlora.merge_and_requantize(model)
    assert report["layers"] == len(bases) == 2 * 7 and not lora.lora_layers(model)
    # what the function reports is what the model now holds
    err2 = d2 = 0.0
    for name, old in bases.items():
        new = model.get_submodule(name)
        assert isinstance(new, linear4bit.Linear4bit) and new.quant_type == old.quant_type
        kept = new.dequantize(torch.float32) - old.dequantize(torch.float32)
        err2 += (kept - deltas[name]).pow(2).sum().item()
        d2 += deltas[name].pow(2).sum().item()
    assert report["update_error"] == pytest.approx((err2 / d2) ** 0.5, rel=1e-4)
    if lost:
        assert report["update_error"] > 0.5 and report["codes_changed"] < 0.05
    else:
        assert report["update_error"] < 0.3 and report["update_kept"] > 0.8


def test_merge_and_requantize_needs_4bit_lora_layers():
    with pytest.raises(ValueError, match="no LoRA layer over a Linear4bit"):
        qlora.merge_and_requantize(lora.inject_lora(tiny_llama(), ["q_proj"], r=2))
    with pytest.raises(TypeError, match="floating-point"):
        qlora.dequantize_model(tiny_llama(), dtype=torch.int8)


# ---------------------------------------------------------------------------------------------
# Optimizer memory: bitsandbytes' 8-bit AdamW and paged AdamW, counted from their state tensors
# ---------------------------------------------------------------------------------------------
def test_adamw8bit_state_is_one_byte_per_moment_above_4096_values():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(576, 64, bias=False), nn.Linear(64, 576, bias=False), nn.Linear(576, 4))
    sizes = [p.numel() for p in model.parameters()]  # 36864, 36864, 2304, 4
    states = {}
    for name, cls in [("adamw", torch.optim.AdamW), ("adamw8bit", bnb.optim.AdamW8bit),
                      ("paged", bnb.optim.PagedAdamW)]:
        m = copy.deepcopy(model)
        opt = cls(m.parameters(), lr=1e-3)
        m(torch.randn(8, 576)).sum().backward()
        opt.step()
        states[name] = memory.optimizer_state_bytes(opt)
    assert states["adamw"] == 8 * sum(sizes)
    assert states["paged"] == 8 * sum(sizes)  # paging moves the state, it does not shrink it
    # bitsandbytes' rule (min_8bit_size=4096): one byte per moment for big tensors, float32 below,
    # plus per-tensor code tables and one absmax per 256-value block for the 8-bit ones
    big, small = [n for n in sizes if n >= 4096], [n for n in sizes if n < 4096]
    payload = 2 * sum(big) + 8 * sum(small)
    assert payload <= states["adamw8bit"] <= payload + sum(2 * 256 * 4 + 2 * 4 * (n // 256 + 1) for n in big)
