"""course_lib.quant against bitsandbytes (codes, absmax, dequantized values, Linear4bit) and against math.

Reference facts come from outside our code: bitsandbytes' tables and kernels, scipy's normal
quantiles, the QLoRA paper's bit counts, and autograd on a plain float layer.

Note on bitsandbytes 0.50 on CPUs with AVX-512: its C++ ``dequantize_4bit`` indexes ``absmax`` by
row, which is wrong when a row is not a whole number of blocks (e.g. SmolLM2's 576-wide layers at
blocksize 128). Its quantized codes are right, so the reference dequantization here is bitsandbytes'
own, of the same codes viewed as one flat row (``_bnb_reference``), where rows and blocks agree.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from course_lib import linear4bit, quant
from course_lib.models import tiny_llama

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bnbF

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="no CUDA device"))]


def _bnb_reference(x: torch.Tensor, quant_type: str, blocksize: int, double_quant: bool):
    """bitsandbytes' packed codes, its QuantState and its dequantization (of the flat view, see above)."""
    packed, state = bnbF.quantize_4bit(x.reshape(-1), blocksize=blocksize, quant_type=quant_type,
                                       compress_statistics=double_quant)
    return packed.view(-1), state, bnbF.dequantize_4bit(packed, state).view(x.shape)


def _assert_matches_bnb(x, quant_type, blocksize, double_quant):
    packed, state, dequantized = _bnb_reference(x, quant_type, blocksize, double_quant)
    ours = quant.quantize_blockwise(x, quant_type, blocksize, double_quant)
    assert torch.equal(ours.packed, packed), f"{(ours.packed != packed).sum()} of {packed.numel()} bytes differ"
    assert torch.equal(ours.absmax, state.absmax)
    if double_quant:
        assert torch.equal(ours.absmax_offset, state.offset)
        assert torch.equal(ours.absmax_absmax, state.state2.absmax)
        assert state.state2.blocksize == quant.ABSMAX_BLOCKSIZE
    assert torch.equal(quant.dequantize_blockwise(ours), dequantized)


# ---------------------------------------------------------------------------------------------
# Codebooks
# ---------------------------------------------------------------------------------------------
def test_nf4_codebook_equals_bitsandbytes_table():
    ours, theirs = quant.nf4_codebook(), bnbF.get_4bit_type("nf4", device="cpu")
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert torch.equal(ours, theirs)  # bit for bit, so the rounding midpoints agree too
    exact_offset = 1 - (1 / 30 + 1 / 32) / 2  # the QLoRA paper's value, unrounded
    torch.testing.assert_close(quant.nf4_codebook(exact_offset), theirs, rtol=0, atol=1e-6)


def test_nf4_codebook_are_normal_quantiles():
    from scipy.stats import norm

    offset = quant.NF4_OFFSET
    positive = norm.ppf([offset - k * (offset - 0.5) / 8 for k in range(8)])
    negative = -norm.ppf([offset - k * (offset - 0.5) / 7 for k in range(7)])
    expected = sorted([*positive, *negative, 0.0])
    expected = torch.tensor(expected, dtype=torch.float64) / max(expected)
    torch.testing.assert_close(quant.nf4_codebook().double(), expected, rtol=0, atol=1e-6)
    assert quant.nf4_codebook()[7] == 0 and quant.nf4_codebook()[[0, -1]].tolist() == [-1.0, 1.0]


def test_fp4_codebook_equals_bitsandbytes_table():
    assert torch.equal(quant.fp4_codebook(), bnbF.get_4bit_type("fp4", device="cpu"))


def test_dynamic_codebook_equals_bitsandbytes_map():
    assert torch.equal(quant.dynamic_codebook(), bnbF.create_dynamic_map())


def test_int_codebooks_are_symmetric_linear_levels():
    assert sorted(set((quant.int4_codebook() * 7).round().tolist())) == list(range(-7, 8))
    assert sorted(set((quant.int8_codebook()[:255] * 127).round().tolist())) == list(range(-127, 128))


