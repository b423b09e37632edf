"""The budget on several GPUs (chapter 08): ZeRO / FSDP sharding per GPU, mixed precision's 16 bytes,
QLoRA's 4-bit weights sharded, the GPU-count planner, and the ``course-lib`` lines for them.

Arithmetic only (no model is loaded), checked against the ZeRO paper's formulas and hand-worked cases."""

import json
import math
import re

import pytest
from conftest import assert_one_line_error, run

from course_lib import budget
from course_lib.budget import GiB, ModelConfig, estimate, plan_gpus

STAGE = {"none": 0, "optimizer": 1, "optimizer+gradients": 2, "full": 3}


# ---------------------------------------------------------------------------------------------
# Mixed precision: 16 bytes per parameter
# ---------------------------------------------------------------------------------------------
def test_master_weights_make_the_16_bytes_of_mixed_precision_adam():
    """bf16 weights (2) + bf16 gradients (2) + float32 master copy, momentum and variance (4 + 4 + 4)."""
    plain = estimate("llama-3-8b", "full")
    mixed = estimate("llama-3-8b", "full", master_weights=True)
    n = mixed.trainable_parameters
    assert (mixed.weights, mixed.gradients, mixed.optimizer_state) == (2 * n, 2 * n, 12 * n)
    assert mixed.model_states == 16 * n and plain.model_states == 12 * n
    assert mixed.activations == plain.activations  # compute stays in bfloat16
    lora = estimate("llama-3-8b", "lora", lora_dtype="bfloat16", master_weights=True)
    assert lora.optimizer_state == 12 * lora.trainable_parameters
    for kwargs in ({"method": "full", "weight_dtype": "float32"}, {"method": "lora"}):
        with pytest.raises(ValueError, match="already float32"):
            estimate("llama-3-8b", master_weights=True, **kwargs)


def test_the_two_conventions_for_16_bit_full_fine_tuning_of_llama_3_8b():
    """torch's AdamW on bfloat16 parameters (bf16 moments): 2 + 2 + 4 = 8 bytes per parameter; classic
    mixed precision (float32 master copy and moments): 2 + 2 + 4 + 4 + 4 = 16. LLaMA-3-8B has
    8,030,261,248 parameters: 128,256 x 4,096 embedding and as many in the untied output layer, 32
    layers of 4,096 x (4,096 + 1,024 + 1,024 + 4,096) + 3 x 4,096 x 14,336 + 2 x 4,096, a final norm."""
    n = 2 * 128_256 * 4_096 + 32 * (4_096 * 10_240 + 3 * 4_096 * 14_336 + 2 * 4_096) + 4_096
    assert n == 8_030_261_248
    torch_bf16 = estimate("llama-3-8b", "full", optimizer="adamw16bit")
    mixed = estimate("llama-3-8b", "full", master_weights=True)
    assert (torch_bf16.weights, torch_bf16.gradients, torch_bf16.optimizer_state) == (
        16_060_522_496, 16_060_522_496, 32_121_044_992)
    assert torch_bf16.model_states == 64_242_089_984  # 8 bytes x n
    assert (mixed.weights, mixed.gradients, mixed.optimizer_state) == (16_060_522_496, 16_060_522_496, 96_363_134_976)
    assert mixed.model_states == 128_484_179_968  # 16 bytes x n
    assert torch_bf16.activations == mixed.activations
    # a LoRA adapter in bfloat16 (SmolLM2, r=8 on q and v: 460,800 parameters): 2 + 2 + 4 bytes each
    lora = estimate("smollm2-135m", "lora", lora_dtype="bfloat16", optimizer="adamw16bit")
    assert (lora.lora_parameters, lora.gradients, lora.optimizer_state) == (921_600, 921_600, 1_843_200)