# ---------------------------------------------------------------------------------------------
# Bit-exact agreement with bitsandbytes.functional.quantize_4bit / dequantize_4bit
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double_quant"])
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", [(512, 384), (37, 51)], ids=["whole_blocks", "ragged_odd"])
def test_random_tensor_matches_bitsandbytes(shape, quant_type, blocksize, double_quant):
    torch.manual_seed(0)
    _assert_matches_bnb(torch.randn(shape) * 0.02, quant_type, blocksize, double_quant)


def test_large_tensor_matches_bitsandbytes():
    """131072 blocks: torch sums the absmax mean (the double-quant offset) in parallel, which rounds
    differently from a serial sum; ours must use the same thread count as bitsandbytes."""
    torch.manual_seed(0)
    _assert_matches_bnb(torch.randn(2048, 4096), "nf4", 64, True)


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double_quant"])
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("layer", ["self_attn.q_proj", "mlp.down_proj"])
def test_smollm2_weights_match_bitsandbytes(smollm2, layer, quant_type, blocksize, double_quant):
    weight = smollm2[0].model.layers[0].get_submodule(layer).weight.detach()
    _assert_matches_bnb(weight, quant_type, blocksize, double_quant)


def _code_mismatch(ours: torch.Tensor, theirs: torch.Tensor, quant_type: str) -> float:
    """Share of 4-bit codes that stand for different values (FP4's +0 and -0 count as equal)."""
    table = quant.codebook(quant_type, ours.device)
    nibbles = [(p >> 4, p & 15) for p in (ours, theirs)]
    differ = [table[a.long()] != table[b.long()] for a, b in zip(*nibbles)]
    return float(torch.cat(differ).float().mean())


# bitsandbytes' CUDA kernels are built with --use_fast_math and round the 8-bit absmax codes their
# own way, so on CUDA a rare code may differ by one step; on CPU everything is bit-exact.
MISMATCH_ALLOWED = {"cpu": 0.0, "cuda": 1e-4}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double_quant"])
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_matches_bitsandbytes_on_device(device, quant_type, blocksize, double_quant):
    torch.manual_seed(0)
    x = torch.randn(1024, 576, device=device)
    packed, state, dequantized = _bnb_reference(x, quant_type, blocksize, double_quant)
    ours = quant.quantize_blockwise(x, quant_type, blocksize, double_quant)
    assert _code_mismatch(ours.packed, packed, quant_type) <= MISMATCH_ALLOWED[device]
    if double_quant:
        assert torch.equal(ours.absmax_absmax, state.state2.absmax)
        assert torch.equal(ours.absmax_offset, state.offset)
    assert (ours.absmax != state.absmax).float().mean() <= MISMATCH_ALLOWED[device] * 100
    close = torch.isclose(quant.dequantize_blockwise(ours), dequantized, rtol=1e-6, atol=1e-7)
    assert close.float().mean() >= 1 - MISMATCH_ALLOWED[device] * 100


def test_nibble_order_first_value_high():
    x = torch.zeros(64)
    x[0], x[1] = 1.0, -1.0  # NF4 codes 15 and 0
    state = quant.quantize_blockwise(x, "nf4", 64)
    assert state.packed[0].item() == 0xF0 and state.packed.numel() == 32


# ---------------------------------------------------------------------------------------------
# The fast paths against their definitions
# ---------------------------------------------------------------------------------------------
def _one_comparison_per_midpoint(scaled: torch.Tensor, midpoints: list[float]) -> torch.Tensor:
    """The definition: a value's code is the number of midpoints strictly below it (ties go down)."""
    return sum((scaled > m).to(torch.uint8) for m in midpoints)


def _hard_values(midpoints: list[float]) -> torch.Tensor:
    """Every float32 within 40 ulps of each midpoint and of each grid edge, a dense sweep of
    [-1, 1] a little beyond both ends, and the signed zeros."""
    mids = torch.tensor(midpoints)
    edges = torch.arange(-quant._GRID_HALF, quant._GRID_HALF + 1) / quant._GRID_HALF
    values = [torch.linspace(-1.0000002, 1.0000002, 400_003), torch.tensor([-1.0, 1.0, 0.0, -0.0])]
    for points in (mids, edges.float()):
        for direction in (-math.inf, math.inf):
            v = points.clone()
            for _ in range(40):
                v = torch.nextafter(v, torch.full_like(v, direction))
                values.append(v)
    return torch.cat(values).view(-1, 1)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