def test_torch_adamw_keeps_its_moments_in_the_parameters_dtype():
    """What "adamw16bit" models: torch.optim.AdamW on a bfloat16 parameter keeps bfloat16 moments."""
    import torch

    p = torch.nn.Parameter(torch.ones(6, dtype=torch.bfloat16))
    optimizer = torch.optim.AdamW([p])
    p.grad = torch.ones_like(p)
    optimizer.step()
    moments = [optimizer.state[p][k] for k in ("exp_avg", "exp_avg_sq")]
    assert all(m.dtype == torch.bfloat16 for m in moments)
    assert sum(m.numel() * m.element_size() for m in moments) == budget.OPTIMIZERS["adamw16bit"] * p.numel()


# ---------------------------------------------------------------------------------------------
# The ZeRO paper's Figure 1
# ---------------------------------------------------------------------------------------------
def zero_paper(psi: float, nd: int, stage: int, k: int = 12) -> float:
    """Model states per GPU in bytes, Rajbhandari et al. 2020, Figure 1 (written from the paper)."""
    return [(2 + 2 + k) * psi, 2 * psi + 2 * psi + k * psi / nd, 2 * psi + (2 + k) * psi / nd,
            (2 + 2 + k) * psi / nd][stage]


# A GPT-style model of about 7.5B parameters (h=4096, 36 layers, GPT-2's vocabulary): only its model
# states are compared, which depend on its parameter count alone.
ZERO_7_5B = ModelConfig("zero-7.5b", "gpt", 4096, 36, 32, 32, 4 * 4096, 50257, True, max_position_embeddings=2048)


def test_the_zero_papers_formulas_give_its_figure():
    """Figure 1: Ψ = 7.5B, Nd = 64, K = 12: 120 GB, 31.4 GB, 16.6 GB, 1.9 GB (GB = 10^9 bytes)."""
    printed = [120, 31.4, 16.6, 1.9]
    assert [round(zero_paper(7.5e9, 64, stage) / 1e9, 1) for stage in range(4)] == printed


@pytest.mark.parametrize("sharding", list(STAGE))
def test_estimate_reproduces_the_zero_paper_figure_1(sharding):
    psi = ZERO_7_5B.parameters()
    assert psi == pytest.approx(7.5e9, rel=0.01)
    b = estimate(ZERO_7_5B, "full", weight_dtype="bfloat16", master_weights=True, optimizer="adamw",
                 gpus=64, sharding=sharding)
    assert b.lora_parameters == 0
    expected = zero_paper(psi, 64, STAGE[sharding])
    assert b.model_states == pytest.approx(expected, abs=4)  # each line's shard is rounded up to a byte
    printed = {"none": 120e9, "optimizer": 31.4e9, "optimizer+gradients": 16.6e9, "full": 1.9e9}[sharding]
    assert b.model_states == pytest.approx(printed, rel=0.03)  # our Ψ is 7.46B, the paper's 7.5B


# ---------------------------------------------------------------------------------------------
# What each strategy divides by N
# ---------------------------------------------------------------------------------------------
DIVIDED = {"none": set(), "optimizer": {"optimizer_state"}, "optimizer+gradients": {"optimizer_state", "gradients"},
           "full": {"optimizer_state", "gradients", "weights", "lora_parameters"}}


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
@pytest.mark.parametrize("sharding", list(STAGE))
@pytest.mark.parametrize("gpus", [2, 3, 8, 1000])
def test_each_strategy_divides_its_lines_by_n(method, sharding, gpus):
    one = estimate("llama-3-8b", method, gradient_checkpointing=True)
    many = estimate("llama-3-8b", method, gradient_checkpointing=True, gpus=gpus, sharding=sharding)
    for line in ("weights", "lora_parameters", "gradients", "optimizer_state"):
        whole = getattr(one, line)
        assert getattr(many, line) == (math.ceil(whole / gpus) if line in DIVIDED[sharding] else whole), line
    # each GPU runs its own micro-batch: activations and backward buffers are never divided
    assert (many.activations, many.transient) == (one.activations, one.transient)
    assert (many.sharding_buffers == 0) == (sharding in ("none", "optimizer"))  # ZeRO-1 reduces whole gradients


def test_sharding_buffers_by_hand_for_llama_3_8b():
    """One block of LLaMA-3-8B: q and o 4096², k and v 4096·1024, gate, up, down 3·4096·14336, two
    RMSNorms 2·4096: 218,112,000 parameters. The root unit: embeddings and output layer 2·128256·4096,
    final norm 4096: 1,050,677,248. In bfloat16 (2 bytes) under ZeRO-2 the unsharded gradients of the
    root and one block; under full sharding also the root's weights and two blocks' (one prefetched)."""
    block, root = 218_112_000, 1_050_677_248
    zero2 = estimate("llama-3-8b", "full", gpus=8, sharding="optimizer+gradients")
    assert zero2.sharding_buffers == 2 * (root + block)
    full = estimate("llama-3-8b", "full", gpus=8, sharding="full")
    assert full.sharding_buffers == 2 * (root + block) + 2 * (root + 2 * block)
    lora = estimate("llama-3-8b", "lora", gpus=8, sharding="full")  # r=8 on q, v: 8·(8192 + 5120) per block
    assert lora.sharding_buffers == 4 * 8 * 13312 + 2 * (root + 2 * block) + 2 * 4 * 8 * 13312


@pytest.mark.parametrize("sharding", list(STAGE))
@pytest.mark.parametrize("method", ["full", "qlora"])
def test_one_gpu_is_the_same_whatever_the_strategy(sharding, method):
    none = estimate("llama-3-8b", method)
    one = estimate("llama-3-8b", method, gpus=1, sharding=sharding)
    assert {**one.to_dict(), "settings": None} == {**none.to_dict(), "settings": None}


@pytest.mark.parametrize("sharding", list(STAGE))
@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_the_peak_per_gpu_never_grows_with_n(sharding, method):
    peaks = [estimate("llama-3-70b", method, gpus=n, sharding=sharding, gradient_checkpointing=True).peak
             for n in (*range(1, 17), 64, 256, 1024)]
    assert peaks == sorted(peaks, reverse=True)
    assert (peaks[0] == peaks[-1]) == (sharding == "none")


def test_offload_takes_the_states_off_the_gpu():
    b = estimate("llama-3-8b", "full", gpus=4, sharding="optimizer+gradients", offload=True)
    assert b.optimizer_state == 0 and b.weights == estimate("llama-3-8b", "full").weights
    f = estimate("llama-3-8b", "full", gpus=4, sharding="full", offload=True)
    assert f.optimizer_state == f.weights == 0 and f.gradients > 0
    single = estimate("llama-3-8b", "full", gpus=1, sharding="optimizer", offload=True)  # ZeRO-Offload
    assert single.optimizer_state == 0 and single.sharding_buffers == 0
    with pytest.raises(ValueError, match="choose sharding='optimizer' or higher"):
        estimate("llama-3-8b", "full", offload=True)


def test_qlora_four_bit_weights_are_divided_under_full_sharding_only():
    """FSDP shards the 4-bit weights when bitsandbytes packs them in the dtype of the rest
    (``bnb_4bit_quant_storage=torch.bfloat16``), which full sharding then defaults to."""
    c = budget.get_config("llama-3-70b")
    four_bit = sum(budget.four_bit_storage_bytes(i * o) for _, i, o, _ in c.linears())
    rest = (c.parameters() - sum(i * o for _, i, o, _ in c.linears())) * 2
    assert estimate(c, "qlora").weights == four_bit + rest
    full = estimate(c, "qlora", gpus=4, sharding="full")
    assert full.settings.quant_storage == "bfloat16" and full.weights == math.ceil((four_bit + rest) / 4)
    assert estimate(c, "qlora", gpus=4, sharding="optimizer+gradients").weights == four_bit + rest
    assert estimate(c, "qlora").settings.quant_storage == "uint8"  # bitsandbytes' default
    with pytest.raises(ValueError, match=re.escape("set quant_storage='bfloat16'")):
        estimate(c, "qlora", gpus=4, sharding="full", quant_storage="uint8")
    assert estimate(c, "qlora", gpus=1, sharding="full", quant_storage="uint8").weights == four_bit + rest
    with pytest.raises(ValueError, match="use method='qlora'"):
        estimate(c, "lora", quant_storage="bfloat16")