def test_grid_nearest_level_equals_the_definition(quant_type):
    midpoints, _ = quant._encoder(quant_type, torch.device("cpu"))
    assert quant._grid_guess(tuple(midpoints), torch.device("cpu")) is not None  # the fast path is taken
    x = _hard_values(midpoints)
    assert torch.equal(quant._nearest_level(x, midpoints), _one_comparison_per_midpoint(x, midpoints))


def test_grid_is_refused_for_levels_too_close_and_the_comparisons_still_agree():
    midpoints = [-0.5, 0.0, 0.001, 0.5]  # 0 and 0.001: three grid cells would hold both
    assert quant._grid_guess(tuple(midpoints), torch.device("cpu")) is None
    x = _hard_values(midpoints)
    assert torch.equal(quant._nearest_level(x, midpoints), _one_comparison_per_midpoint(x, midpoints))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4", "int8"])
@pytest.mark.parametrize("shape", [(64, 96), (3, 43), (1, 2), (5,)], ids=["whole", "ragged_odd", "two", "five"])
def test_dequantize_equals_codebook_times_absmax(shape, quant_type, dtype):
    """The pair-table gather against the formula written plainly: unpack each nibble (or byte), look
    its level up, multiply by its block's absmax in float32, round once to dtype."""
    torch.manual_seed(0)
    state = quant.quantize_blockwise(torch.randn(shape), quant_type, 4, double_quant=True)
    if quant_type == "int8":
        codes = state.packed.long()
    else:
        codes = torch.stack([state.packed >> 4, state.packed & 15], dim=1).flatten().long()[: state.numel]
    absmax = quant.dequantize_absmax(state).repeat_interleave(4)[: state.numel]
    expected = (quant.codebook(quant_type)[codes] * absmax).to(dtype).view(shape)
    got = quant.dequantize_blockwise(state, dtype)
    assert got.dtype == dtype and torch.equal(got, expected)


def test_byte_table_holds_each_bytes_two_levels_high_nibble_first():
    table = quant._byte_table("nf4", torch.device("cpu")).view(torch.float32).view(256, 2)
    levels = quant.nf4_codebook()
    assert torch.equal(table[0x1F], levels[[1, 15]])  # byte 0x1F: first value code 1, second code 15
    assert torch.equal(quant._byte_table("int8", torch.device("cpu")), quant.int8_codebook())


@pytest.mark.parametrize("numel", [5, 2 * 7 + 1, 64 * 9 + 3])
def test_codes_widened_in_chunks_gather_the_same(monkeypatch, numel):
    """A weight larger than one chunk of codes (here chunks of 2 and 7 bytes) is gathered chunk by
    chunk into the same tensor as in one go (chunks that divide the bytes evenly and ones that do not)."""
    state = quant.quantize_blockwise(torch.randn(numel, generator=torch.Generator().manual_seed(numel)), "nf4", 64,
                                     double_quant=True)
    whole = quant.dequantize_blockwise(state)
    for chunk in (2, 7):
        monkeypatch.setattr(quant, "_GATHER_CHUNK", chunk)
        assert torch.equal(quant.dequantize_blockwise(state), whole)


# ---------------------------------------------------------------------------------------------
# Error bound and storage cost
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4", "int8"])
@pytest.mark.parametrize("shape", [(256, 192), (33, 17)])
def test_roundtrip_error_within_half_the_largest_gap(quant_type, shape):
    torch.manual_seed(1)
    x = torch.randn(shape) * torch.rand(shape[0], 1)  # rows of different scale
    blocksize = 64
    levels = quant.codebook(quant_type).unique()  # sorted distinct levels
    half_gap = float((levels[1:] - levels[:-1]).max()) / 2
    padded = F.pad(x.reshape(-1), (0, -x.numel() % blocksize)).view(-1, blocksize)
    block_absmax = padded.abs().amax(dim=1).repeat_interleave(blocksize)[: x.numel()].view(shape)
    error = (quant.dequantize_blockwise(quant.quantize_blockwise(x, quant_type, blocksize)) - x).abs()
    assert (error <= block_absmax * half_gap * (1 + 1e-6) + 1e-7).all()
    # With double quantization the absmax itself is approximate: add its own error.
    state = quant.quantize_blockwise(x, quant_type, blocksize, double_quant=True)
    absmax_error = (quant.dequantize_absmax(state) - padded.abs().amax(dim=1)).abs()
    extra = absmax_error.repeat_interleave(blocksize)[: x.numel()].view(shape)
    error = (quant.dequantize_blockwise(state) - x).abs()
    assert (error <= block_absmax * half_gap * (1 + 1e-6) + extra + 1e-6).all()


def _stored_bytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def test_bits_per_parameter_from_the_paper_and_from_stored_tensors(smollm2):
    weight = smollm2[0].model.layers[0].mlp.down_proj.weight.detach()
    n = weight.numel()
    plain = quant.quantize_blockwise(weight, "nf4", 64)
    double = quant.quantize_blockwise(weight, "nf4", 64, double_quant=True)
    assert quant.bits_per_parameter(plain) == pytest.approx(4 + 32 / 64, abs=1e-9)
    paper = 4 + 8 / 64 + 32 / (64 * 256)  # QLoRA section 3: 4.127
    assert quant.bits_per_parameter(double) == pytest.approx(paper, abs=1e-3)
    # n is 54 × 256 × 64, so the only extra is the 32-bit offset:
    assert quant.bits_per_parameter(double) == pytest.approx(paper + 32 / n, abs=1e-9)
    for state in (plain, double):
        stored = _stored_bytes(state.packed, state.absmax, state.absmax_offset, state.absmax_absmax)
        assert quant.bits_per_parameter(state) == 8 * stored / n
    # bitsandbytes stores the same number of bytes
    packed, state = bnbF.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert _stored_bytes(packed, state.absmax, state.offset, state.state2.absmax) == double.nbytes


# ---------------------------------------------------------------------------------------------
# Linear4bit
# ---------------------------------------------------------------------------------------------
def _bnb_linear(linear: nn.Linear, quant_type: str) -> nn.Module:
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=torch.float32, quant_type=quant_type)
    layer.weight = bnb.nn.Params4bit(linear.weight.detach().clone(), requires_grad=False, quant_type=quant_type)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    # .to() quantizes; train() keeps bitsandbytes off its bfloat16 CPU inference kernel
    return layer.to(linear.weight.device).train()