@pytest.mark.parametrize("kwargs, words", [
    ({"gpus": 0}, "gpus must be a positive integer"),
    ({"gpus": -8}, "gpus must be a positive integer"),
    ({"gpus": 2.5}, "gpus must be a positive integer"),
    ({"sharding": "zero3"}, "sharding must be one of"),
    ({"quant_storage": "int8", "method": "qlora"}, "quant_storage must be one of"),
])
def test_impossible_gpu_settings_raise_a_clear_error(kwargs, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        estimate("llama-3-8b", **kwargs)


# ---------------------------------------------------------------------------------------------
# How many GPUs: the seeds' cases (micro-batch 1, 512 tokens, checkpointing, 10% headroom)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model, gpu, method, answer", [
    # LLaMA-3-8B full fine-tuning on 80 GB cards, by hand (Ψ = 8,030,261,248; usable 0.9·80 GiB =
    # 77.31e9 bytes). One GPU: 16Ψ = 128.5e9, no. Two, ZeRO-1: 2Ψ + 2Ψ + 12Ψ/2 = 80.30e9 before any
    # activation, no. Two, ZeRO-2: 2Ψ + (2 + 12)Ψ/2 = 72.27e9, plus the root's and one block's unsharded
    # gradients 2·(1,050,677,248 + 218,112,000) = 2.54e9, activations 0.41e9 and the loss's backward
    # buffer 8·512·128256 = 0.53e9: 75.75e9 <= 77.31e9, it fits.
    ("llama-3-8b", "80GB", "full", (2, "optimizer+gradients")),
    ("llama-3-8b", "40GB", "full", (4, "full")),
    ("llama-3-8b", "24GB", "full", (8, "full")),
    ("llama-3-8b", "24GB", "qlora", (1, "none")),
    ("llama-3-8b", "24GB", "lora", (1, "none")),
    ("llama-3-70b", "80GB", "full", (19, "full")),
    ("llama-3-70b", "40GB", "full", (48, "full")),
    ("llama-3-70b", "24GB", "full", (139, "full")),
    ("llama-3-70b", "80GB", "qlora", (1, "none")),
    ("llama-3-70b", "40GB", "qlora", (2, "full")),
    ("llama-3-70b", "24GB", "qlora", (3, "full")),  # seed 001's one 24 GB card: three, fully sharded
])
def test_plan_gpus_for_the_seeds_cases(model, gpu, method, answer):
    p = plan_gpus(model, gpu, method)
    assert p.fits and (p.gpus, p.sharding) == answer and not p.offload
    assert p.budget.peak <= p.usable
    if p.gpus > 1:  # one GPU fewer does not fit with any strategy
        for sharding in budget.STRATEGIES:
            fewer = estimate(model, method, gpus=p.gpus - 1, sharding=sharding, gradient_checkpointing=True,
                             master_weights=method == "full")
            assert fewer.peak > p.usable, sharding


def test_plan_gpus_with_offload_needs_fewer_gpus():
    """Offloading the optimizer state and the weight shards: LLaMA-3-70B QLoRA on two 24 GB cards."""
    p = plan_gpus("llama-3-70b", "24GB", "qlora", offload=True)
    assert (p.gpus, p.sharding, p.offload) == (2, "full", True)