def _assert_within_float32_rounding(y, x, weight, bias):
    """``y`` is ``x @ weight.T + bias`` computed in float32, in any order of summation: within
    gamma_n * (|x| @ |weight|.T + |bias|) of the exact product, n = in_features + 1 terms and
    gamma_n = n u / (1 - n u) with u = 2**-24 (Higham, Accuracy and Stability of Numerical
    Algorithms, 2nd ed., eq. 3.5). A bfloat16 matmul (tried) or a wrong weight is far outside."""
    n, u = weight.shape[1] + 1, 2.0 ** -24
    x, weight, bias = x.double(), weight.double(), bias.double()
    bound = n * u / (1 - n * u) * (x.abs() @ weight.abs().t() + bias.abs())
    error = (y.double() - F.linear(x, weight, bias)).abs()
    assert (error <= bound).all(), f"{int((error > bound).sum())} outputs beyond float32 rounding"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_linear4bit_forward_matches_dequantized_linear_and_bitsandbytes(smollm2, device, quant_type):
    up = smollm2[0].model.layers[0].mlp.up_proj
    linear = nn.Linear(up.in_features, up.out_features, device=device)
    with torch.no_grad():
        linear.weight.copy_(up.weight)
    ours = linear4bit.Linear4bit.from_linear(linear, quant_type, compute_dtype=torch.float32)
    theirs = _bnb_linear(linear, quant_type)
    assert _code_mismatch(ours.weight, theirs.weight.view(-1), quant_type) <= MISMATCH_ALLOWED[device]
    x = torch.randn(2, 16, up.in_features, device=device)
    with torch.no_grad():
        y = ours(x)
        if device == "cpu":  # the same weights (bit-exact) and the same kernels
            torch.testing.assert_close(y, F.linear(x, ours.dequantize(), linear.bias), rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(y, theirs(x), rtol=1e-5, atol=1e-5)
        else:
            # cuBLAS sums x @ W.T + b and F.linear's fused addmm in different orders, and the two
            # weights may differ in the rare codes MISMATCH_ALLOWED lets through, by up to a whole
            # FP4 step (a third of a block's absmax: 0.65 in one output of up_proj on an H200), so
            # each layer is held to the product with its own dequantized weight
            _assert_within_float32_rounding(y, x, ours.dequantize(), linear.bias)
            their_weight = bnbF.dequantize_4bit(theirs.weight.data, theirs.weight.quant_state)
            _assert_within_float32_rounding(theirs(x), x, their_weight, linear.bias)


def test_linear4bit_weight_is_frozen_storage():
    layer = linear4bit.Linear4bit.from_linear(nn.Linear(128, 64))
    assert not isinstance(layer.weight, nn.Parameter) and layer.weight.dtype == torch.uint8
    assert [name for name, _ in layer.named_parameters()] == ["bias"] and not layer.bias.requires_grad
    assert set(layer.state_dict()) == {"weight", "absmax", "absmax_offset", "absmax_absmax", "bias"}
    before = layer.dequantize()
    layer.to(torch.bfloat16)  # casts the bias only; the quantization constants stay exact
    assert layer.bias.dtype == torch.bfloat16 and layer.absmax_absmax.dtype == torch.float32
    assert torch.equal(layer.dequantize(torch.float32), before)


class _TwoMatrixLoRA(nn.Module):
    """A minimal LoRA adapter written here, independent of course_lib.lora."""

    def __init__(self, base, r=4, scaling=2.0):
        super().__init__()
        self.base, self.scaling = base, scaling
        self.lora_A = nn.Parameter(torch.randn(r, base.in_features) * 0.1)
        self.lora_B = nn.Parameter(torch.randn(base.out_features, r) * 0.1)  # non-zero: both get gradients

    def forward(self, x):
        return self.base(x) + self.scaling * (x @ self.lora_A.t() @ self.lora_B.t())


def test_qlora_backward_reaches_only_lora_and_the_input(smollm2):
    torch.manual_seed(0)
    float_layer = copy.deepcopy(smollm2[0].model.layers[0].self_attn.o_proj)
    layer = linear4bit.Linear4bit.from_linear(float_layer)
    model = _TwoMatrixLoRA(layer)
    x = torch.randn(4, layer.in_features, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        loss = model(x).pow(2).sum()
    loss.backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]
    assert model.lora_A.grad is not None and model.lora_B.grad is not None and x.grad is not None
    assert layer.weight.grad is None and not layer.weight.requires_grad
    assert max(saved) < layer.in_features * layer.out_features  # no dequantized weight kept for backward
    # the same gradients as a float layer holding the dequantized weight (plain autograd)
    reference = copy.deepcopy(model)
    reference.base = nn.Linear(layer.in_features, layer.out_features, bias=False).requires_grad_(False)
    reference.base.weight.copy_(layer.dequantize())
    x_ref = x.detach().clone().requires_grad_(True)
    reference(x_ref).pow(2).sum().backward()
    for ours, theirs in [(x.grad, x_ref.grad), (model.lora_A.grad, reference.lora_A.grad),
                         (model.lora_B.grad, reference.lora_B.grad)]:
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_qlora_with_course_lib_lora(smollm2):
    from course_lib import lora

    layer = linear4bit.Linear4bit.from_linear(smollm2[0].model.layers[0].self_attn.o_proj)
    wrapped = lora.LoRALinear(layer, r=4, lora_alpha=8)
    x = torch.randn(3, layer.in_features, requires_grad=True)
    wrapped(x).sum().backward()
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.grad is not None for p in wrapped.parameters() if p.requires_grad) and x.grad is not None


# ---------------------------------------------------------------------------------------------
# quantize_model
# ---------------------------------------------------------------------------------------------
def test_quantize_model_tiny_llama_matches_bitsandbytes_dequantized_weights():
    model = tiny_llama()
    linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    reference = copy.deepcopy(model)  # each weight replaced by bitsandbytes' round trip
    with torch.no_grad():
        for name in linear_names:
            weight = reference.get_submodule(name).weight
            packed, state = bnbF.quantize_4bit(weight.reshape(-1), blocksize=64, quant_type="nf4",
                                               compress_statistics=True)
            weight.copy_(bnbF.dequantize_4bit(packed, state).view(weight.shape))
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        float_logits = model(ids).logits
        report = linear4bit.quantize_model(model)
        logits, reference_logits = model(ids).logits, reference(ids).logits
    assert report["layers_replaced"] == len(linear_names) == 14
    assert all(isinstance(model.get_submodule(n), linear4bit.Linear4bit) for n in linear_names)
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight
    torch.testing.assert_close(logits, reference_logits, rtol=1e-5, atol=1e-5)
    relative_error = (logits - float_logits).norm() / float_logits.norm()
    assert relative_error < 0.15, relative_error  # 4-bit weights: ~8% here, the same as bitsandbytes gives
    # the report's bytes are the stored tensors', consistent with bits_per_parameter
    states = [model.get_submodule(n).quant_state for n in linear_names]
    assert report["weight_bytes_after"] == sum(s.nbytes for s in states)
    assert report["weight_numel"] == sum(s.numel for s in states)
    assert report["bits_per_parameter"] == pytest.approx(
        sum(quant.bits_per_parameter(s) * s.numel for s in states) / report["weight_numel"])
    assert report["weight_bytes_before"] == 4 * report["weight_numel"]
    saved = report["model_bytes_before"] - report["model_bytes_after"]
    assert saved == report["weight_bytes_before"] - report["weight_bytes_after"]


def test_quantize_model_smollm2(smollm2):
    model, tokenizer = smollm2
    quantized = copy.deepcopy(model)
    report = linear4bit.quantize_model(quantized)
    assert report["layers_replaced"] == 210
    assert quantized.lm_head.weight is quantized.model.embed_tokens.weight
    assert 4.12 < report["bits_per_parameter"] < 4.14
    ids = tokenizer("The capital of France is Paris. The capital of Italy is", return_tensors="pt").input_ids
    with torch.no_grad():
        expected, got = model(ids).logits, quantized(ids).logits
    assert (expected.argmax(-1) == got.argmax(-1)).float().mean() >= 0.7
    assert got[0, -1].argmax() == expected[0, -1].argmax()


# ---------------------------------------------------------------------------------------------
# Bad input: clear errors
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("blocksize", [48, 0, -64, 1, 64.0, True])
def test_bad_blocksize(blocksize):
    with pytest.raises(ValueError, match="blocksize must be a power of two"):
        quant.quantize_blockwise(torch.randn(128), blocksize=blocksize)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_or_inf_weights(bad):
    x = torch.randn(4, 64)
    x[2, 5] = bad
    with pytest.raises(ValueError, match="1 NaN or inf value"):
        quant.quantize_blockwise(x)
    linear = nn.Linear(64, 4)
    with torch.no_grad():
        linear.weight[1, 1] = bad
    with pytest.raises(ValueError, match="Fix the weights first"):
        linear4bit.Linear4bit.from_linear(linear)


def test_unknown_quant_type_lists_the_valid_ones():
    with pytest.raises(ValueError, match="choose one of 'nf4', 'fp4', 'int4', 'int8'"):
        quant.quantize_blockwise(torch.randn(64), quant_type="nf3")
    with pytest.raises(ValueError, match="choose one of 'nf4', 'fp4', 'int4'$"):
        linear4bit.Linear4bit.from_linear(nn.Linear(64, 4), quant_type="int8")


def test_compute_dtype_must_be_floating_point():
    with pytest.raises(TypeError, match="compute_dtype must be a floating-point"):
        linear4bit.Linear4bit.from_linear(nn.Linear(64, 4), compute_dtype=torch.int8)
    with pytest.raises(TypeError, match="compute_dtype must be a floating-point"):
        linear4bit.quantize_model(tiny_llama(), compute_dtype="bfloat16")


def test_other_bad_tensors():
    with pytest.raises(TypeError, match="floating-point"):
        quant.quantize_blockwise(torch.arange(64))
    with pytest.raises(ValueError, match="empty"):
        quant.quantize_blockwise(torch.empty(0))


def test_ragged_numel_is_padded_not_rejected():
    state = quant.quantize_blockwise(torch.randn(3, 43), "nf4", 64)  # 129 values: 3 blocks, last of 1
    assert state.absmax.numel() == math.ceil(129 / 64) and state.packed.numel() == 65
    assert quant.dequantize_blockwise(state).shape == (3, 43)