def test_plan_gpus_says_what_to_do_when_nothing_fits():
    p = plan_gpus("llama-3-70b", "24GB", "full", seq_len=8192, gradient_checkpointing=False)
    assert not p.fits and "even fully sharded over 1024 GPUs" in p.reason
    assert "turn on gradient checkpointing" in p.reason and "activations" in p.reason
    few = plan_gpus("llama-3-70b", "24GB", "full", max_gpus=4)
    assert not few.fits and "--max-gpus" in few.reason
    for bad, words in (({"max_gpus": 0}, "max_gpus must be a positive integer"),
                       ({"headroom": 1}, "headroom"), ({"method": "dora"}, "method must be one of")):
        with pytest.raises(ValueError, match=words):
            plan_gpus("llama-3-8b", "24GB", **{"method": "full", **bad})


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------
def test_budget_with_gpus_prints_one_gpus_share(capsys):
    status, out, err = run(capsys, "budget", "--model", "llama-3-8b", "--method", "full", "--gpus", 8,
                           "--sharding", "full", "--master-weights", "--checkpointing", "--gpu", "24GB")
    expected = estimate("llama-3-8b", "full", gpus=8, sharding="full", master_weights=True,
                        gradient_checkpointing=True)
    assert err == "" and status == (0 if expected.peak <= 24 * GiB else 1)
    assert "8 GPUs, sharding full (ZeRO-3), memory per GPU" in out and "sharding buffers" in out
    assert budget.format_bytes(expected.optimizer_state) in out and "fp32 master weights" in out
    status, out, _ = run(capsys, "budget", "--model", "llama-3-8b", "--method", "full", "--gpus", 8,
                         "--sharding", "optimizer", "--offload", "--json")
    data = json.loads(out)
    assert data["optimizer_state"] == 0 and data["settings"]["gpus"] == 8 and data["settings"]["offload"] is True


def test_plan_takes_the_model_and_memory_as_words_and_says_how_many_gpus(capsys):
    status, out, err = run(capsys, "plan", "llama-3-8b", "80GB")
    assert err == "" and status == 0
    assert "full fine-tuning: 2 GPUs, sharding optimizer+gradients (ZeRO-2)" in out
    assert "QLoRA: 1 GPU, no sharding" in out
    assert out == run(capsys, "plan", "--model", "llama-3-8b", "--gpu", "80GB")[1]
    status, out, _ = run(capsys, "plan", "llama-3-70b", "24GB", "--json")
    data = json.loads(out)
    assert status == 1 and not data["fits"]  # not on one card, but:
    assert (data["gpus"]["qlora"]["gpus"], data["gpus"]["qlora"]["sharding"]) == (3, "full")
    status, out, _ = run(capsys, "plan", "llama-3-70b", "24GB", "--seq", 8192, "--max-gpus", 1024)
    assert "full fine-tuning: does not fit: even fully sharded over 1024 GPUs" in out


@pytest.mark.parametrize("argv, words", [
    (["budget", "--model", "llama-3-8b", "--gpus", "0"], "gpus must be a positive integer"),
    (["budget", "--model", "llama-3-8b", "--gpus=-4"], "gpus must be a positive integer"),
    (["budget", "--model", "llama-3-8b", "--gpus", "two"], "invalid int value"),
    (["budget", "--model", "llama-3-8b", "--sharding", "zero3"], "invalid choice"),
    (["budget", "--model", "llama-3-8b", "--offload"], "choose sharding='optimizer' or higher"),
    (["budget", "--model", "llama-3-8b", "--method", "full", "--dtype", "float32", "--master-weights"],
     "already float32"),
    (["budget", "--model", "llama-3-70b", "--method", "qlora", "--gpus", "4", "--sharding", "full",
      "--quant-storage", "uint8"], "set quant_storage='bfloat16'"),
    (["plan", "llama-3-8b", "24GB", "--max-gpus", "0"], "max_gpus must be a positive integer"),
    (["plan", "llama-3-8b", "24GB", "--gpu", "40GB"], "disagree"),
    (["plan"], "plan MODEL GPU_MEMORY"),
    (["plan", "llama-3-8b"], "add --gpu"),
    (["plan", "llama-3-8b", "lots"], "cannot read 'lots'"),
])
def test_bad_gpu_input_is_one_line_with_status_2(capsys, argv, words):
    assert_one_line_error(*run(capsys, *argv), words)
